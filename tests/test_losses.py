import keras
import numpy as np
import tensorflow as tf

from kerasdet import losses


def test_focal_matches_keras_and_hand_value():
    rng = np.random.RandomState(0)
    logits = rng.normal(size=(3, 5)).astype("float32")
    labels = (rng.uniform(size=(3, 5)) > 0.7).astype("float32")
    ours = losses.sigmoid_focal_loss(labels, logits, alpha=0.25, gamma=2.0).numpy()
    peer = keras.losses.BinaryFocalCrossentropy(
        apply_class_balancing=True, alpha=0.25, gamma=2.0, from_logits=True, reduction="none"
    )(labels[..., None], logits[..., None])
    np.testing.assert_allclose(ours, np.asarray(peer), rtol=1e-4, atol=1e-6)
    # hand value: y=1, p=0.9 -> 0.25 * 0.1^2 * -log(0.9)
    z = np.log(0.9 / 0.1)
    v = losses.sigmoid_focal_loss(tf.constant([1.0]), tf.constant([z]))
    np.testing.assert_allclose(v.numpy(), [0.25 * 0.01 * -np.log(0.9)], rtol=1e-5)
    # gamma=0, alpha disabled -> plain cross-entropy
    ce = losses.sigmoid_focal_loss(labels, logits, alpha=None, gamma=0.0).numpy()
    np.testing.assert_allclose(ce, tf.nn.sigmoid_cross_entropy_with_logits(labels, logits).numpy(), rtol=1e-6)


def test_focal_finite_for_extreme_logits():
    v = losses.sigmoid_focal_loss(tf.constant([1.0, 0.0]), tf.constant([-200.0, 200.0])).numpy()
    assert np.all(np.isfinite(v)) and np.all(v > 10)


def test_smooth_l1_equals_huber_over_beta():
    x = np.array([[-0.3, -0.05, 0.0, 0.02, 0.5, 2.0]], "float32")
    ours = losses.smooth_l1_loss(np.zeros_like(x), x, beta=0.11).numpy()
    huber = keras.losses.Huber(delta=0.11, reduction="none")
    peer = np.asarray(huber(np.zeros((6, 1), "float32"), x.reshape(6, 1))).reshape(-1) / 0.11
    np.testing.assert_allclose(ours[0], peer, rtol=1e-5)
    np.testing.assert_allclose(losses.smooth_l1_loss(0.0, x, beta=0.0).numpy(), np.abs(x))


def test_global_normalizer_default_strategy():
    assert float(losses.global_normalizer(0.0)) == 1.0
    assert float(losses.global_normalizer(7.0)) == 7.0
