import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.layers.attention import SelfAttention, torch_conv_initializer


def _x(b=2, h=5, w=7, c=16, seed=0):
    return tf.constant(np.random.RandomState(seed).normal(size=(b, h, w, c)).astype("float32"))


def numpy_attention(x, wq, wk, wv):
    """Eqs. 1-2 of the ASSD paper written out with numpy loops over positions."""
    b, h, w, c = x.shape
    out = np.array(x, dtype=np.float64)
    for n in range(b):
        flat = x[n].reshape(h * w, c).astype(np.float64)
        q, k, v = flat @ wq, flat @ wk, flat @ wv
        for i in range(h * w):
            a = np.array([q[i] @ k[j] for j in range(h * w)])
            a = np.exp(a - a.max())
            a /= a.sum()
            out[n].reshape(h * w, c)[i] += (a[:, None] * v).sum(axis=0)
    return out


def test_matches_numpy_reference_and_parameter_count():
    x = _x()
    layer = SelfAttention()
    y = layer(x).numpy()
    assert y.shape == x.shape
    wq, wk, wv = (l.kernel.numpy()[0, 0] for l in (layer.query_conv, layer.key_conv, layer.value_conv))
    assert wq.shape == (16, 2) and wk.shape == (16, 2) and wv.shape == (16, 16)
    np.testing.assert_allclose(y, numpy_attention(x.numpy(), wq, wk, wv), rtol=1e-4, atol=1e-4)
    # 1.25 C^2 parameters per unit, no bias (spec 002 §1.4)
    assert layer.count_params() == int(1.25 * 16 * 16)


def test_default_init_is_pytorchs_conv_default():
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): variance 1 / (3 fan_in), by hand; he_uniform is 2 / fan_in."""
    c = 128
    layer = SelfAttention()
    layer.build((None, 8, 8, c))
    for conv in (layer.query_conv, layer.key_conv, layer.value_conv):
        w = conv.kernel.numpy()
        assert np.abs(w).max() <= 1.0 / np.sqrt(c) + 1e-7
        np.testing.assert_allclose(w.var(), 1.0 / (3 * c), rtol=0.1)
    w = torch_conv_initializer(seed=1)((3, 3, 64, 32)).numpy()  # fan_in = 3 * 3 * 64
    np.testing.assert_allclose(w.var(), 1.0 / (3 * 576), rtol=0.05)
    assert np.abs(w).max() <= 1.0 / np.sqrt(576) + 1e-7


def test_default_init_starts_near_the_identity_he_uniform_does_not():
    """The attention term's norm relative to x on ReLU'd maps of the digits shapes: ~0.3x with
    the PyTorch init, > 1x with he_uniform (its softmax rows near one-hot)."""
    x = tf.nn.relu(_x(2, 8, 8, 128, seed=3))
    ratios = {}
    for init in (None, "he_uniform"):
        keras.utils.set_random_seed(0)
        layer = SelfAttention(kernel_initializer=init)
        ratios[init] = float(tf.norm(layer(x) - x) / tf.norm(x))
    assert ratios[None] < 0.5 < 1.0 < ratios["he_uniform"]


def test_softmax_rows_sum_to_one():
    x = _x(h=4, w=3)
    a = SelfAttention()
    a(x)
    weights = a.attention_weights(x).numpy()
    assert weights.shape == (2, 12, 12)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-6)
    assert (weights > 0).all()


def test_zero_value_weights_give_identity():
    x = _x()
    layer = SelfAttention()
    layer(x)
    layer.value_conv.kernel.assign(tf.zeros_like(layer.value_conv.kernel))
    np.testing.assert_array_equal(layer(x).numpy(), x.numpy())


def test_single_position_reduces_to_x_plus_value_projection():
    x = _x(h=1, w=1)
    layer = SelfAttention()
    y = layer(x).numpy()
    wv = layer.value_conv.kernel.numpy()[0, 0]
    np.testing.assert_allclose(y, x.numpy() + x.numpy() @ wv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [1, 8, 35, 64])
def test_blocked_path_equals_dense(block):
    x = _x(h=5, w=7)  # N = 35: blocks that divide it, do not, and exceed it
    dense = SelfAttention()
    y_dense = dense(x).numpy()
    blocked = SelfAttention(query_block_size=block)
    blocked(x)
    blocked.set_weights(dense.get_weights())
    np.testing.assert_allclose(blocked(x).numpy(), y_dense, rtol=1e-5, atol=1e-5)


def test_dynamic_spatial_size_in_a_graph():
    layer = SelfAttention(query_block_size=16)
    layer(_x(h=3, w=3))
    fn = tf.function(layer.call, input_signature=[tf.TensorSpec([None, None, None, 16], tf.float32)])
    for h, w in ((3, 3), (9, 4), (1, 20)):
        x = _x(b=1, h=h, w=w)
        np.testing.assert_allclose(fn(x).numpy(), layer(x).numpy(), rtol=1e-5, atol=1e-5)


def test_gradients_reach_input_and_all_three_projections():
    x = _x()
    for block in (None, 8):
        layer = SelfAttention(query_block_size=block)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(layer(x)))
        grads = tape.gradient(loss, [x] + layer.trainable_variables)
        assert len(layer.trainable_variables) == 3
        for g in grads:
            assert g is not None and np.isfinite(g.numpy()).all() and np.abs(g.numpy()).sum() > 0


def test_mixed_precision_softmax_in_float32():
    x = _x()
    layer = SelfAttention(dtype="mixed_bfloat16")
    y = layer(tf.cast(x, tf.bfloat16))
    assert y.dtype == tf.bfloat16
    ref = SelfAttention()
    ref(x)
    ref.set_weights(layer.get_weights())
    np.testing.assert_allclose(tf.cast(y, tf.float32).numpy(), ref(x).numpy(), atol=0.1, rtol=0.05)


def test_config_round_trip_and_keras_serialization():
    layer = SelfAttention(reduction=4, query_block_size=128, name="att")
    clone = SelfAttention.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, SelfAttention) and restored.query_block_size == 128 and restored.reduction == 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="query_block_size"):
        SelfAttention(query_block_size=0)
    with pytest.raises(ValueError, match="reduction"):
        SelfAttention(reduction=0)


# --- CascadeAttention (Attention CoupleNet, spec 004 §1.2) ---------------------------------

from kerasdet.layers.attention import CascadeAttention  # noqa: E402


def _conv3x3_same(x, kernel, bias):
    """numpy 'same' 3x3 conv, x [B, H, W, C], kernel [3, 3, C, F]."""
    b, h, w, _ = x.shape
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((b, h, w, kernel.shape[-1]))
    for dy in range(3):
        for dx in range(3):
            out += padded[:, dy:dy + h, dx:dx + w, :] @ kernel[dy, dx].astype(np.float64)
    return out + bias


def test_cascade_attention_matches_numpy_forward():
    x = _x(b=2, h=6, w=5, c=4, seed=1)
    layer = CascadeAttention(channels=8, kernel_stddev=0.3)
    attended, logits = layer(x)
    assert tuple(attended.shape) == (2, 6, 5, 4) and tuple(logits.shape) == (2, 6, 5, 1)
    hidden = np.maximum(_conv3x3_same(x.numpy(), *layer.hidden_conv.get_weights()), 0.0)
    g = _conv3x3_same(hidden, *layer.logits_conv.get_weights())
    np.testing.assert_allclose(logits.numpy(), g, rtol=1e-4, atol=1e-5)
    a = 1.0 / (1.0 + np.exp(-g))  # standard sigmoid (the paper's Eq. 2 lacks the minus)
    np.testing.assert_allclose(attended.numpy(), a * x.numpy(), rtol=1e-4, atol=1e-5)
    # two convs: 9*C*channels + channels, 9*channels + 1
    assert layer.count_params() == 9 * 4 * 8 + 8 + 9 * 8 + 1
    res_attended, _ = CascadeAttention(channels=8, residual=True, kernel_stddev=0.3)(x)
    assert res_attended.shape == x.shape


def test_cascade_attention_residual_and_init():
    x = _x(b=1, h=4, w=4, c=3)
    layer = CascadeAttention(channels=16, residual=True, bias_init=2.0)
    attended, logits = layer(x)
    for conv in (layer.hidden_conv, layer.logits_conv):
        assert abs(float(np.std(conv.kernel.numpy())) - 0.01) < 0.005
    np.testing.assert_array_equal(layer.hidden_conv.bias.numpy(), 0.0)
    np.testing.assert_array_equal(layer.logits_conv.bias.numpy(), 2.0)
    # N(0, 0.01) kernels: g ~ bias, A ~ sigmoid(2); residual gives (1 + A) * f
    a = 1.0 / (1.0 + np.exp(-logits.numpy()))
    np.testing.assert_allclose(attended.numpy(), (1.0 + a) * x.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits.numpy(), 2.0, atol=0.05)


def test_cascade_attention_config_round_trip():
    layer = CascadeAttention(channels=12, residual=True, bias_init=1.5, kernel_stddev=0.02, name="att")
    config = layer.get_config()
    clone = CascadeAttention.from_config(config)
    assert clone.get_config() == config
    assert (clone.channels, clone.residual, clone.bias_init, clone.kernel_stddev) == (12, True, 1.5, 0.02)
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(revived, CascadeAttention) and revived.get_config() == config
    with pytest.raises(TypeError):
        CascadeAttention(12)  # keyword-only


def test_cascade_attention_in_functional_model_and_gradients():
    inputs = keras.Input((None, None, 4))
    attended, logits = CascadeAttention(channels=8, kernel_stddev=0.1, name="att")(inputs)
    model = keras.Model(inputs, {"f": attended, "g": logits})
    assert tuple(model.output["g"].shape) == (None, None, None, 1)
    x = _x(b=2, h=5, w=5, c=4, seed=2)
    layer = model.get_layer("att")
    with tf.GradientTape() as tape:
        out = model(x)
        loss = tf.reduce_sum(out["f"]) + tf.reduce_sum(out["g"])
    grads = tape.gradient(loss, layer.trainable_weights)
    assert len(grads) == 4  # both convs' kernels and biases
    for var, grad in zip(layer.trainable_weights, grads):
        assert grad is not None and float(tf.reduce_max(tf.abs(grad))) > 0, var.path
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(clone(x)["f"], out["f"], rtol=1e-6, atol=1e-6)
