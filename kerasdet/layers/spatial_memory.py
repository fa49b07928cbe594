"""Spatial memory of the Spatial Memory Network (Chen & Gupta 2017, Sec. 4.1-4.5).

The memory ``S`` is a ``[B, H', W', D]`` map at the backbone feature stride (``conv5_3``,
1/16). Pieces (all graph code with static shapes; one box per image per write):

* :func:`crop_one_box` — tf-faster-rcnn's crop (``crop_and_resize`` of the feature-unit
  box ``box_px / stride``, normalized by ``(H' - 1)``: the first and last samples lie ON
  the box edges) to ``crop_size x crop_size``, no max-pool (Sec. 4.3: "RoI pooling
  (without taking Max)"). Boxes are clamped to at least one memory cell per side (our
  choice) and wrapped in ``stop_gradient`` (footnote 6: no gradient to boxes).
* :func:`paste_one_box` — the reverse RoI op (Sec. 4.4; as the authors' later iter-reason
  code does, Chen et al. 2018, "Iterative Visual Reasoning Beyond Convolutions"): the patch is
  resampled onto the ``H' x W'`` grid by ``crop_and_resize`` of the inverse box
  ``[(0 - y1) / h, (0 - x1) / w, (H' - 1 - y1) / h, (W' - 1 - x1) / w]`` (made robust to
  cells lying exactly on a box edge: edge-padded patch + explicit inside mask, see the
  function). Cells outside the box get exactly 0, cells inside get the
  bilinear interpolation of the patch at their position, so pasting a crop of a map
  reproduces the map inside the box wherever the map is bilinear (tests).
* :class:`MemoryPrior` — the learned ``prior_size x prior_size x D`` initial memory (the
  "photographic bias", Sec. 4.1), resized bilinearly to each image's ``H' x W'``. Zero
  initialised (iter-reason; the paper does not say).
* :class:`InputModule` — the write's input (Sec. 4.3, Fig. 3): the ``crop x crop`` feature
  crop concatenated with the detection's full softmax (``K + 1`` values) tiled to every
  location, then two 1x1 convs with ``D`` outputs and ReLU (widths/activations are our
  choice; the paper gives none). Both inputs are stop-gradient.
* :class:`MemoryWrite` — input module + :class:`~kerasdet.layers.conv_gru.ConvGRUCell` on
  the crop of the old memory, then ``S_n = S_{n-1} + paste(s' - s, box)`` (the
  difference is pasted, so cells outside the box stay unchanged).
* :class:`ContextNet` — the 5-layer residual all-conv net (Sec. 4.5; the layout of iter-reason's ``_context``):
  ``c1 = conv1(S); c3 = c1 + conv3(relu(conv2(relu(c1)))); m5 = c3 +
  conv5(relu(conv4(relu(c3))))`` and ``relu(m5)`` (``m-conv5``; the final ReLU is our
  choice, as with ``conv5_3``). Any odd number of layers >= 1 is accepted.
"""
import keras
import tensorflow as tf

from kerasdet.layers.conv_gru import ConvGRUCell


def _feature_box(boxes, stride):
    """Input-pixel yxyx ``[B, 4]`` -> clamped feature-unit yxyx (cell i at position i)."""
    b = tf.stop_gradient(tf.cast(boxes, tf.float32)) / float(stride)
    y1, x1, y2, x2 = tf.unstack(b, 4, axis=-1)
    cy, cx = (y1 + y2) / 2.0, (x1 + x2) / 2.0
    h = tf.maximum(y2 - y1, 1.0)
    w = tf.maximum(x2 - x1, 1.0)
    return cy - h / 2.0, cx - w / 2.0, cy + h / 2.0, cx + w / 2.0


def crop_one_box(features, boxes, *, stride, crop_size):
    """``features [B, H', W', C]``, ``boxes [B, 4]`` input px -> ``[B, crop, crop, C]``."""
    shape = tf.shape(features)
    hf = tf.cast(tf.maximum(shape[1] - 1, 1), tf.float32)
    wf = tf.cast(tf.maximum(shape[2] - 1, 1), tf.float32)
    y1, x1, y2, x2 = _feature_box(boxes, stride)
    norm = tf.stack([y1 / hf, x1 / wf, y2 / hf, x2 / wf], axis=-1)
    return tf.image.crop_and_resize(features, norm, tf.range(shape[0]), [crop_size, crop_size])


def paste_one_box(patch, boxes, *, stride, height, width, tolerance=1e-3):
    """Reverse crop: ``patch [B, c, c, D]`` placed at ``boxes [B, 4]`` (input px) on an
    ``height x width`` grid, zero outside the box. Returns ``[B, height, width, D]``.

    Memory cell ``i`` (rows; columns alike) sits at patch coordinate
    ``(i - y1) / (y2 - y1) * (c - 1)``. A cell exactly on a box edge would be dropped by
    ``crop_and_resize``'s extrapolation test after float rounding (so a box spanning one
    cell would write nothing); the patch is therefore edge-padded by one row/column, the
    inverse box shifted accordingly, and cells farther than ``tolerance`` cells outside the
    box are zeroed by an explicit mask.
    """
    c = patch.shape[1]
    y1, x1, y2, x2 = _feature_box(boxes, stride)
    h, w = y2 - y1, x2 - x1
    hm = tf.cast(height, tf.float32) - 1.0
    wm = tf.cast(width, tf.float32) - 1.0
    padded = tf.pad(patch, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")  # edge replication
    span = float(c + 1)
    inv = tf.stack([
        (1.0 - y1 / h * (c - 1)) / span, (1.0 - x1 / w * (c - 1)) / span,
        (1.0 + (hm - y1) / h * (c - 1)) / span, (1.0 + (wm - x1) / w * (c - 1)) / span,
    ], axis=-1)
    out = tf.image.crop_and_resize(padded, inv, tf.range(tf.shape(patch)[0]), tf.stack([height, width]),
                                   extrapolation_value=0.0)
    rows = tf.range(height, dtype=tf.float32)[None, :]
    cols = tf.range(width, dtype=tf.float32)[None, :]
    in_y = (rows >= y1[:, None] - tolerance) & (rows <= y2[:, None] + tolerance)  # [B, H']
    in_x = (cols >= x1[:, None] - tolerance) & (cols <= x2[:, None] + tolerance)  # [B, W']
    mask = tf.cast(in_y[:, :, None] & in_x[:, None, :], out.dtype)[..., None]
    return out * mask


@keras.saving.register_keras_serializable(package="kerasdet")
class MemoryPrior(keras.layers.Layer):
    """Learned initial memory ``[prior_size, prior_size, channels]``, bilinearly resized.

    ``call(features)`` returns ``[B, H', W', channels]`` for a ``[B, H', W', C]`` map.
    """

    def __init__(self, *, channels=256, prior_size=20, **kwargs):
        super().__init__(**kwargs)
        self.channels = int(channels)
        self.prior_size = int(prior_size)

    def build(self, input_shape):
        self.prior = self.add_weight(name="prior", shape=(self.prior_size, self.prior_size, self.channels),
                                     initializer="zeros")
        self.built = True

    def call(self, features):
        shape = tf.shape(features)
        resized = tf.image.resize(tf.cast(self.prior, tf.float32)[None], shape[1:3], method="bilinear")
        return tf.tile(resized, [shape[0], 1, 1, 1])

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels, prior_size=self.prior_size)
        return config


@keras.saving.register_keras_serializable(package="kerasdet")
class InputModule(keras.layers.Layer):
    """``concat[crop, tile(scores)]`` -> 2 x (1x1 conv(channels) + ReLU).

    ``call(crop [B, c, c, C], scores [B, K+1])`` -> ``[B, c, c, channels]``.
    """

    def __init__(self, *, channels=256, **kwargs):
        super().__init__(**kwargs)
        self.channels = int(channels)
        self.conv1 = keras.layers.Conv2D(self.channels, 1, activation="relu", dtype=self.dtype_policy, name="conv1")
        self.conv2 = keras.layers.Conv2D(self.channels, 1, activation="relu", dtype=self.dtype_policy, name="conv2")

    def build(self, crop_shape, scores_shape):
        self.conv1.build(tuple(crop_shape[:-1]) + (crop_shape[-1] + scores_shape[-1],))
        self.conv2.build(tuple(crop_shape[:-1]) + (self.channels,))
        self.built = True

    def call(self, crop, scores):
        crop = tf.stop_gradient(crop)
        scores = tf.stop_gradient(tf.cast(scores, crop.dtype))
        shape = tf.shape(crop)
        tiled = tf.tile(scores[:, None, None, :], [1, shape[1], shape[2], 1])
        return self.conv2(self.conv1(tf.concat([crop, tiled], axis=-1)))

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels)
        return config


@keras.saving.register_keras_serializable(package="kerasdet")
class MemoryWrite(keras.layers.Layer):
    """One memory write: ``call(memory, features, boxes [B, 4] px, scores [B, K+1])`` ->
    the new memory (same shape; cells outside each image's box unchanged).

    Args:
        channels: memory depth D. stride: the maps' stride (16 for ``conv5_3``).
        crop_size: 14 (Sec. 4.3). gate_channels: ConvGRU gate width (``None`` = D,
            ``1`` = iter-reason's one gate per location).
    """

    def __init__(self, *, channels=256, stride=16, crop_size=14, gate_channels=None, **kwargs):
        super().__init__(**kwargs)
        self.channels = int(channels)
        self.stride = int(stride)
        self.crop_size = int(crop_size)
        self.gate_channels = None if gate_channels is None else int(gate_channels)
        self.input_module = InputModule(channels=self.channels, dtype=self.dtype_policy, name="input_module")
        self.gru = ConvGRUCell(self.channels, 3, gate_channels=self.gate_channels, dtype=self.dtype_policy,
                               name="conv_gru")

    def build(self, memory_shape, features_shape, boxes_shape, scores_shape):
        c = self.crop_size
        self.input_module.build((None, c, c, features_shape[-1]), (None, scores_shape[-1]))
        self.gru.build((None, c, c, self.channels))
        self.built = True

    def call(self, memory, features, boxes, scores):
        shape = tf.shape(memory)
        x = self.input_module(crop_one_box(features, boxes, stride=self.stride, crop_size=self.crop_size), scores)
        old = crop_one_box(memory, boxes, stride=self.stride, crop_size=self.crop_size)
        new = self.gru(x, old)
        return memory + paste_one_box(new - old, boxes, stride=self.stride, height=shape[1], width=shape[2])

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels, stride=self.stride, crop_size=self.crop_size,
                      gate_channels=self.gate_channels)
        return config


@keras.saving.register_keras_serializable(package="kerasdet")
class ContextNet(keras.layers.Layer):
    """All-convolutional residual context model (3x3, ``channels`` wide, odd ``num_layers``):
    ``c1 = conv1(x)``, then residual blocks of two convs with pre-ReLU, ReLU at the end."""

    def __init__(self, *, channels=256, num_layers=5, **kwargs):
        super().__init__(**kwargs)
        if num_layers < 1 or num_layers % 2 == 0:
            raise ValueError(f"num_layers must be odd, got {num_layers}")
        self.channels = int(channels)
        self.num_layers = int(num_layers)
        self.convs = [
            keras.layers.Conv2D(self.channels, 3, padding="same", dtype=self.dtype_policy, name=f"conv{i + 1}")
            for i in range(self.num_layers)
        ]

    def build(self, input_shape):
        self.convs[0].build(tuple(input_shape))
        for conv in self.convs[1:]:
            conv.build(tuple(input_shape[:-1]) + (self.channels,))
        self.built = True

    def call(self, x):
        x = self.convs[0](x)
        for i in range(1, self.num_layers, 2):
            x = x + self.convs[i + 1](tf.nn.relu(self.convs[i](tf.nn.relu(x))))
        return tf.nn.relu(x)

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels, num_layers=self.num_layers)
        return config
