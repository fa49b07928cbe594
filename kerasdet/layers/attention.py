"""Attention layers.

:class:`SelfAttention` is the attention unit of ASSD (Yi, Wu & Metaxas, "ASSD: Attentive
Single Shot Multibox Detector", 2019, §3.1, Eqs. 1-2, Fig. 2):

    q = W_q x,  k = W_k x  (1x1 convs C -> C/8, no bias),   v = W_v x  (1x1 conv C -> C, no bias)
    a = softmax_j(q_i . k_j)            (over the key positions j; no 1/sqrt(d) scaling)
    x' = x + sum_j a_ij v_j             (plain residual add: no learnable gamma, no output conv)

Where we chose (the paper is silent or misprinted):

* ``W_v`` is C x C (the paper prints C x C/8, which cannot be added back to ``x``; the
  authors' code uses ``Conv2d(c, c, 1)``).
* **Init.** The paper gives none; the authors' PyTorch code keeps ``nn.Conv2d``'s default,
  ``kaiming_uniform_(a=sqrt(5))`` = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), variance
  ``1 / (3 fan_in)`` (:func:`torch_conv_initializer`, our default). Keras' ``he_uniform``
  (variance ``2 / fan_in``, 6x more; the default here before) made the unit start far from
  the identity on the digits maps: on random post-ReLU maps the residual ``sum_j a_ij v_j``
  started at 1.1-1.35x the norm of ``x`` with near one-hot softmax rows (max probability up
  to 0.86); on ``[2, 16, 16, 96]`` / ``[2, 8, 8, 128]`` / ``[2, 4, 4, 128]`` ReLU'd normal
  maps we measured 1.19 / 1.24 / 1.29x with ``he_uniform`` and 0.34 / 0.31 / 0.34x with the
  PyTorch init (``tests/layers/test_attention.py`` checks the variance and the start).
* The logits and the softmax are computed in float32 even under a mixed-precision policy
  (at 65x65 the logits of one image are 4225^2 = 17.9M numbers; bfloat16 sums over 4225
  keys lose the small weights).
* ``query_block_size``: the memory-conscious path. Softmax rows are independent, so the
  queries can be processed in blocks of ``query_block_size`` rows against all keys: the
  forward pass then holds ``B * block * N`` scores instead of ``B * N * N`` (at 65x65 and
  block 1024: 4.3M instead of 17.9M per image). The result is the same as the dense path
  (tested). Under a ``GradientTape`` the blocks' probabilities are kept for the backward
  pass as usual, so the saving is for inference/serving; the paper trained with the full
  matrix (71 MB per image in float32).

:class:`CascadeAttention` is the attention block of Attention CoupleNet (Zhu et al., TIP 2019,
§III-B, Fig. 3, Eqs. 1-3), placed at the
end of conv2/conv3/conv4 of the backbone (the attended map is the next stage's input):

    g = conv3x3_1(ReLU(conv3x3_C(f)))     (Eq. 1: attention LOGITS, 1 channel, H_k x W_k)
    A = sigmoid(g) = 1 / (1 + exp(-g))    (Eq. 2)
    f_O = A * f                           (Eq. 3, broadcast over the D channels)

Where we chose (the paper is silent or misprinted):

* **Eq. 2 sign.** The paper prints ``a = 1 / (1 + exp(g))``, which lacks the minus sign; we
  use the standard sigmoid (the map is trained with sigmoid cross-entropy, 1 = object), so
  ``A`` grows with ``g``.
* **Width and non-linearity.** The paper gives neither the intermediate width nor the
  activation between the two convs ("omitted for simplicity"); default 256 channels
  (``channels``) and a ReLU.
* **Init.** Both kernels N(0, 0.01^2) (the paper), biases 0 (the usual convention), plus a
  ``bias_init`` option for the last conv: with zero-mean init ``A`` starts near 0.5, which
  halves every attended stage's input; a positive ``bias_init`` (e.g. 2-4) starts ``A``
  near 1 instead.
* **Multiplication.** ``A * f`` is the paper's form (default); ``residual=True`` gives
  ``(1 + A) * f`` (as in residual attention networks), an option for the ablation.
* The block returns the logits ``g`` (not ``A``) next to the attended features, so the loss
  (:func:`kerasdet.losses.attention_loss`) uses the stable logit form of the cross-entropy.
"""
import keras
import tensorflow as tf


def torch_conv_initializer(seed=None):
    """PyTorch's default ``nn.Conv2d`` / ``nn.Linear`` kernel init as a Keras initializer.

    ``kaiming_uniform_(w, a=sqrt(5))`` draws from U(-b, b) with ``b = gain * sqrt(3 / fan_in)``,
    ``gain = sqrt(2 / (1 + a^2)) = sqrt(1/3)``, so ``b = 1 / sqrt(fan_in)`` and the variance is
    ``1 / (3 fan_in)``: Keras' ``VarianceScaling(scale=1/3, mode="fan_in",
    distribution="uniform")`` (limit ``sqrt(3 * scale / fan_in)``), exactly.
    """
    return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform", seed=seed)


@keras.saving.register_keras_serializable(package="kerasdet")
class SelfAttention(keras.layers.Layer):
    """ASSD's non-local self-attention unit on a ``[B, H, W, C]`` feature map.

    Works at any (also dynamic) spatial size; the output has the input's shape.

    Args:
        reduction: ``C' = C // reduction`` channels for queries and keys. Default 8 (the paper).
        query_block_size: ``None`` (default) computes the ``[B, N, N]`` attention matrix at
            once; an integer processes the queries in blocks of that many positions (same
            result, bounded forward memory; see the module docstring).
        kernel_initializer: of the three 1x1 convs. Default ``None``:
            :func:`torch_conv_initializer` (PyTorch's default conv init, which the authors'
            code keeps; the paper gives none). ``"he_uniform"`` was the default before (see
            the module docstring).
    """

    def __init__(self, *, reduction=8, query_block_size=None, kernel_initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.reduction = int(reduction)
        if self.reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}.")
        if query_block_size is not None and int(query_block_size) < 1:
            raise ValueError(f"query_block_size must be None or >= 1, got {query_block_size}.")
        self.query_block_size = None if query_block_size is None else int(query_block_size)
        self.kernel_initializer = (
            torch_conv_initializer() if kernel_initializer is None else keras.initializers.get(kernel_initializer)
        )

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError("SelfAttention needs a known channel count.")
        key_channels = max(1, channels // self.reduction)

        def conv(filters, name):
            layer = keras.layers.Conv2D(
                filters, 1, use_bias=False, kernel_initializer=self.kernel_initializer,
                dtype=self.dtype_policy, name=name,
            )
            layer.build(input_shape)
            return layer

        self.query_conv = conv(key_channels, "query")
        self.key_conv = conv(key_channels, "key")
        self.value_conv = conv(channels, "value")
        self.built = True

    @staticmethod
    def _attend(q, k, v):
        """``softmax(q k^T) v`` for ``q [B, M, C']``, ``k [B, N, C']``, ``v [B, N, C]``."""
        logits = tf.matmul(q, k, transpose_b=True)  # [B, M, N], float32
        return tf.matmul(tf.nn.softmax(logits, axis=-1), v)

    def attention_weights(self, x):
        """The ``[B, N, N]`` softmax matrix (rows: queries, columns: keys), for inspection."""
        q, k, _ = self._project(x)
        return tf.nn.softmax(tf.matmul(q, k, transpose_b=True), axis=-1)

    def _project(self, x):
        shape = tf.shape(x)
        n = shape[1] * shape[2]

        def flat(t):
            return tf.reshape(tf.cast(t, tf.float32), [shape[0], n, t.shape[-1]])

        return flat(self.query_conv(x)), flat(self.key_conv(x)), flat(self.value_conv(x))

    def call(self, x):
        shape = tf.shape(x)
        q, k, v = self._project(x)
        if self.query_block_size is None:
            context = self._attend(q, k, v)
        else:
            context = self._blocked(q, k, v)
        context = tf.reshape(context, shape)
        return x + tf.cast(context, x.dtype)

    def _blocked(self, q, k, v):
        block = self.query_block_size
        b, n = tf.shape(q)[0], tf.shape(q)[1]
        num_blocks = (n + block - 1) // block
        q = tf.pad(q, [[0, 0], [0, num_blocks * block - n], [0, 0]])  # padded rows are dropped below
        q_blocks = tf.transpose(tf.reshape(q, [b, num_blocks, block, q.shape[-1]]), [1, 0, 2, 3])
        out = tf.map_fn(
            lambda qb: self._attend(qb, k, v),
            q_blocks,
            fn_output_signature=tf.TensorSpec([None, block, v.shape[-1]], tf.float32),
        )  # [num_blocks, B, block, C]
        out = tf.reshape(tf.transpose(out, [1, 0, 2, 3]), [b, num_blocks * block, v.shape[-1]])
        return out[:, :n]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            reduction=self.reduction,
            query_block_size=self.query_block_size,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config


@keras.saving.register_keras_serializable(package="kerasdet")
class CascadeAttention(keras.layers.Layer):
    """Attention CoupleNet's cascade attention block on a ``[B, H, W, D]`` feature map.

    ``call(features)`` returns ``(attended, logits)``: ``attended = sigmoid(g) * features``
    (``(1 + sigmoid(g)) * features`` with ``residual=True``), same shape and dtype as
    ``features``, and ``logits = g`` of shape ``[B, H, W, 1]`` (float32 even under a
    mixed-precision policy, for the loss). See the module docstring for the choices.

    Args:
        channels: output channels of the first 3x3 conv (default 256).
        residual: ``(1 + A) * f`` instead of the paper's ``A * f`` (default ``False``).
        bias_init: initial bias of the last conv (default 0.0: ``A`` starts near 0.5).
        kernel_stddev: std of the N(0, std^2) kernel init of both convs (default 0.01).
    """

    def __init__(self, *, channels=256, residual=False, bias_init=0.0, kernel_stddev=0.01, **kwargs):
        super().__init__(**kwargs)
        self.channels = int(channels)
        if self.channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}.")
        self.residual = bool(residual)
        self.bias_init = float(bias_init)
        self.kernel_stddev = float(kernel_stddev)

    def build(self, input_shape):
        if input_shape[-1] is None:
            raise ValueError("CascadeAttention needs a known channel count.")
        init = keras.initializers.RandomNormal(mean=0.0, stddev=self.kernel_stddev)
        self.hidden_conv = keras.layers.Conv2D(
            self.channels, 3, padding="same", activation="relu", kernel_initializer=init,
            bias_initializer="zeros", dtype=self.dtype_policy, name="hidden",
        )
        self.hidden_conv.build(input_shape)
        self.logits_conv = keras.layers.Conv2D(
            1, 3, padding="same", kernel_initializer=init,
            bias_initializer=keras.initializers.Constant(self.bias_init),
            dtype=self.dtype_policy, name="logits",
        )
        self.logits_conv.build(tuple(input_shape[:-1]) + (self.channels,))
        self.built = True

    def call(self, features):
        logits = tf.cast(self.logits_conv(self.hidden_conv(features)), tf.float32)
        attention = tf.sigmoid(logits)
        if self.residual:
            attention = 1.0 + attention
        attended = features * tf.cast(attention, features.dtype)
        return attended, logits

    def compute_output_shape(self, input_shape):
        return tuple(input_shape), tuple(input_shape[:-1]) + (1,)

    def compute_output_spec(self, features):
        return (
            keras.KerasTensor(features.shape, dtype=features.dtype),
            keras.KerasTensor(tuple(features.shape[:-1]) + (1,), dtype="float32"),
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            channels=self.channels,
            residual=self.residual,
            bias_init=self.bias_init,
            kernel_stddev=self.kernel_stddev,
        )
        return config
