"""kerasdet.data.geometry: resize rule, flips, crop offsets, crop/pad, clipping and
compaction, against hand-computed values."""
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.data import geometry


def test_flip_boxes_horizontal_values():
    boxes = tf.constant([[1.0, 2.0, 3.0, 5.0], [0.0, 0.0, 4.0, 10.0]])
    out = geometry.flip_boxes_horizontal(boxes, 10)
    np.testing.assert_allclose(out, [[1, 5, 3, 8], [0, 0, 4, 10]])
    np.testing.assert_allclose(geometry.flip_boxes_horizontal(out, 10), boxes)


def test_resize_scale_rules():
    fit = geometry.resize_scale(60, 90, (64, 80))
    assert fit.numpy() == pytest.approx(80 / 90)
    # Detectron rule: short side -> 800 unless the long side would pass 1333.
    assert geometry.resize_scale(480, 640, (1344, 1344), 800, 1333).numpy() == \
        pytest.approx(800 / 480)
    assert geometry.resize_scale(300, 1000, (1344, 1344), 800, 1333).numpy() == \
        pytest.approx(1333 / 1000)
    assert geometry.resize_scale(300, 1000, (1344, 1344), None, 500).numpy() == \
        pytest.approx(0.5)
    h, w = geometry.resized_shape(300, 1000, geometry.resize_scale(300, 1000, (0, 0), 800, 1333))
    assert (int(h), int(w)) == (400, 1333)


def test_clip_and_compact():
    boxes = tf.constant([[0.0, 0.0, 10.0, 10.0],     # inside
                         [5.0, 15.0, 10.0, 30.0],    # 1/3 visible (w=20 region): kept
                         [5.0, 18.0, 10.0, 30.0],    # 2/12 visible: dropped
                         [30.0, 0.0, 40.0, 5.0]])    # outside
    clipped, keep = geometry.clip_boxes_to_region(boxes, tf.constant([20, 20]), 0.25)
    assert keep.numpy().tolist() == [True, True, False, False]
    np.testing.assert_allclose(clipped[1], [5, 15, 10, 20])
    classes = tf.constant([0, 1, 2, 3])
    crowd = tf.constant([True, False, False, False])
    keep = tf.constant([True, True, False, True])
    b, c, k = geometry.compact_and_pad(boxes, classes, crowd, keep, max_boxes=5)
    assert c.numpy().tolist() == [1, 3, 0, -1, -1]  # non-crowd first, then crowd
    assert k.numpy().tolist() == [False, False, True, False, False]
    np.testing.assert_allclose(b[:3], tf.gather(boxes, [1, 3, 0]))
    assert (b.numpy()[3:] == 0).all()
    b, c, k = geometry.compact_and_pad(boxes, classes, crowd, keep, max_boxes=2)
    assert c.numpy().tolist() == [1, 3] and b.shape == (2, 4)


def test_random_crop_offset_bounds_and_determinism():
    offsets = np.array([geometry.random_crop_offset(100, 90, (64, 80), tf.constant([s, 1])).numpy()
                        for s in range(50)])
    assert offsets[:, 0].min() >= 0 and offsets[:, 0].max() <= 36
    assert offsets[:, 1].min() >= 0 and offsets[:, 1].max() <= 10
    assert len(np.unique(offsets[:, 0])) > 10
    small = geometry.random_crop_offset(30, 40, (64, 80), tf.constant([3, 1]))
    assert small.numpy().tolist() == [0, 0]
    a = geometry.random_crop_offset(100, 90, (64, 80), tf.constant([5, 9]))
    assert a.numpy().tolist() == geometry.random_crop_offset(
        100, 90, (64, 80), tf.constant([5, 9])).numpy().tolist()


@pytest.mark.parametrize("sizes, rule", [
    (((60, 90), (480, 640), (300, 1000), (7, 3)), dict(image_size=(64, 80))),
    (((480, 640), (300, 1000), (1000, 300), (801, 799)),
     dict(image_size=(1344, 1344), min_size=800, max_size=1333)),
    (((300, 1000), (640, 480)), dict(image_size=(0, 0), max_size=500)),
    (((300, 1000), (640, 480)), dict(image_size=(0, 0), min_size=100)),
])
def test_numpy_resized_shapes_match_the_graph_ops(sizes, rule):
    heights, widths = zip(*sizes)
    new_h, new_w = geometry.numpy_resized_shapes(heights, widths, rule["image_size"],
                                                 rule.get("min_size"), rule.get("max_size"))
    for (h, w), nh, nw in zip(sizes, new_h, new_w):
        scale = geometry.resize_scale(h, w, rule["image_size"], rule.get("min_size"),
                                      rule.get("max_size"))
        gh, gw = geometry.resized_shape(h, w, scale)
        assert (int(nh), int(nw)) == (int(gh), int(gw)), (h, w)
    if rule == dict(image_size=(0, 0), max_size=500):  # hand-computed: long side -> 500
        assert new_h.tolist() == [150, 500] and new_w.tolist() == [500, 375]


def test_resize_masks_nearest_keeps_label_values():
    masks = np.array([[[1, 0], [0, 255]]], np.uint8).transpose(1, 2, 0)  # [2, 2, 1]
    up = geometry.resize_masks(tf.constant(masks), 4, 4).numpy()[..., 0]
    np.testing.assert_array_equal(up, [[1, 1, 0, 0], [1, 1, 0, 0],
                                       [0, 0, 255, 255], [0, 0, 255, 255]])
    assert up.dtype == np.uint8
    same = geometry.resize_masks(tf.constant(masks), 2, 2).numpy()
    np.testing.assert_array_equal(same, masks)
    empty = geometry.resize_masks(tf.zeros([2, 2, 0], tf.uint8), 3, 5)
    assert empty.shape == (3, 5, 0)


def test_crop_and_pad_values_and_shifted_boxes():
    image = np.arange(5 * 6, dtype=np.float32).reshape(5, 6, 1)
    boxes = tf.constant([[1.0, 2.0, 4.0, 6.0]])
    out, out_boxes, visible = geometry.crop_and_pad(image, boxes, tf.constant([1, 2]), (3, 5))
    # rows 1..3, columns 2..5 of the image, then one zero column on the right
    expected = np.zeros((3, 5), np.float32)
    expected[:, :4] = image[1:4, 2:6, 0]
    np.testing.assert_array_equal(out.numpy()[..., 0], expected)
    np.testing.assert_allclose(out_boxes, [[0.0, 0.0, 3.0, 4.0]])
    assert visible.numpy().tolist() == [3, 4]
