import numpy as np
import pytest
import tensorflow as tf

from kerasdet.data.ssd_augment import (
    MEAN_PIXEL,
    iou_random_crop,
    photometric_distort,
    random_expand,
    ssd_augment,
)
from kerasdet.boxes import iou


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


@pytest.mark.parametrize("repeat", [False, True])
def test_make_dataset_with_ssd_augmentation_is_seeded_and_boxes_stay_valid(digits_set, repeat):
    from kerasdet.data.coco import load_coco
    from kerasdet.data.pipeline import make_dataset

    source = load_coco(digits_set["train_annotations"], digits_set["train_images"])

    def first_batches(seed):
        ds = make_dataset(source, batch_size=4, image_size=(64, 64), training=True, flip=False, seed=seed,
                          ssd_augmentation=True, repeat=repeat)
        return [(x.numpy(), y["boxes"].numpy(), y["classes"].numpy()) for x, y in ds.take(3)]

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    for (xa, ba, ca), (xb, bb, cb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ba, bb)
    assert any(not np.array_equal(xa, xc) for (xa, _, _), (xc, _, _) in zip(a, c))
    for x, boxes, classes in a:
        assert x.shape == (4, 64, 64, 3) and x.min() >= 0 and x.max() <= 255
        real = classes >= 0
        assert real.any()
        assert (boxes[real][:, 2] > boxes[real][:, 0]).all() and (boxes[real] <= 64).all() and (boxes[real] >= 0).all()
