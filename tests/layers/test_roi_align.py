"""RoIAlign / crop-pool: hand values, a numpy torchvision ``roi_align`` peer, levels, gradients."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.layers.roi_align import RoIAlign, RoICropAndPool, assign_levels


def torchvision_roi_align(feature, box_xyxy, spatial_scale, pooled, sampling_ratio, aligned):
    """numpy transcription of torchvision's ``roi_align_forward_kernel_impl`` (CPU).

    ``feature [H, W, C]``; one box ``(x1, y1, x2, y2)`` in image coordinates. Mirrors
    torchvision/csrc/ops/cpu/roi_align_kernel.cpp + roi_align_common.h
    (``bilinear_interpolate``), sampling_ratio > 0.
    """
    height, width, channels = feature.shape
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = box_xyxy
    start_w = x1 * spatial_scale - offset
    start_h = y1 * spatial_scale - offset
    end_w = x2 * spatial_scale - offset
    end_h = y2 * spatial_scale - offset
    roi_w = end_w - start_w
    roi_h = end_h - start_h
    if not aligned:
        roi_w = max(roi_w, 1.0)
        roi_h = max(roi_h, 1.0)
    bin_h = roi_h / pooled
    bin_w = roi_w / pooled
    grid_h = grid_w = sampling_ratio
    count = max(grid_h * grid_w, 1)
    out = np.zeros((pooled, pooled, channels), np.float64)

    def bilinear(y, x):
        if y < -1.0 or y > height or x < -1.0 or x > width:
            return np.zeros(channels)
        y = max(y, 0.0)
        x = max(x, 0.0)
        y_low, x_low = int(y), int(x)
        if y_low >= height - 1:
            y_high = y_low = height - 1
            y = float(y_low)
        else:
            y_high = y_low + 1
        if x_low >= width - 1:
            x_high = x_low = width - 1
            x = float(x_low)
        else:
            x_high = x_low + 1
        ly, lx = y - y_low, x - x_low
        hy, hx = 1.0 - ly, 1.0 - lx
        return (hy * hx * feature[y_low, x_low] + hy * lx * feature[y_low, x_high]
                + ly * hx * feature[y_high, x_low] + ly * lx * feature[y_high, x_high])

    for ph in range(pooled):
        for pw in range(pooled):
            acc = np.zeros(channels)
            for iy in range(grid_h):
                y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                for ix in range(grid_w):
                    x = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                    acc += bilinear(y, x)
            out[ph, pw] = acc / count
    return out


def test_hand_computed_values_on_a_ramp():
    # f(y, x) = 10 y + x is reproduced exactly by bilinear interpolation inside the map,
    # so every bin's average is f at the bin centre (in feature-index coordinates).
    h, w = 8, 8
    ramp = (10.0 * np.arange(h)[:, None] + np.arange(w)[None, :]).astype("float32")[None, :, :, None]
    layer = RoIAlign(output_size=2, sampling_ratio=2, aligned=True, min_level=0, max_level=0, method="gather")
    # stride 1: feature box = box - 0.5 -> [1.5, 2.5, 5.5, 6.5]; bins 2x2 cells; centres 2.5/4.5 and 3.5/5.5
    out = layer(ramp, np.array([[[2.0, 3.0, 6.0, 7.0]]], "float32")).numpy()[0, 0, :, :, 0]
    np.testing.assert_allclose(out, [[28.5, 30.5], [48.5, 50.5]], atol=1e-5)
    # aligned=False: no shift -> centres 3/5 and 4/6
    layer = RoIAlign(output_size=2, sampling_ratio=1, aligned=False, min_level=0, max_level=0, method="gather")
    out = layer(ramp, np.array([[[2.0, 3.0, 6.0, 7.0]]], "float32")).numpy()[0, 0, :, :, 0]
    np.testing.assert_allclose(out, [[34.0, 36.0], [54.0, 56.0]], atol=1e-5)


def test_hand_computed_border_rule():
    # One-cell map holding 4.0; a box whose samples fall at -0.75 (clamped to 0 -> 4.0) and
    # at -1.25 (beyond -1 -> 0): torchvision's border rule, reproduced by the gather backend.
    feat = np.full((1, 1, 1, 1), 4.0, "float32")
    layer = RoIAlign(output_size=1, sampling_ratio=1, aligned=False, min_level=0, max_level=0, method="gather")
    inside = layer(feat, np.array([[[-1.25, -1.25, -0.25, -0.25]]], "float32"))  # centre -0.75
    outside = layer(feat, np.array([[[-1.75, -1.75, -0.75, -0.75]]], "float32"))  # centre -1.25
    assert float(inside[0, 0, 0, 0, 0]) == pytest.approx(4.0)
    assert float(outside[0, 0, 0, 0, 0]) == 0.0


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [1, 2])
def test_gather_matches_torchvision_peer_everywhere(aligned, sampling_ratio):
    rng = np.random.RandomState(0)
    feat = rng.randn(2, 9, 11, 3).astype("float32")
    stride = 4.0
    # boxes anywhere, including partly / fully outside the 36x44 image and tiny ones
    y1 = rng.uniform(-10, 40, (2, 6))
    x1 = rng.uniform(-10, 48, (2, 6))
    boxes = np.stack([y1, x1, y1 + rng.uniform(0.5, 30, (2, 6)), x1 + rng.uniform(0.5, 30, (2, 6))], -1).astype("float32")
    layer = RoIAlign(output_size=3, sampling_ratio=sampling_ratio, aligned=aligned, min_level=2, max_level=2,
                     method="gather")
    out = layer(feat, boxes).numpy()
    for b in range(2):
        for r in range(6):
            y1_, x1_, y2_, x2_ = boxes[b, r]
            ref = torchvision_roi_align(feat[b], (x1_, y1_, x2_, y2_), 1 / stride, 3, sampling_ratio, aligned)
            np.testing.assert_allclose(out[b, r], ref, atol=1e-4)


def test_crop_and_resize_backend_matches_peer_inside_the_map():
    rng = np.random.RandomState(1)
    feat = rng.randn(1, 12, 12, 4).astype("float32")
    stride = 8.0
    # sample points stay inside [0, H-1]: boxes within [8, 88] px of a 96 px image
    y1 = rng.uniform(8, 50, 10)
    x1 = rng.uniform(8, 50, 10)
    boxes = np.stack([y1, x1, y1 + rng.uniform(4, 38, 10), x1 + rng.uniform(4, 38, 10)], -1)[None].astype("float32")
    fast = RoIAlign(output_size=7, sampling_ratio=2, min_level=3, max_level=3, method="crop_and_resize")(feat, boxes)
    exact = RoIAlign(output_size=7, sampling_ratio=2, min_level=3, max_level=3, method="gather")(feat, boxes)
    np.testing.assert_allclose(fast, exact, atol=1e-4)
    for r in range(10):
        y1_, x1_, y2_, x2_ = boxes[0, r]
        ref = torchvision_roi_align(feat[0], (x1_, y1_, x2_, y2_), 1 / stride, 7, 2, True)
        np.testing.assert_allclose(fast[0, r], ref, atol=1e-4)


def test_level_assignment_eq_4_1():
    sizes = np.array([10, 111, 112, 223, 224, 447, 448, 1000, 0], "float32")
    boxes = np.stack([np.zeros_like(sizes), np.zeros_like(sizes), sizes, sizes], -1)[None]
    levels = assign_levels(boxes, min_level=2, max_level=5).numpy()[0]
    expected = [min(5, max(2, math.floor(4 + math.log2(s / 224 + 1e-6)))) if s > 0 else 2 for s in sizes]
    assert levels.tolist() == expected == [2, 2, 3, 3, 4, 4, 5, 5, 2]


@pytest.mark.parametrize("method", ["gather", "crop_and_resize"])
def test_multilevel_uses_the_assigned_level(method):
    # levels 2..5 hold constants 2, 3, 4, 5: each RoI must read its own level's constant.
    size = 256
    feats = [np.full((1, size // 2**l, size // 2**l, 2), float(l), "float32") for l in range(2, 6)]
    boxes = np.array([[[64, 64, 80, 80], [32, 32, 144, 144], [20, 20, 244, 244], [0, 0, 0, 0]]], "float32")
    layer = RoIAlign(output_size=2, sampling_ratio=2, min_level=2, max_level=5, method=method)
    out = layer({f"P{l}": f for l, f in zip(range(2, 6), feats)}, boxes).numpy()
    assert out.shape == (1, 4, 2, 2, 2)
    np.testing.assert_allclose(out[0, :3, :, :, 0].mean(axis=(1, 2)), [2, 3, 4], atol=1e-5)
    assert np.all(np.isfinite(out))  # degenerate box: finite, level 2


def test_gradients_reach_features_not_boxes():
    rng = np.random.RandomState(2)
    feats = [tf.Variable(rng.randn(2, 16 // 2**l, 16 // 2**l, 3).astype("float32")) for l in range(0, 2)]
    boxes = tf.Variable(np.array([[[1, 1, 9, 9], [2, 3, 12, 15]], [[0, 0, 16, 16], [4, 4, 6, 6]]], "float32"))
    for method in ("gather", "crop_and_resize"):
        layer = RoIAlign(output_size=2, sampling_ratio=2, min_level=0, max_level=1, canonical_size=8,
                         canonical_level=0, method=method)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(feats, boxes) ** 2)
        g_feats, g_boxes = tape.gradient(loss, [feats, boxes])
        assert g_boxes is None
        total = sum(float(tf.reduce_sum(tf.abs(g))) for g in g_feats if g is not None)
        assert total > 0


def test_gather_and_crop_and_resize_gradients_agree_inside():
    rng = np.random.RandomState(3)
    feat = tf.Variable(rng.randn(1, 10, 10, 2).astype("float32"))
    boxes = np.array([[[4, 4, 30, 34], [10, 6, 36, 20]]], "float32")  # stride 4, 40 px map: inside
    grads = []
    for method in ("gather", "crop_and_resize"):
        layer = RoIAlign(output_size=3, sampling_ratio=2, min_level=2, max_level=2, method=method)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(feat, boxes) * np.arange(18).reshape(1, 1, 3, 3, 2))
        grads.append(tape.gradient(loss, feat).numpy())
    np.testing.assert_allclose(grads[0], grads[1], atol=1e-4)


def test_crop_and_pool_matches_tf_faster_rcnn_definition():
    rng = np.random.RandomState(4)
    feat = rng.randn(1, 6, 7, 2).astype("float32")
    boxes = np.array([[[16, 8, 70, 90], [0, 0, 80, 96]]], "float32")
    out = RoICropAndPool(crop_size=4, pool_size=2, min_level=4, max_level=4)(feat, boxes).numpy()
    # tf-faster-rcnn: normalize by (H'-1)*16 / (W'-1)*16, crop_and_resize, 2x2 max-pool
    norm = boxes[0] / np.array([5 * 16, 6 * 16, 5 * 16, 6 * 16], "float32")
    crops = tf.image.crop_and_resize(feat, norm, [0, 0], [4, 4]).numpy()
    ref = crops.reshape(2, 2, 2, 2, 2, 2).max(axis=(2, 4))
    np.testing.assert_allclose(out[0], ref, atol=1e-5)
    # hand value: a ramp is linear, so the max of each 2x2 block is its bottom-right sample
    ramp = (np.arange(6)[:, None] * 10 + np.arange(7)[None]).astype("float32")[None, :, :, None]
    out = RoICropAndPool(crop_size=2, pool_size=1)(ramp, np.array([[[0, 0, 80, 96]]], "float32")).numpy()
    np.testing.assert_allclose(out[0, 0, :, :, 0], [[0, 6], [50, 56]], atol=1e-5)


def test_get_config_round_trip():
    for layer in (
        RoIAlign(output_size=5, sampling_ratio=3, aligned=False, min_level=3, max_level=4, canonical_size=112,
                 method="gather", name="ra"),
        RoICropAndPool(crop_size=14, pool_size=2, name="cp"),
    ):
        config = layer.get_config()
        clone = type(layer).from_config(config)
        assert clone.get_config() == config
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
        assert type(restored) is type(layer) and restored.get_config() == config
