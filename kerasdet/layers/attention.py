"""Attention layers.

:class:`SelfAttention` is the attention unit of ASSD (Yi, Wu & Metaxas, "ASSD: Attentive
Single Shot Multibox Detector", seed 002, §3.1, Eqs. 1-2; spec ``002_assd.md`` §1.4):

    q = W_q x,  k = W_k x  (1x1 convs C -> C/8, no bias),   v = W_v x  (1x1 conv C -> C, no bias)
    a = softmax_j(q_i . k_j)            (over the key positions j; no 1/sqrt(d) scaling)
    x' = x + sum_j a_ij v_j             (plain residual add: no learnable gamma, no output conv)

Where we chose (the paper is silent or misprinted):

* ``W_v`` is C x C (the paper prints C x C/8, which cannot be added back to ``x``; the
  authors' code uses ``Conv2d(c, c, 1)``).
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
"""
import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="kerasdet")
class SelfAttention(keras.layers.Layer):
    """ASSD's non-local self-attention unit on a ``[B, H, W, C]`` feature map.

    Works at any (also dynamic) spatial size; the output has the input's shape.

    Args:
        reduction: ``C' = C // reduction`` channels for queries and keys. Default 8 (the paper).
        query_block_size: ``None`` (default) computes the ``[B, N, N]`` attention matrix at
            once; an integer processes the queries in blocks of that many positions (same
            result, bounded forward memory; see the module docstring).
        kernel_initializer: of the three 1x1 convs. Default ``"he_uniform"`` (PyTorch's
            default conv init, which the authors' code keeps; the paper gives none).
    """

    def __init__(self, *, reduction=8, query_block_size=None, kernel_initializer="he_uniform", **kwargs):
        super().__init__(**kwargs)
        self.reduction = int(reduction)
        if self.reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}.")
        if query_block_size is not None and int(query_block_size) < 1:
            raise ValueError(f"query_block_size must be None or >= 1, got {query_block_size}.")
        self.query_block_size = None if query_block_size is None else int(query_block_size)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

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
