"""kerasdet.data.augment: boxes follow the pixels through resize, flip, jitter, crop, pad."""
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.data import augment


def _rect_image(h, w, boxes):
    """Box k painted 255 in channel k (pixel-edge yxyx integer boxes)."""
    image = np.zeros((h, w, 3), np.uint8)
    for k, (y0, x0, y1, x1) in enumerate(boxes):
        image[y0:y1, x0:x1, k] = 255
    return image


def _ink_box(channel):
    ys, xs = np.nonzero(channel > 127)
    if len(ys) == 0:
        return None
    return np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], np.float32)


@tf.function
def _preprocess(image, boxes, classes, crowd, seed):
    return augment.preprocess_example(image, boxes, classes, crowd, image_size=(64, 80),
                                      flip=True, scale_jitter=(0.6, 1.6), seed=seed,
                                      max_boxes=4)


def test_flip_boxes_horizontal_values():
    boxes = tf.constant([[1.0, 2.0, 3.0, 5.0], [0.0, 0.0, 4.0, 10.0]])
    out = augment.flip_boxes_horizontal(boxes, 10)
    np.testing.assert_allclose(out, [[1, 5, 3, 8], [0, 0, 4, 10]])
    np.testing.assert_allclose(augment.flip_boxes_horizontal(out, 10), boxes)


def test_rectangles_follow_flip_jitter_crop_and_pad():
    boxes = np.array([[10, 20, 40, 50], [45, 60, 58, 88]], np.int64)  # in a 60x90 image
    image = _rect_image(60, 90, boxes)
    seen = {"flip": 0, "noflip": 0, "crop": 0, "pad": 0, "dropped": 0}
    for s in range(24):
        out, out_boxes, classes, crowd, scale = (
            t.numpy() for t in _preprocess(image, boxes.astype(np.float32),
                                           np.array([0, 1], np.int32),
                                           np.array([False, False]), tf.constant([s, 7])))
        assert out.shape == (64, 80, 3) and out.dtype == np.float32
        new_h, new_w = round(60 * scale), round(90 * scale)
        seen["crop" if new_w > 80 or new_h > 64 else "pad"] += 1
        assert set(classes[classes >= 0]) <= {0, 1} and (classes[2:] == -1).all()
        assert not crowd.any()
        for k in (0, 1):
            truth = _ink_box(out[..., k])
            rows = np.flatnonzero(classes == k)
            if len(rows) == 0:  # dropped: (almost) nothing of it may remain visible
                seen["dropped"] += 1
                visible = (out[..., k] > 127).sum()
                assert visible < augment.MIN_VISIBLE_FRACTION * np.prod(
                    np.diff(boxes[k].reshape(2, 2), axis=0)) * scale ** 2 + 2 * (new_h + new_w)
                continue
            assert truth is not None
            np.testing.assert_allclose(out_boxes[rows[0]], truth, atol=1.0)
        if new_w <= 80 and new_h <= 64:  # no crop: box 0 (left of centre) tells a flip
            centre_x = out_boxes[np.flatnonzero(classes == 0)[0]][[1, 3]].mean()
            seen["flip" if centre_x > 0.5 * new_w else "noflip"] += 1
        # Padding region is exactly zero.
        assert (out[min(new_h, 64):] == 0).all() and (out[:, min(new_w, 80):] == 0).all()
    # Flipped and unflipped images both occur with padding (xmin' = new_w - xmax uses the
    # width before padding), and crops occur too.
    assert all(v > 0 for k, v in seen.items() if k != "dropped"), seen


def test_letterbox_resize_without_augmentation():
    boxes = np.array([[10, 20, 40, 50]], np.float32)
    image = _rect_image(60, 90, boxes.astype(np.int64))
    out, out_boxes, classes, _, scale = augment.preprocess_example(
        image, boxes, [3], [False], image_size=(64, 80), max_boxes=3)
    assert scale.numpy() == pytest.approx(80 / 90)
    new_h, new_w = round(60 * 80 / 90), 80  # 53 x 80, padded below
    expected = boxes * np.array([new_h / 60, new_w / 90] * 2, np.float32)
    np.testing.assert_allclose(out_boxes[0], expected[0], rtol=1e-6)
    np.testing.assert_allclose(out_boxes[0], _ink_box(out.numpy()[..., 0]), atol=1.0)
    assert classes.numpy().tolist() == [3, -1, -1]
    assert (out.numpy()[new_h:] == 0).all() and out.numpy()[: new_h].max() == 255


def test_identity_size_keeps_pixels_exactly():
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    out, boxes, classes, _, scale = augment.preprocess_example(
        image, np.zeros((0, 4), np.float32), np.zeros((0,), np.int32), np.zeros((0,), bool),
        image_size=(40, 48), max_boxes=2)
    assert scale.numpy() == 1.0
    np.testing.assert_array_equal(out.numpy()[:32], image.astype(np.float32))
    assert (out.numpy()[32:] == 0).all()
    assert classes.numpy().tolist() == [-1, -1] and (boxes.numpy() == 0).all()


def test_resize_scale_rules():
    fit = augment.resize_scale(60, 90, (64, 80))
    assert fit.numpy() == pytest.approx(80 / 90)
    # Detectron rule: short side -> 800 unless the long side would pass 1333.
    assert augment.resize_scale(480, 640, (1344, 1344), 800, 1333).numpy() == \
        pytest.approx(800 / 480)
    assert augment.resize_scale(300, 1000, (1344, 1344), 800, 1333).numpy() == \
        pytest.approx(1333 / 1000)
    assert augment.resize_scale(300, 1000, (1344, 1344), None, 500).numpy() == \
        pytest.approx(0.5)
    h, w = augment.resized_shape(300, 1000, augment.resize_scale(300, 1000, (0, 0), 800, 1333))
    assert (int(h), int(w)) == (400, 1333)


def test_clip_and_compact():
    boxes = tf.constant([[0.0, 0.0, 10.0, 10.0],     # inside
                         [5.0, 15.0, 10.0, 30.0],    # 1/3 visible (w=20 region): kept
                         [5.0, 18.0, 10.0, 30.0],    # 2/12 visible: dropped
                         [30.0, 0.0, 40.0, 5.0]])    # outside
    clipped, keep = augment.clip_boxes_to_region(boxes, tf.constant([20, 20]), 0.25)
    assert keep.numpy().tolist() == [True, True, False, False]
    np.testing.assert_allclose(clipped[1], [5, 15, 10, 20])
    classes = tf.constant([0, 1, 2, 3])
    crowd = tf.constant([True, False, False, False])
    keep = tf.constant([True, True, False, True])
    b, c, k = augment.compact_and_pad(boxes, classes, crowd, keep, max_boxes=5)
    assert c.numpy().tolist() == [1, 3, 0, -1, -1]  # non-crowd first, then crowd
    assert k.numpy().tolist() == [False, False, True, False, False]
    np.testing.assert_allclose(b[:3], tf.gather(boxes, [1, 3, 0]))
    assert (b.numpy()[3:] == 0).all()
    b, c, k = augment.compact_and_pad(boxes, classes, crowd, keep, max_boxes=2)
    assert c.numpy().tolist() == [1, 3] and b.shape == (2, 4)


def test_random_crop_offset_bounds_and_determinism():
    offsets = np.array([augment.random_crop_offset(100, 90, (64, 80), tf.constant([s, 1])).numpy()
                        for s in range(50)])
    assert offsets[:, 0].min() >= 0 and offsets[:, 0].max() <= 36
    assert offsets[:, 1].min() >= 0 and offsets[:, 1].max() <= 10
    assert len(np.unique(offsets[:, 0])) > 10
    small = augment.random_crop_offset(30, 40, (64, 80), tf.constant([3, 1]))
    assert small.numpy().tolist() == [0, 0]
    a = augment.random_crop_offset(100, 90, (64, 80), tf.constant([5, 9]))
    assert a.numpy().tolist() == augment.random_crop_offset(
        100, 90, (64, 80), tf.constant([5, 9])).numpy().tolist()


def test_seed_required_for_random_ops():
    with pytest.raises(ValueError, match="seed"):
        augment.preprocess_example(np.zeros((8, 8, 3), np.uint8), np.zeros((0, 4)), [], [],
                                   image_size=(8, 8), flip=True)
