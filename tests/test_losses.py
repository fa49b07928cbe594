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


def _ssd_pytorch_reference(targets, logits, box_t, box_p, ratio=3):
    """ssd.pytorch's MultiBoxLoss (the ASSD authors' loss), re-written in numpy."""
    b, a, _ = logits.shape
    lse = np.log(np.exp(logits).sum(-1))
    ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    pos = targets > 0
    loss_c = np.where(pos, 0.0, lse - logits[..., 0])
    idx = np.argsort(-loss_c, axis=1, kind="stable")
    rank = np.argsort(idx, axis=1, kind="stable")
    num_neg = np.minimum(ratio * pos.sum(1), a - 1)
    neg = (rank < num_neg[:, None]) & ~pos
    conf = ce[pos | neg].sum()
    d = np.abs(box_t - box_p)
    loc = (np.where(d < 1, 0.5 * d * d, d - 0.5).sum(-1) * pos).sum()
    return conf, loc, pos.sum()


def test_multibox_loss_matches_ssd_reference():
    rng = np.random.RandomState(0)
    b, a, k = 3, 40, 4
    targets = np.zeros((b, a), "int32")
    targets[0, [1, 5, 9]] = [1, 2, 3]
    targets[1, [0, 39]] = [4, 1]  # image 2 has no objects: no negatives either (SSD code)
    logits = rng.normal(size=(b, a, k + 1)).astype("float32")
    box_t = rng.normal(size=(b, a, 4)).astype("float32")
    box_p = rng.normal(size=(b, a, 4)).astype("float32")
    conf, loc, n = losses.multibox_loss(tf.constant(targets), tf.constant(logits), tf.constant(box_t), tf.constant(box_p))
    ref = _ssd_pytorch_reference(targets, logits.astype("float64"), box_t, box_p)
    np.testing.assert_allclose([conf.numpy(), loc.numpy(), n.numpy()], ref, rtol=1e-5)


def test_hard_negative_mask_hand_case():
    neg_loss = tf.constant([[0.1, 0.9, 0.5, 0.7, 0.3, 0.2], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    negatives = tf.constant([[True, True, False, True, True, True], [True] * 6])
    # image 0: 1 positive (anchor 2) -> 3 hardest negatives 1, 3, 4; image 1: none -> 0 (or min_negatives)
    mask = losses.hard_negative_mask(neg_loss, negatives, tf.constant([1, 0]))
    assert mask.numpy().tolist() == [[False, True, False, True, True, False], [False] * 6]
    mask = losses.hard_negative_mask(neg_loss, negatives, tf.constant([1, 0]), min_negatives=2)
    assert mask.numpy()[1].tolist() == [False, False, False, False, True, True]
    # capped at num_anchors - 1 candidates; ignored anchors never mined
    mask = losses.hard_negative_mask(neg_loss, negatives, tf.constant([5, 5]))
    assert mask.numpy()[0].tolist() == [True, True, False, True, True, True]
    assert mask.numpy()[1].sum() == 5
