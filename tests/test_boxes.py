import numpy as np
import pytest
import tensorflow as tf
from keras.utils import bounding_boxes as kbb

from kerasdet import boxes as box_ops


def test_iou_hand_computed_and_batched():
    a = tf.constant([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]]])  # [1, 2, 4]
    b = tf.constant([[[5.0, 5.0, 15.0, 15.0], [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]])
    got = box_ops.iou(a, b).numpy()
    assert got.shape == (1, 2, 3)
    np.testing.assert_allclose(got[0, 0], [25.0 / 175.0, 1.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(got[0, 1], [0.0, 0.0, 0.0])  # degenerate box: 0, never NaN


def test_iou_matches_keras_peer():
    rng = np.random.RandomState(0)
    tl = rng.uniform(0, 50, (7, 2))
    a = np.concatenate([tl, tl + rng.uniform(1, 30, (7, 2))], 1).astype("float32")
    tl = rng.uniform(0, 50, (5, 2))
    b = np.concatenate([tl, tl + rng.uniform(1, 30, (5, 2))], 1).astype("float32")
    ours = box_ops.iou(a, b).numpy()
    peer = np.asarray(kbb.compute_iou(a, b, bounding_box_format="yxyx"))
    np.testing.assert_allclose(ours, peer, atol=1e-5)


def test_ioa():
    a = tf.constant([[0.0, 0.0, 10.0, 10.0]])
    b = tf.constant([[0.0, 0.0, 5.0, 10.0], [0.0, 0.0, 100.0, 100.0]])
    np.testing.assert_allclose(box_ops.ioa(a, b).numpy(), [[0.5, 1.0]])


def test_encode_hand_computed_and_round_trip():
    anchor = tf.constant([[0.0, 0.0, 10.0, 20.0]])  # center (5, 10), h 10, w 20
    box = tf.constant([[2.0, 4.0, 22.0, 24.0]])  # center (12, 14), h 20, w 20
    d = box_ops.encode(box, anchor).numpy()
    np.testing.assert_allclose(d, [[0.7, 0.2, np.log(2.0), 0.0]], rtol=1e-6, atol=1e-7)
    d10 = box_ops.encode(box, anchor, weights=(10.0, 10.0, 5.0, 5.0)).numpy()
    np.testing.assert_allclose(d10, [[7.0, 2.0, 5 * np.log(2.0), 0.0]], rtol=1e-5, atol=1e-6)
    back = box_ops.decode(d10, anchor, weights=(10.0, 10.0, 5.0, 5.0)).numpy()
    np.testing.assert_allclose(back, box.numpy(), atol=1e-4)


def test_encode_matches_keras_peer():
    rng = np.random.RandomState(1)
    tl = rng.uniform(0, 50, (6, 2))
    anchors = np.concatenate([tl, tl + rng.uniform(5, 30, (6, 2))], 1).astype("float32")
    tl = rng.uniform(0, 50, (6, 2))
    gt = np.concatenate([tl, tl + rng.uniform(5, 30, (6, 2))], 1).astype("float32")
    ours = box_ops.encode(gt, anchors, weights=(10.0, 10.0, 5.0, 5.0)).numpy()
    peer = np.asarray(
        kbb.encode_box_to_deltas(
            anchors, gt, anchor_format="yxyx", box_format="yxyx", variance=[0.1, 0.1, 0.2, 0.2]
        )
    )
    np.testing.assert_allclose(ours, peer, atol=1e-4)


def test_decode_clips_scale_and_stays_finite():
    anchor = tf.constant([[0.0, 0.0, 16.0, 16.0]])
    out = box_ops.decode(tf.constant([[0.0, 0.0, 100.0, 100.0]]), anchor).numpy()
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0, 2] - out[0, 0], 1000.0, rtol=1e-4)


def test_clip():
    b = tf.constant([[-5.0, 3.0, 50.0, 120.0]])
    np.testing.assert_array_equal(box_ops.clip(b, 40, 100).numpy(), [[0.0, 3.0, 40.0, 100.0]])


@pytest.mark.parametrize("fmt", ["xyxy", "xywh", "center_xywh", "rel_yxyx", "rel_xyxy"])
def test_convert_format_round_trip(fmt):
    b = np.array([[[10.0, 20.0, 30.0, 60.0]]], "float32")  # yxyx
    other = box_ops.convert_format(b, source="yxyx", target=fmt, height=100, width=200)
    back = box_ops.convert_format(other, source=fmt, target="yxyx", height=100, width=200)
    np.testing.assert_allclose(np.asarray(back), b, atol=1e-4)


def test_convert_format_hand_values_and_bad_name():
    b = np.array([[10.0, 20.0, 30.0, 60.0]], "float32")
    np.testing.assert_allclose(np.asarray(box_ops.convert_format(b, source="yxyx", target="xywh")), [[20, 10, 40, 20]])
    with pytest.raises(ValueError, match="Unknown bounding box"):
        box_ops.convert_format(b, source="yxyx", target="xyz")


def test_boxes_from_masks_tight_pixel_edges_by_hand():
    import numpy as np

    from kerasdet.boxes import boxes_from_masks

    masks = np.zeros((2, 3, 6, 8), bool)
    masks[0, 0, 1:4, 2:5] = True          # rows 1-3, cols 2-4 -> [1, 2, 4, 5]
    masks[0, 1, 5, 0] = masks[0, 1, 0, 7] = True  # two corners -> the whole image
    out = boxes_from_masks(masks).numpy()
    np.testing.assert_array_equal(out[0, 0], [1, 2, 4, 5])
    np.testing.assert_array_equal(out[0, 1], [0, 0, 6, 8])
    np.testing.assert_array_equal(out[0, 2], [0, 0, 0, 0])  # empty mask
    assert out.shape == (2, 3, 4) and not out[1].any()
