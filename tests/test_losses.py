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


# --- attention_loss (Attention CoupleNet Eq. 4, attention term) ------------------------------

def _bce(z, y):
    return np.log1p(np.exp(-abs(z))) + max(z, 0.0) - z * y


def test_attention_targets_area_average_threshold_and_ignore():
    fg = np.zeros((1, 4, 6), np.uint8)  # stride 2 -> 2x3 cells
    fg[0, 0:2, 0:2] = [[1, 1], [1, 0]]      # 3/4 object -> 1
    fg[0, 0:2, 2:4] = [[1, 1], [0, 0]]      # 1/2 object -> 1 (threshold >= 0.5)
    fg[0, 0:2, 4:6] = [[1, 0], [0, 0]]      # 1/4 -> 0
    fg[0, 2:4, 0:2] = [[255, 255], [255, 1]]  # 3/4 ignore -> ignored
    fg[0, 2:4, 2:4] = [[255, 255], [1, 0]]  # half ignore: valid, 1 of 2 valid pixels -> 1
    fg[0, 2:4, 4:6] = [[255, 0], [0, 1]]    # 1 of 3 valid -> 0
    targets, valid = losses.attention_targets(fg, 2, 3)
    np.testing.assert_array_equal(targets.numpy(), [[[1, 1, 0], [0, 1, 0]]])
    np.testing.assert_array_equal(valid.numpy(), [[[1, 1, 1], [0, 1, 1]]])
    # threshold 0.25: the 1/4 cell becomes positive, 1 of 3 valid (1/3) too
    targets, valid = losses.attention_targets(fg, 2, 3, threshold=0.25)
    np.testing.assert_array_equal(targets.numpy(), [[[1, 1, 1], [0, 1, 1]]])
    np.testing.assert_array_equal(valid.numpy(), [[[1, 1, 1], [0, 1, 1]]])


def test_attention_targets_of_a_thin_stroke_digit():
    """A hand-made '1': a 3 px wide, 28 px tall stroke on a 32x32 image. At stride 16 no cell is
    half ink (3*16 / 256 = 0.19 of the two cells it crosses), so the default 0.5 rule teaches
    the block to switch the digit off; 0.15 keeps it; stride 4 keeps it at 0.5."""
    fg = np.zeros((1, 32, 32), np.uint8)
    fg[0, 2:30, 6:9] = 1  # columns 6-8: inside cell column 0 of stride 16
    t16, _ = losses.attention_targets(fg, 2, 2)
    assert t16.numpy().sum() == 0
    t16, _ = losses.attention_targets(fg, 2, 2, threshold=0.15)
    np.testing.assert_array_equal(t16.numpy(), [[[1, 0], [1, 0]]])  # 42/256 and 42/256 ink
    t4, _ = losses.attention_targets(fg, 8, 8)  # stride 4: columns 4-7 hold 2 of 4 ink columns
    np.testing.assert_array_equal(t4.numpy()[0, :, 1], [0, 1, 1, 1, 1, 1, 1, 0])  # rows 4-27 full, 0-3 / 28-31 half
    assert t4.numpy().sum() == 6  # column 8 is 1 of 4 ink columns of cell column 2: never positive


def test_attention_targets_ceil_sizes_pad_as_ignore():
    # 5x5 input at stride 2 -> 3x3 cells; the last row/column blocks overhang the image
    fg = np.ones((1, 5, 5), np.uint8)
    targets, valid = losses.attention_targets(fg, 3, 3)
    # border blocks: 2 of 4 pixels inside (half ignore -> kept); corner: 1 of 4 -> ignored
    np.testing.assert_array_equal(valid.numpy()[0], [[1, 1, 1], [1, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(targets.numpy()[0], [[1, 1, 1], [1, 1, 1], [1, 1, 0]])
    # explicit stride gives the same; a stride-4 map of a 16x16 input averages 4x4 blocks
    t2, v2 = losses.attention_targets(fg, 3, 3, stride=2)
    np.testing.assert_array_equal(t2.numpy(), targets.numpy())
    big = np.zeros((2, 16, 16), np.uint8)
    big[1, :8, :4] = 1
    t4, v4 = losses.attention_targets(big, 4, 4)
    np.testing.assert_array_equal(t4.numpy()[1], [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert float(t4.numpy()[0].sum()) == 0 and float(v4.numpy().min()) == 1


def test_attention_loss_matches_hand_computed_value():
    rng = np.random.RandomState(0)
    fg = np.zeros((2, 8, 8), np.uint8)
    fg[0, 0:4, 0:6] = 1
    fg[0, 6:8, 6:8] = 255       # one ignored 2x2 cell at stride 2, a quarter cell at stride 4
    fg[1, 4:8, 4:8] = 1
    logits_s2 = rng.normal(size=(2, 4, 4, 1)).astype("float32")
    logits_s4 = rng.normal(size=(2, 2, 2)).astype("float32")  # rank-3 maps are fine too
    got = losses.attention_loss([tf.constant(logits_s2), tf.constant(logits_s4)], tf.constant(fg))

    # by hand: per image, per map, mean BCE over the non-ignored cells; sum maps and images
    expected = 0.0
    for n in range(2):
        for logits, s in ((logits_s2[..., 0], 2), (logits_s4, 4)):
            terms = []
            for i in range(8 // s):
                for j in range(8 // s):
                    block = fg[n, i * s:(i + 1) * s, j * s:(j + 1) * s].astype(int)
                    ign = np.mean(block == 255)
                    if ign > 0.5:
                        continue
                    obj = np.mean(block == 1)
                    y = 1.0 if obj >= 0.5 * (1 - ign) else 0.0
                    terms.append(_bce(float(logits[n, i, j]), y))
            expected += np.mean(terms)
    assert got.dtype == tf.float32 and got.shape == ()
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    # the ignored cell at stride 2 is really left out: its logit does not matter
    changed = logits_s2.copy()
    changed[0, 3, 3, 0] = 50.0
    again = losses.attention_loss([changed, logits_s4], fg)
    np.testing.assert_allclose(again.numpy(), got.numpy(), rtol=1e-6)


def test_attention_loss_is_a_local_sum_over_images_and_handles_all_ignore():
    fg = np.ones((3, 8, 8), np.uint8)
    fg[2] = 255  # an all-crowd image adds nothing
    logits = np.zeros((3, 2, 2, 1), "float32")  # p = 0.5 everywhere: BCE = log 2 per cell
    got = losses.attention_loss([logits], fg)
    np.testing.assert_allclose(got.numpy(), 2 * np.log(2.0), rtol=1e-6)
    # single tensor instead of a list; explicit strides; gradients flow to the logits
    g = tf.Variable(np.zeros((1, 2, 2, 1), "float32"))
    with tf.GradientTape() as tape:
        loss = losses.attention_loss(g, fg[:1], strides=[4])
    grad = tape.gradient(loss, g).numpy()
    np.testing.assert_allclose(grad, (0.5 - 1.0) / 4.0, rtol=1e-6)  # (p - y) / N_k
    # inside a tf.function with dynamic shapes
    fn = tf.function(lambda l, f: losses.attention_loss([l], f), input_signature=[
        tf.TensorSpec([None, None, None, 1], tf.float32), tf.TensorSpec([None, None, None], tf.uint8)])
    np.testing.assert_allclose(fn(logits, fg).numpy(), got.numpy(), rtol=1e-6)
