"""The decomposition networks of decompNet (Park & Berg 2016, "Learning to decompose for object
detection and instance segmentation").

Three layers and two score functions:

* :class:`CategoryDecomposer`: the fully convolutional category network of App. B,
  ``conv(1,32,5,2)-conv(32,32,5,2)-conv(32,64,3,2)-conv(64,64,3,1)-conv(64,64,3,2)-
  conv(64,64,3,1)-deconv(64,64,3,2)-deconv(64,64,3,2)-deconv(64,64,3,2)-deconv(64,C,1,1)``
  with BN + ReLU after every layer: one map per category at half the input resolution
  (50x50 for the paper's 100x100 images; the "decomp" model of Fig. 4), or at the input
  resolution with ``full_resolution=True`` (one more stride-2 deconv: "decomp full";
  the paper does not list that layer: our choice).
* :class:`InstanceDecomposer`: the recurrent instance network. It reads ONE category map
  and emits ``steps`` instance maps, one per step, each meant to hold exactly one
  instance; a black map is the stop sign. Default cell (``cell="fc"``): the paper's
  "conv encoder, fully connected recurrent bottleneck, deconv decoder" (its alternative
  3, used for all its experiments): ``conv(1,32,5,2)-conv(32,32,3,2)-conv(32,32,3,2)-
  rnn-fc-rnn-fc-deconv-deconv-deconv-deconv(32,1,1,1)``, 2048 recurrent units.
  ``cell="conv_gru"``: the paper's "all convolutional recurrent" alternative 4 (form
  unspecified there), here a stack of :class:`kerasdet.layers.conv_gru.ConvGRUCell`
  over the encoder's 7x7 grid, the decoder reading the top state.
* :class:`InstanceBoxRegressor`: the box regressor of §2.3 on one instance map
  (1 hidden layer of 4096 units with dropout; output ``(cx, cy, w, h)`` in [0, 1]).
* :func:`box_score` (Eq. 5) and :func:`mask_score` (Eq. 6).

Choices where the paper is silent (§2.1-§2.3, App. B; ours), all constructor options:

* Padding: ``'same'`` stride-2 convolutions; transposed convolutions get the
  ``output_padding`` that mirrors the encoder exactly (7 -> 13 -> 25 -> 50 for the paper's
  sizes, :func:`mirror_output_paddings`). ``output_padding=None`` would give 7 -> 14 ->
  28 -> 56, which is wrong.
* The instance decoder's strides are 2 (the listing's ``1`` s contradict "stride 2 was
  used for down and upsampling" and cannot return to 50x50 from 7x7), its kernels mirror
  the encoder's (3, 3, 5).
* The 2048-unit recurrent state is projected to the encoder's 7x7x32 grid by a Dense
  layer (+ BN + ReLU) before the decoder (2048 is not 7*7*32).
* Recurrent cell: Elman, ``h_t = ReLU(norm(W x + U h_{t-1}))``, two layers, zero initial
  state; the same encoded category map is the input of every step (encoder run once).
  "BN after every layer" inside a recurrence is ambiguous; ``recurrent_norm="batch"``
  (default) keeps one BatchNormalization per time step (per-step statistics, Cooijmans
  et al. 2016 "Recurrent Batch Normalization"), so inference uses the statistics of the
  same step it was trained with; ``"layer"`` (LayerNormalization) and ``"none"`` are the
  alternatives.
* No BN on either network's last 1x1 layer; ReLU outputs (category targets are sums of
  masks, >= 0, up to 2-3 at overlaps); ``instance_activation="sigmoid"`` is an option.
* "decomp full" instance network: one more stride-2 stage in its encoder and decoder so
  the bottleneck stays 7x7x32 (``stages=None`` picks the fewest stride-2 stages that
  bring the map to <= 8 px: 3 for 50x50, 4 for 100x100).
"""
import keras
import tensorflow as tf

from kerasdet.boxes import boxes_from_masks

#: Moving-average momentum of every BatchNormalization here: 0.9 in Keras' convention is
#: Torch's default ``momentum=0.1`` (the paper's framework). Keras' 0.99 left the moving
#: statistics far from the batch statistics after a few hundred steps, so the frozen
#: category network of stage 2 (inference-mode BN) emitted all-zero maps in a tiny run.
BN_MOMENTUM = 0.9


def stride2_sizes(size, stages):
    """Sizes after each of ``stages`` stride-2 ``'same'`` convolutions: ``ceil(s / 2)``."""
    sizes = [int(size)]
    for _ in range(stages):
        sizes.append(-(-sizes[-1] // 2))
    return sizes


def mirror_output_paddings(sizes):
    """``output_padding`` of each stride-2 transposed conv (odd kernel, ``'same'``) that
    maps ``sizes[i + 1]`` back to ``sizes[i]``, decoder order (smallest first).

    Keras: ``out = (in - 1) * 2 + k - 2 * (k // 2) + op = 2 * in - 1 + op`` for odd ``k``,
    so ``op = out - 2 * in + 1`` (0 or 1)."""
    pads = []
    for big, small in zip(sizes[-2::-1], sizes[:0:-1]):
        op = big - 2 * small + 1
        if op not in (0, 1):
            raise ValueError(f"cannot mirror {small} -> {big} with a stride-2 transposed conv")
        pads.append(op)
    return pads


def _conv_bn_relu(filters, kernel, stride, name):
    return [keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                                name=f"{name}_conv"),
            keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn"),
            keras.layers.ReLU(name=f"{name}_relu")]


def _deconv_bn_relu(filters, kernel, output_padding, name):
    return [keras.layers.Conv2DTranspose(filters, kernel, strides=2, padding="same",
                                         output_padding=output_padding, use_bias=False,
                                         name=f"{name}_deconv"),
            keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn"),
            keras.layers.ReLU(name=f"{name}_relu")]


def _pads_2d(height_sizes, width_sizes):
    return list(zip(mirror_output_paddings(height_sizes), mirror_output_paddings(width_sizes)))


@keras.saving.register_keras_serializable(package="kerasdet")
class CategoryDecomposer(keras.layers.Layer):
    """Image ``[B, H, W, channels]`` -> one response map per category ``[B, S, S', C]``.

    Args:
      num_classes: number of categories (output maps). The paper: 3 (digits 3, 6, 9).
      full_resolution: False (default): maps at half the input size (the App. B list,
        "decomp"); True: one more stride-2 deconv, maps at the input size ("decomp full").
      widths: channels of the App. B layers, default ``(32, 32, 64, 64, 64, 64)`` for the
        six convolutions; every deconv has ``widths[-1]`` channels.
      output_activation: ``"relu"`` (default) on the final 1x1 layer, or ``None``.
    """

    KERNELS = (5, 5, 3, 3, 3, 3)
    STRIDES = (2, 2, 2, 1, 2, 1)

    def __init__(self, *, num_classes=3, full_resolution=False, widths=(32, 32, 64, 64, 64, 64),
                 output_activation="relu", **kwargs):
        super().__init__(**kwargs)
        if len(widths) != 6:
            raise ValueError(f"widths must list the 6 conv widths of App. B, got {widths}")
        self.num_classes = int(num_classes)
        self.full_resolution = bool(full_resolution)
        self.widths = tuple(int(w) for w in widths)
        self.output_activation = output_activation
        self.encoder = []
        for i, (w, k, s) in enumerate(zip(self.widths, self.KERNELS, self.STRIDES)):
            self.encoder += _conv_bn_relu(w, k, s, f"enc{i + 1}")
        self.head = keras.layers.Conv2D(self.num_classes, 1, activation=output_activation, name="category_maps")
        self.decoder = None

    def build(self, input_shape):
        h, w = int(input_shape[1]), int(input_shape[2])
        hs, ws = stride2_sizes(h, 4), stride2_sizes(w, 4)
        pads = _pads_2d(hs, ws)  # 4 mirrored steps: s4 -> s3 -> s2 -> s1 -> input
        used = pads if self.full_resolution else pads[:3]
        self.decoder = []
        for i, op in enumerate(used):
            self.decoder += _deconv_bn_relu(self.widths[-1], 3, op, f"dec{i + 1}")
        shape = tuple(input_shape)
        for layer in self.encoder + self.decoder:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        self.head.build(shape)
        self.built = True

    def output_size(self, height, width):
        """``(S, S')`` of the maps for an input of ``height x width``."""
        hs, ws = stride2_sizes(height, 1), stride2_sizes(width, 1)
        return (height, width) if self.full_resolution else (hs[1], ws[1])

    def call(self, images, training=None):
        x = images
        for layer in self.encoder + self.decoder:
            x = layer(x, training=training) if isinstance(layer, keras.layers.BatchNormalization) else layer(x)
        return self.head(x)

    def compute_output_shape(self, input_shape):
        s = self.output_size(int(input_shape[1]), int(input_shape[2]))
        return (input_shape[0], s[0], s[1], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, full_resolution=self.full_resolution,
                      widths=list(self.widths), output_activation=self.output_activation)
        return config


@keras.saving.register_keras_serializable(package="kerasdet")
class InstanceDecomposer(keras.layers.Layer):
    """One category map ``[N, S, S', 1]`` -> ``steps`` instance maps ``[N, steps, S, S']``.

    Args:
      steps: number of emitted maps T (static; default 11 = at most 10 digits + one black
        stop map; our choice, the paper gives no T).
      cell: ``"fc"`` (default, the paper's fully connected recurrent bottleneck) or
        ``"conv_gru"`` (all-convolutional: ConvGRU cells on the encoder grid).
      units: recurrent units per fully connected layer (paper: 2048).
      recurrent_layers: stacked recurrent layers (paper: 2, "rnn-fc-rnn-fc").
      conv_gru_filters: state channels of each ConvGRU layer for ``cell="conv_gru"``.
      filters: channels of the encoder/decoder convolutions (paper: 32).
      stages: stride-2 stages of the encoder (and decoder); None: the fewest that bring
        the map side to <= 8 (3 for 50x50, 4 for 100x100).
      recurrent_norm: ``"batch"`` (one BatchNormalization per step), ``"layer"`` or
        ``"none"``; see the module doc.
      output_activation: ``"relu"`` (default) or ``"sigmoid"`` on the instance maps.
      initial_state: ``cell="conv_gru"`` only: ``"zero"`` (default) or ``"input"``: each
        ConvGRU layer starts from ``tanh(conv3x3(code))`` of the encoded category map (a
        learned initial state; our option, the paper gives no recurrent details for the
        convolutional variant). From a zero state with the same input at every step the
        first update ``h_1 = z * candidate`` is gated down, and the first step gave the
        weakest map at the CPU budget (README, decompNet).
    """

    def __init__(self, *, steps=11, cell="fc", units=2048, recurrent_layers=2, conv_gru_filters=64,
                 filters=32, stages=None, recurrent_norm="batch", output_activation="relu", initial_state="zero",
                 **kwargs):
        super().__init__(**kwargs)
        if cell not in ("fc", "conv_gru"):
            raise ValueError(f"cell must be 'fc' or 'conv_gru', got {cell!r}")
        if recurrent_norm not in ("batch", "layer", "none"):
            raise ValueError(f"recurrent_norm must be 'batch', 'layer' or 'none', got {recurrent_norm!r}")
        if output_activation not in ("relu", "sigmoid"):
            raise ValueError(f"output_activation must be 'relu' or 'sigmoid', got {output_activation!r}")
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if initial_state not in ("zero", "input"):
            raise ValueError(f"initial_state must be 'zero' or 'input', got {initial_state!r}")
        if initial_state == "input" and cell != "conv_gru":
            raise ValueError("initial_state='input' is an option of cell='conv_gru'")
        self.initial_state = initial_state
        self.steps = int(steps)
        self.cell = cell
        self.units = int(units)
        self.recurrent_layers = int(recurrent_layers)
        self.conv_gru_filters = int(conv_gru_filters)
        self.filters = int(filters)
        self.stages = None if stages is None else int(stages)
        self.recurrent_norm = recurrent_norm
        self.output_activation = output_activation

    def _num_stages(self, h, w):
        if self.stages is not None:
            return self.stages
        n = 0
        while max(stride2_sizes(h, n)[-1], stride2_sizes(w, n)[-1]) > 8:
            n += 1
        return max(n, 1)

    def _norm(self, name):
        if self.recurrent_norm == "batch":
            return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=name)
        if self.recurrent_norm == "layer":
            return keras.layers.LayerNormalization(name=name)
        return None

    def build(self, input_shape):
        h, w = int(input_shape[1]), int(input_shape[2])
        n = self._num_stages(h, w)
        hs, ws = stride2_sizes(h, n), stride2_sizes(w, n)
        kernels = [5] + [3] * (n - 1)
        self.grid = (hs[-1], ws[-1])
        self.encoder = []
        for i, k in enumerate(kernels):
            self.encoder += _conv_bn_relu(self.filters, k, 2, f"enc{i + 1}")
        self.decoder = []
        for i, (k, op) in enumerate(zip(kernels[::-1], _pads_2d(hs, ws))):
            self.decoder += _deconv_bn_relu(self.filters, k, op, f"dec{i + 1}")
        self.head = keras.layers.Conv2D(1, 1, activation=self.output_activation, name="instance_map")
        gh, gw = self.grid
        if self.cell == "fc":
            flat = gh * gw * self.filters
            self.input_kernels = [keras.layers.Dense(self.units, name=f"rnn{i + 1}_w")
                                  for i in range(self.recurrent_layers)]
            self.recurrent_kernels = [keras.layers.Dense(self.units, use_bias=False, name=f"rnn{i + 1}_u")
                                      for i in range(self.recurrent_layers)]
            self.norms = [[self._norm(f"rnn{i + 1}_norm_t{t}") if self.recurrent_norm == "batch" else None
                           for t in range(self.steps)] for i in range(self.recurrent_layers)]
            if self.recurrent_norm == "layer":
                shared = [self._norm(f"rnn{i + 1}_norm") for i in range(self.recurrent_layers)]
                self.norms = [[shared[i]] * self.steps for i in range(self.recurrent_layers)]
            self.projection = [keras.layers.Dense(flat, use_bias=False, name="proj_dense"),
                               keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name="proj_bn"),
                               keras.layers.ReLU(name="proj_relu")]
            for i in range(self.recurrent_layers):
                self.input_kernels[i].build((None, flat if i == 0 else self.units))
                self.recurrent_kernels[i].build((None, self.units))
                for norm in {id(m): m for m in self.norms[i] if m is not None}.values():
                    norm.build((None, self.units))
            self.projection[0].build((None, self.units))
            self.projection[1].build((None, flat))
        else:
            from kerasdet.layers.conv_gru import ConvGRUCell

            self.gru_cells = [ConvGRUCell(filters=self.conv_gru_filters, name=f"conv_gru{i + 1}")
                              for i in range(self.recurrent_layers)]
            for i, cell in enumerate(self.gru_cells):
                cell.build((None, gh, gw, self.filters if i == 0 else self.conv_gru_filters))
            self.state_init = []
            if self.initial_state == "input":
                for i in range(self.recurrent_layers):
                    conv = keras.layers.Conv2D(self.conv_gru_filters, 3, padding="same", activation="tanh",
                                               name=f"init_state{i + 1}")
                    conv.build((None, gh, gw, self.filters))
                    self.state_init.append(conv)
        shape = tuple(input_shape)
        for layer in self.encoder:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        shape = (None, gh, gw, self.filters if self.cell == "fc" else self.conv_gru_filters)
        for layer in self.decoder:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        self.head.build(shape)
        self.built = True

    @staticmethod
    def _apply(layers, x, training):
        for layer in layers:
            x = layer(x, training=training) if isinstance(layer, keras.layers.BatchNormalization) else layer(x)
        return x

    def _recurrence(self, code, training):
        """Encoded map -> list of ``steps`` decoder inputs ``[N, gh, gw, c]``."""
        gh, gw = self.grid
        outputs = []
        if self.cell == "fc":
            z = keras.ops.reshape(code, (-1, gh * gw * self.filters))
            states = [None] * self.recurrent_layers
            for t in range(self.steps):  # static unroll over the T steps (not over data)
                x = z
                for i in range(self.recurrent_layers):
                    pre = self.input_kernels[i](x)
                    if states[i] is not None:  # h_0 = 0
                        pre = pre + self.recurrent_kernels[i](states[i])
                    norm = self.norms[i][t]
                    if norm is not None:
                        pre = norm(pre, training=training) if isinstance(norm, keras.layers.BatchNormalization) \
                            else norm(pre)
                    states[i] = keras.ops.relu(pre)
                    x = states[i]
                grid = self._apply(self.projection, x, training)
                outputs.append(keras.ops.reshape(grid, (-1, gh, gw, self.filters)))
        else:
            if self.state_init:
                states = [conv(code) for conv in self.state_init]
            else:
                zeros = keras.ops.zeros_like(code[..., :1]) * 0.0
                states = [keras.ops.tile(zeros, [1, 1, 1, self.conv_gru_filters])
                          for _ in range(self.recurrent_layers)]
            for _ in range(self.steps):
                x = code
                for i, cell in enumerate(self.gru_cells):
                    states[i] = cell(x, states[i])
                    x = states[i]
                outputs.append(x)
        return outputs

    def call(self, category_map, training=None):
        code = self._apply(self.encoder, category_map, training)
        per_step = self._recurrence(code, training)
        n = keras.ops.shape(category_map)[0]
        stacked = keras.ops.concatenate(per_step, axis=0)  # [T * N, gh, gw, c], step-major
        maps = self.head(self._apply(self.decoder, stacked, training))[..., 0]
        h, w = keras.ops.shape(maps)[1], keras.ops.shape(maps)[2]
        maps = keras.ops.reshape(maps, (self.steps, n, h, w))
        return keras.ops.transpose(maps, (1, 0, 2, 3))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.steps, input_shape[1], input_shape[2])

    def get_config(self):
        config = super().get_config()
        config.update(steps=self.steps, cell=self.cell, units=self.units,
                      recurrent_layers=self.recurrent_layers, conv_gru_filters=self.conv_gru_filters,
                      filters=self.filters, stages=self.stages, recurrent_norm=self.recurrent_norm,
                      output_activation=self.output_activation, initial_state=self.initial_state)
        return config


@keras.saving.register_keras_serializable(package="kerasdet")
class InstanceBoxRegressor(keras.layers.Layer):
    """Instance map ``[N, S, S']`` -> box ``(cx, cy, w, h)`` ``[N, 4]`` in [0, 1] of the map.

    The paper's "simple feed forward neural network ... 1 hidden layer with 4K hidden
    units" with dropout (§2.3); the sigmoid output keeps the box inside the normalized
    range the targets live in (our choice; §2.3 gives no output activation).

    Args:
      hidden: hidden units (paper: 4096).
      dropout: dropout rate after the hidden layer (rate not given; default 0.5).
    """

    def __init__(self, *, hidden=4096, dropout=0.5, **kwargs):
        super().__init__(**kwargs)
        self.hidden = int(hidden)
        self.dropout = float(dropout)
        self.flatten = keras.layers.Flatten()
        self.fc = keras.layers.Dense(self.hidden, activation="relu", name="fc")
        self.drop = keras.layers.Dropout(self.dropout)
        self.out = keras.layers.Dense(4, activation="sigmoid", name="box")

    def build(self, input_shape):
        flat = int(input_shape[1]) * int(input_shape[2])
        self.fc.build((None, flat))
        self.out.build((None, self.hidden))
        self.built = True

    def call(self, maps, training=None):
        x = self.flatten(maps)
        return self.out(self.drop(self.fc(x), training=training))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 4)

    def get_config(self):
        config = super().get_config()
        config.update(hidden=self.hidden, dropout=self.dropout)
        return config


def cxcywh_to_yxyx(boxes):
    """Normalized ``(cx, cy, w, h)`` -> normalized ``(ymin, xmin, ymax, xmax)``."""
    cx, cy, w, h = tf.unstack(boxes, axis=-1)
    return tf.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], axis=-1)


def box_raster(boxes, height, width):
    """Binary box masks ``[..., height, width]`` of normalized yxyx ``boxes`` ``[..., 4]``:
    a pixel belongs to a box when its centre ``((i + 0.5) / height, (j + 0.5) / width)``
    lies inside it."""
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    ys = (tf.range(height, dtype=tf.float32) + 0.5) / float(height)
    xs = (tf.range(width, dtype=tf.float32) + 0.5) / float(width)
    ymin, xmin, ymax, xmax = [b[..., None] for b in tf.unstack(boxes, axis=-1)]
    in_y = tf.cast((ys >= ymin) & (ys < ymax), tf.float32)  # [..., H]
    in_x = tf.cast((xs >= xmin) & (xs < xmax), tf.float32)  # [..., W]
    return in_y[..., :, None] * in_x[..., None, :]


def boxes_from_maps(maps, fraction=0.5):
    """Tight normalized yxyx boxes ``[..., 4]`` of instance maps ``[..., S, S']``: the
    smallest box holding every pixel at or above ``fraction`` of the map's peak (cell edges:
    rows ``r0..r1`` give ``[r0 / S, (r1 + 1) / S]``); a map without a positive pixel gives
    an empty box at 0. The paper obtains boxes from the maps with "a simple program" (§2.3)
    and gives no rule; this is ours (``DecompNet(box_source="maps")``)."""
    maps = tf.convert_to_tensor(maps, tf.float32)
    h, w = maps.shape[-2], maps.shape[-1]
    peak = tf.reduce_max(maps, axis=[-2, -1], keepdims=True)
    on = (maps >= float(fraction) * peak) & (peak > 0.0)
    return boxes_from_masks(on) / tf.constant([h, w, h, w], tf.float32)


def box_score(maps, boxes):
    """Eq. 5: ``g^T M(b) / A(b)``, the mean map value inside the box rasterized at the
    map's resolution. ``maps`` ``[..., S, S']``, ``boxes`` normalized yxyx ``[..., 4]``;
    an empty box scores 0."""
    maps = tf.convert_to_tensor(maps, tf.float32)
    raster = box_raster(boxes, maps.shape[-2], maps.shape[-1])
    area = tf.reduce_sum(raster, axis=[-2, -1])
    return tf.math.divide_no_nan(tf.reduce_sum(maps * raster, axis=[-2, -1]), area)


def mask_score(maps, delta=0.1):
    """Eq. 6: ``sum_i g_i 1[g_i > delta] / sum_i 1[g_i > delta]``, the mean activation of
    the pixels above the noise threshold (0 for a black map). ``maps`` ``[..., S, S']``."""
    maps = tf.convert_to_tensor(maps, tf.float32)
    on = tf.cast(maps > delta, tf.float32)
    return tf.math.divide_no_nan(tf.reduce_sum(maps * on, axis=[-2, -1]), tf.reduce_sum(on, axis=[-2, -1]))
