"""Convolutional GRU cell (Chung et al. 2014 GRU with convolutions for the fc weights).

Spatial Memory Network (Chen & Gupta 2017, Sec. 4.4) writes its memory with a ConvGRU of
3x3 filters; decompNet's all-convolutional recurrent variant reuses the same cell. The
paper writes no equations; this is the standard form (our choice), with ``*`` a
same-padded ``kernel_size`` convolution and ``⊙`` elementwise::

    r  = sigmoid(W_r * x + U_r * s + b_r)          # reset gate
    z  = sigmoid(W_z * x + U_z * s + b_z)          # update gate
    s~ = tanh(W_h * x + U_h * (r ⊙ s) + b_h)       # candidate (reset applied BEFORE U_h)
    s' = (1 - z) ⊙ s + z ⊙ s~

``gate_channels`` is the gates' width: ``None`` (default) means ``filters`` (one gate per
channel, the standard form); ``1`` is the iter-reason variant (one gate per location,
broadcast over the channels); any ``g`` with ``filters % g == 0`` is accepted, each gate
channel then covering ``filters // g`` consecutive state channels.

Weights: ``input_kernel`` ``[k, k, C_in, 2g + F]`` (W_r | W_z | W_h), ``recurrent_kernel``
``[k, k, F, 2g]`` (U_r | U_z), ``candidate_kernel`` ``[k, k, F, F]`` (U_h) and ``bias``
``[2g + F]`` (b_r | b_z | b_h). The split of U into two kernels is because U_h acts on
``r ⊙ s``, not on ``s``.

Two calling conventions:

* **Step function** (SMN's write, any static-shape unrolled loop): ``cell(x, s)`` with
  tensors ``x [B, H, W, C_in]`` and ``s [B, H, W, F]`` returns the new state tensor
  ``[B, H, W, F]`` (the output of a GRU *is* its state).
* **Keras RNN cell**: ``cell(x, [s])`` (states as a list, what ``keras.layers.RNN`` passes)
  returns ``(s', [s'])``. ``state_size`` is ``-1`` (custom, as Keras' ConvLSTMCell) and
  ``get_initial_state(batch_size)`` returns zeros at the built spatial size, so
  ``keras.layers.RNN(ConvGRUCell(F), return_sequences=True)(x_seq)`` runs a
  ``[B, T, H, W, C]`` sequence (eager / tf.function; the symbolic functional-API shape
  inference of ``keras.layers.RNN`` expects an int ``output_size`` and is not supported).
"""
import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="kerasdet")
class ConvGRUCell(keras.layers.Layer):
    """Convolutional GRU cell with same-padded ``kernel_size`` convolutions.

    Args:
        filters: state channels ``F``.
        kernel_size: square kernel of every conv. Default 3 (SMN).
        gate_channels: width of the reset/update gates; ``None`` = ``filters`` (standard),
            ``1`` = one gate per location (iter-reason). Must divide ``filters``.
        kernel_initializer / recurrent_initializer / bias_initializer: Keras initializers
            for the input kernel, the two recurrent kernels and the bias.
    """

    def __init__(
        self,
        filters,
        kernel_size=3,
        *,
        gate_channels=None,
        kernel_initializer="glorot_uniform",
        recurrent_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.gate_channels = self.filters if gate_channels is None else int(gate_channels)
        if self.gate_channels < 1 or self.filters % self.gate_channels:
            raise ValueError(f"gate_channels={gate_channels} must divide filters={filters}")
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.recurrent_initializer = keras.initializers.get(recurrent_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.state_size = -1  # custom (spatial); see get_initial_state
        self.spatial_dims = None

    def build(self, inputs_shape, states_shape=None):
        k, f, g = self.kernel_size, self.filters, self.gate_channels
        c_in = inputs_shape[-1]
        if c_in is None:
            raise ValueError("ConvGRUCell needs a static input channel count")
        self.spatial_dims = tuple(inputs_shape[1:3])
        self.input_kernel = self.add_weight(
            name="input_kernel", shape=(k, k, c_in, 2 * g + f), initializer=self.kernel_initializer
        )
        self.recurrent_kernel = self.add_weight(
            name="recurrent_kernel", shape=(k, k, f, 2 * g), initializer=self.recurrent_initializer
        )
        self.candidate_kernel = self.add_weight(
            name="candidate_kernel", shape=(k, k, f, f), initializer=self.recurrent_initializer
        )
        self.bias = self.add_weight(name="bias", shape=(2 * g + f,), initializer=self.bias_initializer)
        self.built = True

    def _broadcast_gate(self, gate):
        rep = self.filters // self.gate_channels
        if rep == 1:
            return gate
        return tf.repeat(gate, rep, axis=-1)  # [B,H,W,g] -> [B,H,W,F]; rep==F for g == 1

    def step(self, x, state):
        """One GRU step on tensors: ``x [B,H,W,C_in]``, ``state [B,H,W,F]`` -> ``[B,H,W,F]``."""
        g = self.gate_channels
        state = tf.cast(state, self.compute_dtype)
        x = tf.cast(x, self.compute_dtype)
        xw = tf.nn.conv2d(x, tf.cast(self.input_kernel, x.dtype), 1, "SAME") + tf.cast(self.bias, x.dtype)
        su = tf.nn.conv2d(state, tf.cast(self.recurrent_kernel, x.dtype), 1, "SAME")
        r = tf.sigmoid(xw[..., :g] + su[..., :g])
        z = tf.sigmoid(xw[..., g : 2 * g] + su[..., g:])
        r = self._broadcast_gate(r)
        z = self._broadcast_gate(z)
        cand = tf.tanh(xw[..., 2 * g :] + tf.nn.conv2d(r * state, tf.cast(self.candidate_kernel, x.dtype), 1, "SAME"))
        return (1.0 - z) * state + z * cand

    def call(self, inputs, states):
        if isinstance(states, (list, tuple)):  # keras.layers.RNN protocol
            new = self.step(inputs, states[0])
            return new, [new]
        return self.step(inputs, states)

    def get_initial_state(self, batch_size=None):
        if self.spatial_dims is None or None in self.spatial_dims:
            raise ValueError("ConvGRUCell.get_initial_state needs a cell built on static spatial dims")
        return [tf.zeros((batch_size,) + self.spatial_dims + (self.filters,), dtype=self.compute_dtype)]

    def compute_output_shape(self, inputs_shape, states_shape=None):
        out = tuple(inputs_shape[:-1]) + (self.filters,)
        if isinstance(states_shape, (list, tuple)) and states_shape and isinstance(states_shape[0], (list, tuple)):
            return out, [out]
        return out

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            kernel_size=self.kernel_size,
            gate_channels=self.gate_channels,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            recurrent_initializer=keras.initializers.serialize(self.recurrent_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
        )
        return config
