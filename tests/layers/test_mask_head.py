"""Mask R-CNN mask branch: head shapes and config, RoI mask targets, the mask loss."""
import keras
import numpy as np
import tensorflow as tf

from kerasdet.layers.mask_head import MaskHead, mask_loss, mask_targets, select_class_masks


def test_head_shapes_parameters_and_config_round_trip():
    head = MaskHead(num_classes=5, num_convs=2, channels=8, name="mask_head")
    out = head(tf.zeros((2, 3, 14, 14, 6)))
    assert out.shape == (2, 3, 28, 28, 5)
    assert head(tf.zeros((4, 14, 14, 6))).shape == (4, 28, 28, 5)
    conv = lambda k, cin, cout: k * k * cin * cout + cout
    assert head.count_params() == conv(3, 6, 8) + conv(3, 8, 8) + conv(2, 8, 8) + conv(1, 8, 5)
    agnostic = MaskHead(num_classes=5, num_convs=1, channels=4, class_agnostic=True)
    assert agnostic(tf.zeros((1, 2, 7, 7, 3))).shape == (1, 2, 14, 14, 1)
    config = head.get_config()
    clone = MaskHead.from_config(config)
    assert clone.get_config() == config and config["class_agnostic"] is False and config["roi_output_size"] == 14
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(agnostic))
    assert isinstance(restored, MaskHead) and restored.class_agnostic and restored.num_masks == 1


def _square_masks():
    masks = np.zeros((1, 2, 32, 32), np.uint8)
    masks[0, 0, 2:30, 2:30] = 1  # instance 0: a 28-px square, so 28x28 targets sample its pixel centres
    masks[0, 1, 0:2, :] = 1  # instance 1: the top rows
    return masks


def test_targets_are_the_matched_mask_resampled_over_each_roi():
    rois = np.array([[[2, 2, 30, 30],  # exactly instance 0's box -> all ones
                      [2, 16, 30, 44],  # shifted right by half its width -> left half ones
                      [2, 2, 30, 30]]], np.float32)  # same box, matched to instance 1 -> zeros
    matched = np.array([[0, 0, 1]], np.int32)
    t = mask_targets(_square_masks(), rois, matched, size=28).numpy()
    assert t.shape == (1, 3, 28, 28)
    np.testing.assert_array_equal(t[0, 0], np.ones((28, 28)))
    np.testing.assert_array_equal(t[0, 1, :, :14], np.ones((28, 14)))
    np.testing.assert_array_equal(t[0, 1, :, 14:], np.zeros((28, 14)))
    np.testing.assert_array_equal(t[0, 2], np.zeros((28, 28)))
    # an RoI twice the square's size, centred on it: ones in the middle half
    big = mask_targets(_square_masks(), np.array([[[-12, -12, 44, 44]]], np.float32), np.zeros((1, 1), np.int32),
                       size=28).numpy()[0, 0]
    assert big[7:21, 7:21].all() and big.sum() == 14 * 14
    # a small RoI is bilinear resampling: the 8x8 square [8, 16)^2 at 28x28 loses only its
    # four corner samples (0.643^2 < 0.5)
    small = np.zeros((1, 1, 32, 32), np.uint8)
    small[0, 0, 8:16, 8:16] = 1
    t = mask_targets(small, np.array([[[8, 8, 16, 16]]], np.float32), np.zeros((1, 1), np.int32)).numpy()[0, 0]
    assert t.sum() == 28 * 28 - 4 and t[1:-1].all() and t[:, 1:-1].all()


def test_select_class_masks_takes_each_rois_channel():
    logits = tf.reshape(tf.range(2 * 2 * 3, dtype=tf.float32), (1, 2, 1, 1, 6))  # [B, R, 1, 1, K]
    picked = select_class_masks(tf.tile(logits, (1, 1, 2, 2, 1)), tf.constant([[4, 1]])).numpy()
    np.testing.assert_array_equal(picked[0, 0], np.full((2, 2), 4.0))
    np.testing.assert_array_equal(picked[0, 1], np.full((2, 2), 7.0))
    # class-agnostic logits (one channel): that channel for every class
    agnostic = select_class_masks(tf.ones((1, 2, 3, 3, 1)), tf.constant([[4, -1]])).numpy()
    assert agnostic.shape == (1, 2, 3, 3) and np.all(agnostic == 1.0)


def test_loss_uses_only_positive_rois_and_the_matched_class_channel():
    rng = np.random.RandomState(0)
    logits = rng.normal(size=(2, 3, 4, 4, 3)).astype(np.float32)
    targets = (rng.uniform(size=(2, 3, 4, 4)) > 0.5).astype(np.float32)
    classes = np.array([[2, 0, 1], [1, 1, 0]], np.int32)
    positive = np.array([[True, False, True], [False, True, False]])
    ref = float(mask_loss(logits, targets, classes, positive))
    # hand computation: mean over pixels of the own channel's BCE, averaged over the 3 positives
    bce = lambda z, y: np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
    expected = np.mean([bce(logits[b, r, :, :, classes[b, r]], targets[b, r]).mean()
                        for b, r in [(0, 0), (0, 2), (1, 1)]])
    np.testing.assert_allclose(ref, expected, rtol=1e-5)
    changed = logits.copy()
    changed[0, 0, :, :, 0] += 5.0  # another class's channel of a positive RoI
    changed[0, 1] = 100.0  # every channel of a negative RoI
    changed[1, 2] = np.inf
    np.testing.assert_allclose(float(mask_loss(changed, targets, classes, positive)), ref, rtol=1e-6)
    changed[0, 0, :, :, 2] += 1.0  # the matched channel does count
    assert abs(float(mask_loss(changed, targets, classes, positive)) - ref) > 1e-3


def test_loss_without_positives_is_zero_with_zero_gradient():
    logits = tf.Variable(tf.random.normal((1, 4, 28, 28, 2)))
    with tf.GradientTape() as tape:
        loss = mask_loss(logits, tf.ones((1, 4, 28, 28)), tf.zeros((1, 4), tf.int32), tf.zeros((1, 4), tf.bool))
    grad = tape.gradient(loss, logits)
    assert float(loss) == 0.0 and np.all(grad.numpy() == 0.0)


def test_tiny_hand_computed_value():
    # one positive RoI, 1x1 mask, logit 0 -> log 2; the negative RoI's logit is ignored
    logits = np.array([[[[[0.0, 3.0]]], [[[9.0, 9.0]]]]], np.float32)  # [1, 2, 1, 1, 2]
    loss = mask_loss(logits, np.ones((1, 2, 1, 1), np.float32), np.array([[0, 1]]), np.array([[True, False]]))
    np.testing.assert_allclose(float(loss), np.log(2.0), rtol=1e-6)
