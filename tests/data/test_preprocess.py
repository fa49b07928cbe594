"""kerasdet.data.preprocess: boxes follow the pixels through resize, flip, jitter, crop and
pad (preprocess_example), and through SSD's photometric / expand / IoU-crop chain."""
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.boxes import iou
from kerasdet.data import preprocess
from kerasdet.data.geometry import MIN_VISIBLE_FRACTION
from kerasdet.data.preprocess import (
    MEAN_PIXEL,
    iou_random_crop,
    photometric_distort,
    random_expand,
    ssd_augment,
)


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
    return preprocess.preprocess_example(image, boxes, classes, crowd, image_size=(64, 80),
                                      flip=True, scale_jitter=(0.6, 1.6), seed=seed,
                                      max_boxes=4)


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
                assert visible < MIN_VISIBLE_FRACTION * np.prod(
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
    out, out_boxes, classes, _, scale = preprocess.preprocess_example(
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
    out, boxes, classes, _, scale = preprocess.preprocess_example(
        image, np.zeros((0, 4), np.float32), np.zeros((0,), np.int32), np.zeros((0,), bool),
        image_size=(40, 48), max_boxes=2)
    assert scale.numpy() == 1.0
    np.testing.assert_array_equal(out.numpy()[:32], image.astype(np.float32))
    assert (out.numpy()[32:] == 0).all()
    assert classes.numpy().tolist() == [-1, -1] and (boxes.numpy() == 0).all()


def test_seed_required_for_random_ops():
    with pytest.raises(ValueError, match="seed"):
        preprocess.preprocess_example(np.zeros((8, 8, 3), np.uint8), np.zeros((0, 4)), [], [],
                                   image_size=(8, 8), flip=True)


def painted(h=60, w=80, boxes=((10, 10, 30, 40), (35, 50, 55, 75))):
    """A black image with each box painted in its own solid colour (channel i = 255)."""
    image = np.zeros((h, w, 3), "float32")
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        image[y0:y1, x0:x1, i] = 255.0
    return tf.constant(image), tf.constant(np.array(boxes, "float32"))


def painted_extent(image, channel):
    ys, xs = np.nonzero(np.asarray(image)[..., channel] > 200)
    return [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]


@pytest.mark.parametrize("seed", range(6))
def test_expand_moves_boxes_with_the_pixels(seed):
    image, boxes = painted()
    out, out_boxes = random_expand(image, boxes, tf.constant([seed, 1]), probability=1.0)
    assert out.shape[0] >= 60 and out.shape[1] >= 80 and out.shape[0] <= 240
    for i in range(2):
        np.testing.assert_allclose(painted_extent(out, i), out_boxes.numpy()[i])
    # the new border holds the mean pixel
    if out.shape[0] > 60 or out.shape[1] > 80:
        corner = out.numpy()[-1, -1] if out_boxes.numpy()[0, 0] == 10 else out.numpy()[0, 0]
        np.testing.assert_allclose(corner, MEAN_PIXEL, rtol=1e-5)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("mode", [0.3, 0.7, -1.0])
def test_crop_keeps_centred_objects_meets_min_iou_and_moves_boxes(seed, mode):
    image, boxes = painted()
    valid = tf.constant([True, True])
    out, out_boxes, keep = iou_random_crop(image, boxes, valid, tf.constant([seed, 2]), mode=mode)
    out_boxes, keep = out_boxes.numpy(), keep.numpy()
    assert keep.any()
    h, w = out.shape[0], out.shape[1]
    if (h, w) != (60, 80):  # a crop was found: check the mode's constraint on the original boxes
        assert 0.5 <= h / w <= 2.0 and h >= 0.3 * 60 - 1 and w >= 0.3 * 80 - 1
        for i in np.nonzero(keep)[0]:
            np.testing.assert_allclose(painted_extent(out, i), out_boxes[i])  # clipped box = visible paint
        if mode > 0:
            # offset of the crop: the shift that maps original to new coordinates
            i = np.nonzero(keep)[0][0]
            shift = np.array(painted_extent(image, i)) - np.array(painted_extent(out, i))
            if out_boxes[i, 0] > 0 and out_boxes[i, 1] > 0:
                crop = np.array([shift[0], shift[1], shift[0] + h, shift[1] + w], "float32")
                assert iou(tf.constant(crop[None]), boxes).numpy().min() >= mode - 1e-5


def test_crop_whole_mode_and_no_objects():
    image, boxes = painted()
    out, out_boxes, keep = iou_random_crop(image, boxes, tf.constant([True, True]), tf.constant([0, 0]), mode=0)
    assert out.shape == image.shape and keep.numpy().all()
    np.testing.assert_allclose(out_boxes, boxes)
    # an image without objects may still be cropped, and keeps none
    out, _, keep = iou_random_crop(image, boxes, tf.constant([False, False]), tf.constant([0, 3]), mode=-1)
    assert not keep.numpy().any() and out.shape[0] <= 60


def test_photometric_is_pixelwise_bounded_and_seeded():
    image = tf.fill([8, 8, 3], 100.0)
    outs = [photometric_distort(image, tf.constant([s, 0])).numpy() for s in range(10)]
    for out in outs:
        assert out.shape == (8, 8, 3) and out.min() >= 0 and out.max() <= 255
        np.testing.assert_allclose(out, out[:1, :1].repeat(8, 0).repeat(8, 1), atol=1e-3)  # uniform stays uniform
    assert len({tuple(np.round(o[0, 0], 3)) for o in outs}) > 3  # seeds differ
    np.testing.assert_array_equal(outs[0], photometric_distort(image, tf.constant([0, 0])).numpy())


def test_full_chain_in_tf_data_keeps_labels_consistent():
    image, boxes = painted()
    classes = tf.constant([0, 1])
    crowd = tf.constant([False, False])

    def aug(i):
        return ssd_augment(image, boxes, classes, crowd, tf.stack([i, tf.constant(7, tf.int64)]),
                           photometric=False, flip=True)

    for out, b, c, k in tf.data.Dataset.range(12).map(aug):
        assert b.shape[0] == c.shape[0] == k.shape[0]
        for box, cls in zip(b.numpy(), c.numpy()):
            assert box[2] > box[0] and box[3] > box[1]
            y0, x0, y1, x1 = np.round(box).astype(int)
            patch = out.numpy()[y0:y1, x0:x1, cls]
            assert patch.size and (patch > 200).mean() > 0.95  # the box still frames its paint
