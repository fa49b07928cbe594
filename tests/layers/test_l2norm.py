import numpy as np
import tensorflow as tf

from kerasdet.layers.l2norm import L2Normalization


def test_values_gradient_and_config():
    x = np.random.RandomState(0).normal(size=(2, 3, 4, 5)).astype("float32")
    layer = L2Normalization(scale=20.0)
    y = layer(tf.constant(x)).numpy()
    np.testing.assert_allclose(y, 20 * x / np.linalg.norm(x, axis=-1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 20.0, rtol=1e-5)
    assert layer(tf.zeros((1, 2, 2, 5))).numpy().tolist() == np.zeros((1, 2, 2, 5)).tolist()  # no NaN at 0
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(tf.constant(x)) * tf.constant(x))
    assert np.isfinite(tape.gradient(loss, layer.gamma).numpy()).all()
    assert layer.count_params() == 5
    assert L2Normalization.from_config(layer.get_config()).get_config() == layer.get_config()
