"""ConvGRUCell (kerasdet.layers.conv_gru) against a hand-unrolled numpy ConvGRU."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.layers.conv_gru import ConvGRUCell


def _conv_same(x, w):
    """Naive same-padded stride-1 conv: x [B,H,W,C], w [k,k,C,O] (cross-correlation, as TF)."""
    k = w.shape[0]
    p = (k - 1) // 2
    b, h, wd, _ = x.shape
    xp = np.pad(x, ((0, 0), (p, k - 1 - p), (p, k - 1 - p), (0, 0)))
    out = np.zeros((b, h, wd, w.shape[-1]), np.float64)
    for i in range(k):
        for j in range(k):
            out += np.einsum("bhwc,co->bhwo", xp[:, i : i + h, j : j + wd, :], w[i, j])
    return out


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _numpy_gru(xs, s, wx, wu_rz, wu_h, bias, g, f):
    """Hand-unrolled standard ConvGRU over the steps of xs (list of [B,H,W,C])."""
    states = []
    for x in xs:
        wr, wz, wh = wx[..., :g], wx[..., g : 2 * g], wx[..., 2 * g :]
        ur, uz = wu_rz[..., :g], wu_rz[..., g:]
        br, bz, bh = bias[:g], bias[g : 2 * g], bias[2 * g :]
        r = _sigmoid(_conv_same(x, wr) + _conv_same(s, ur) + br)
        z = _sigmoid(_conv_same(x, wz) + _conv_same(s, uz) + bz)
        r = np.repeat(r, f // g, axis=-1)
        z = np.repeat(z, f // g, axis=-1)
        cand = np.tanh(_conv_same(x, wh) + _conv_same(r * s, wu_h) + bh)
        s = (1 - z) * s + z * cand
        states.append(s)
    return states


@pytest.mark.parametrize("gate_channels,kernel_size", [(None, 3), (1, 3), (2, 1)])
def test_matches_hand_unrolled_numpy_gru(gate_channels, kernel_size):
    rng = np.random.RandomState(0)
    b, h, w, c, f, steps = 2, 5, 6, 3, 4, 4
    cell = ConvGRUCell(f, kernel_size, gate_channels=gate_channels, bias_initializer="random_normal")
    xs = [rng.normal(size=(b, h, w, c)).astype("float32") for _ in range(steps)]
    s0 = rng.uniform(-1, 1, size=(b, h, w, f)).astype("float32")
    s = tf.constant(s0)
    got = []
    for x in xs:
        s = cell(tf.constant(x), s)  # step-function convention: tensor in, tensor out
        assert s.shape == (b, h, w, f)
        got.append(s.numpy())
    g = f if gate_channels is None else gate_channels
    assert cell.input_kernel.shape == (kernel_size, kernel_size, c, 2 * g + f)
    assert cell.recurrent_kernel.shape == (kernel_size, kernel_size, f, 2 * g)
    assert cell.candidate_kernel.shape == (kernel_size, kernel_size, f, f)
    want = _numpy_gru(
        xs, s0.astype(np.float64), cell.input_kernel.numpy(), cell.recurrent_kernel.numpy(),
        cell.candidate_kernel.numpy(), cell.bias.numpy(), g, f,
    )
    for a, e in zip(got, want):
        np.testing.assert_allclose(a, e, atol=2e-5)
    # tanh candidate + convex update keep a state started in [-1, 1] inside it
    assert np.abs(got[-1]).max() <= 1.0


def test_one_channel_gate_is_shared_over_channels():
    cell = ConvGRUCell(8, gate_channels=1)
    x = tf.random.normal((1, 4, 4, 3))
    s = tf.zeros((1, 4, 4, 8))
    out = cell(x, s)
    assert out.shape == (1, 4, 4, 8)
    assert cell.count_params() == 3 * 3 * 3 * (2 + 8) + 3 * 3 * 8 * 2 + 3 * 3 * 8 * 8 + (2 + 8)
    # with s = 0 the new state is z * tanh(W_h x + b_h): one z per location => the ratio
    # out / tanh(candidate) is constant over the channels
    xw = tf.nn.conv2d(x, cell.input_kernel, 1, "SAME") + cell.bias
    z = tf.sigmoid(xw[..., 1:2]).numpy()
    np.testing.assert_allclose(out.numpy(), z * np.tanh(xw[..., 2:].numpy()), atol=1e-6)
    with pytest.raises(ValueError):
        ConvGRUCell(8, gate_channels=3)


def test_get_config_round_trip_and_serialization():
    cell = ConvGRUCell(6, 3, gate_channels=2, name="gru")
    x = tf.random.normal((1, 4, 4, 5))
    s = tf.random.uniform((1, 4, 4, 6), -1, 1)
    y = cell(x, s)
    config = cell.get_config()
    assert config["filters"] == 6 and config["kernel_size"] == 3 and config["gate_channels"] == 2
    clone = ConvGRUCell.from_config(config)
    assert clone.get_config() == config
    clone(x, s)
    clone.set_weights(cell.get_weights())
    np.testing.assert_allclose(clone(x, s).numpy(), y.numpy(), atol=1e-6)
    revived = keras.layers.deserialize(keras.layers.serialize(cell))
    assert isinstance(revived, ConvGRUCell) and revived.get_config() == config


def test_inside_keras_rnn_equals_unrolled_steps_and_trains():
    rng = np.random.RandomState(1)
    cell = ConvGRUCell(4)
    rnn = keras.layers.RNN(cell, return_sequences=True, return_state=True)
    seq = tf.constant(rng.normal(size=(2, 3, 5, 5, 2)).astype("float32"))  # [B, T, H, W, C]
    out, last = rnn(seq)  # zero initial state from get_initial_state
    assert out.shape == (2, 3, 5, 5, 4) and last.shape == (2, 5, 5, 4)
    s = tf.zeros((2, 5, 5, 4))
    for t in range(3):
        s = cell(seq[:, t], s)
        np.testing.assert_allclose(out[:, t].numpy(), s.numpy(), atol=1e-5)
    np.testing.assert_allclose(last.numpy(), s.numpy(), atol=1e-5)
    # gradients reach every weight through the unrolled steps (BPTT)
    with tf.GradientTape() as tape:
        s = tf.zeros((2, 5, 5, 4))
        for t in range(3):
            s = cell(seq[:, t], s)
        loss = tf.reduce_sum(tf.square(s - 0.5))
    grads = tape.gradient(loss, cell.trainable_weights)
    assert len(grads) == 4 and all(gr is not None and np.abs(gr.numpy()).sum() > 0 for gr in grads)


def test_static_shapes_in_tf_function():
    cell = ConvGRUCell(4)

    @tf.function(input_signature=[tf.TensorSpec((None, 7, 7, 3)), tf.TensorSpec((None, 7, 7, 4))])
    def run(x, s):
        for _ in range(3):
            s = cell(x, s)
        return s

    out = run(tf.ones((2, 7, 7, 3)), tf.zeros((2, 7, 7, 4)))
    assert out.shape == (2, 7, 7, 4)
    assert run.get_concrete_function().structured_outputs.shape.as_list() == [None, 7, 7, 4]
