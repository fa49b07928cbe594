"""PSRoI pooling: Caffe PSROIPooling and torchvision ps_roi_align numpy peers, TF OD API's
``position_sensitive_crop_regions`` (bin-major layout) agreement, gradients, layer, XLA."""
import math
from fractions import Fraction

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.layers.psroi import PSRoIPooling, ps_roi_align, ps_roi_pool

K, D = 3, 3  # group_size, output_dim: 27 channels


def caffe_psroi_pool(fmap, roi, k, d, spatial_scale):
    """Brute-force transcription of Caffe ``PSROIPoolingForward`` (R-FCN) for one RoI.

    ``fmap [H, W, k*k*d]`` (channels-last view of Caffe's NCHW), ``roi`` = Caffe's
    inclusive ``(x1, y1, x2, y2)``. RoI start/end/size in float32 like the CUDA kernel; the
    bin edges ``floor(start + ph * size / k)`` in exact rational arithmetic (the documented
    resolution of the kernel's FMA-dependent float32 rounding).
    Returns ``(out [k, k, d], edges)`` with ``edges[ph][pw] = (hs, he, ws, we)``.
    """
    f32 = np.float32
    height, width, _ = fmap.shape

    def cround(v):  # C round(): halves away from zero
        return math.copysign(math.floor(abs(float(v)) + 0.5), float(v))

    x1, y1, x2, y2 = (f32(v) for v in roi)
    s = f32(spatial_scale)
    roi_start_w = f32(cround(x1)) * s
    roi_start_h = f32(cround(y1)) * s
    roi_end_w = f32(cround(x2) + 1.0) * s
    roi_end_h = f32(cround(y2) + 1.0) * s
    roi_width = max(f32(roi_end_w - roi_start_w), f32(0.1))
    roi_height = max(f32(roi_end_h - roi_start_h), f32(0.1))
    start_h, start_w = Fraction(float(roi_start_h)), Fraction(float(roi_start_w))
    bin_size_h = Fraction(float(roi_height)) / k
    bin_size_w = Fraction(float(roi_width)) / k
    out = np.zeros((k, k, d), np.float64)
    edges = [[None] * k for _ in range(k)]
    for ctop in range(d):
        for ph in range(k):
            for pw in range(k):
                hstart = math.floor(ph * bin_size_h + start_h)
                wstart = math.floor(pw * bin_size_w + start_w)
                hend = math.ceil((ph + 1) * bin_size_h + start_h)
                wend = math.ceil((pw + 1) * bin_size_w + start_w)
                hstart = min(max(hstart, 0), height)
                hend = min(max(hend, 0), height)
                wstart = min(max(wstart, 0), width)
                wend = min(max(wend, 0), width)
                is_empty = hend <= hstart or wend <= wstart
                c = (ctop * k + ph) * k + pw
                total = 0.0
                for h in range(hstart, hend):
                    for w in range(wstart, wend):
                        total += float(fmap[h, w, c])
                area = (hend - hstart) * (wend - wstart)
                out[ph, pw, ctop] = 0.0 if is_empty else total / area
                edges[ph][pw] = (hstart, hend, wstart, wend)
    return out, edges


def torchvision_ps_roi_align(fmap, box_xyxy, k, d, spatial_scale, sampling_ratio, aligned=True):
    """numpy transcription of torchvision's ``ps_roi_align_forward_kernel_impl`` (CPU).

    ``aligned=True`` is torchvision (offset 0.5, no minimum size); ``aligned=False`` is the
    roi_align legacy rule (no offset, RoI >= 1 cell) our op documents.
    """
    height, width, _ = fmap.shape
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = box_xyxy
    roi_start_w = x1 * spatial_scale - offset
    roi_start_h = y1 * spatial_scale - offset
    roi_width = x2 * spatial_scale - offset - roi_start_w
    roi_height = y2 * spatial_scale - offset - roi_start_h
    if not aligned:
        roi_width, roi_height = max(roi_width, 1.0), max(roi_height, 1.0)
    bin_size_h = roi_height / k
    bin_size_w = roi_width / k

    def bilinear(channel, y, x):
        if y < -1.0 or y > height or x < -1.0 or x > width:
            return 0.0
        y, x = max(y, 0.0), max(x, 0.0)
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
        f = fmap[:, :, channel]
        return hy * hx * f[y_low, x_low] + hy * lx * f[y_low, x_high] + ly * hx * f[y_high, x_low] + ly * lx * f[y_high, x_high]

    out = np.zeros((k, k, d))
    for c_out in range(d):
        for ph in range(k):
            for pw in range(k):
                c_in = (c_out * k + ph) * k + pw
                hstart = ph * bin_size_h + roi_start_h
                wstart = pw * bin_size_w + roi_start_w
                acc = 0.0
                for iy in range(sampling_ratio):
                    y = hstart + (iy + 0.5) * bin_size_h / sampling_ratio
                    for ix in range(sampling_ratio):
                        x = wstart + (ix + 0.5) * bin_size_w / sampling_ratio
                        acc += bilinear(c_in, y, x)
                out[ph, pw, c_out] = acc / (sampling_ratio * sampling_ratio)
    return out


def odapi_position_sensitive_crop_regions(image, boxes, crop_size, num_spatial_bins, global_pool):
    """TF OD API ``utils/ops.py`` ``position_sensitive_crop_regions``, reproduced from its
    definition: the depth is split into ``ky*kx`` bin-major groups (``tf.split``), bin
    ``(by, bx)`` of each normalized box (``y -> y * (H - 1)``) is ``crop_and_resize``d from
    group ``by*kx + bx`` to ``crop // bins``, and the bin crops are assembled spatially
    (their space_to_depth / batch_to_space_nd / depth_to_space dance) or, with
    ``global_pool``, averaged over bins and positions. ``image [H, W, depth]``,
    ``boxes [N, 4]``."""
    ky, kx = num_spatial_bins
    bh, bw = crop_size[0] // ky, crop_size[1] // kx
    ymin, xmin, ymax, xmax = tf.unstack(tf.constant(boxes, tf.float32), axis=1)
    splits = tf.split(tf.constant(image, tf.float32), ky * kx, axis=2)
    crops = []
    for by in range(ky):
        step_y = (ymax - ymin) / ky
        for bx in range(kx):
            step_x = (xmax - xmin) / kx
            sub = tf.stack([ymin + by * step_y, xmin + bx * step_x, ymin + (by + 1) * step_y, xmin + (bx + 1) * step_x], 1)
            crops.append(tf.image.crop_and_resize(splits[by * kx + bx][None], sub, tf.zeros([len(boxes)], tf.int32), [bh, bw]))
    if global_pool:
        return tf.reduce_mean(tf.add_n(crops) / len(crops), [1, 2], keepdims=True).numpy()
    stacked = tf.reshape(tf.stack(crops), [ky, kx, len(boxes), bh, bw, -1])
    return tf.reshape(tf.transpose(stacked, [2, 0, 3, 1, 4, 5]), [len(boxes), ky * bh, kx * bw, -1]).numpy()


def caffe_to_odapi_layout(maps, k, d):
    """class-major (channel ``c*k*k + bin``) -> bin-major (channel ``bin*d + c``)."""
    shape = maps.shape[:-1]
    return maps.reshape(shape + (d, k * k)).swapaxes(-1, -2).reshape(shape + (k * k * d,))


def random_boxes(rng, batch, num, image):
    """yxyx boxes: random, partly / fully outside, tiny, half-integer edges, degenerate."""
    y1 = rng.uniform(-30, image + 10, (batch, num))
    x1 = rng.uniform(-30, image + 10, (batch, num))
    boxes = np.stack([y1, x1, y1 + rng.uniform(0.2, 80, (batch, num)), x1 + rng.uniform(0.2, 80, (batch, num))], -1)
    special = np.array(
        [
            [7.5, 2.5, 40.5, 33.5],  # rounding ties (round half away from zero)
            [-2.5, -0.5, 20.5, 9.5],  # negative ties
            [50.0, 50.0, 50.3, 50.2],  # tiny: RoI size floor 0.1
            [-60.0, -50.0, -20.0, -10.0],  # fully outside: every bin empty
            [90.0, 20.0, 130.0, 200.0],  # partly outside bottom/right: some empty bins
            [30.0, 40.0, 20.0, 35.0],  # degenerate (y2 < y1)
            [0.0, 0.0, 96.0, 96.0],  # whole image
        ]
    )
    boxes[:, : len(special)] = special
    return boxes.astype("float32")


@pytest.fixture(scope="module")
def data():
    rng = np.random.RandomState(0)
    maps = rng.randn(2, 12, 12, K * K * D).astype("float32")
    boxes = random_boxes(rng, 2, 24, 96)
    return maps, boxes


@pytest.mark.parametrize("spatial_scale", [1 / 8, 0.3])
def test_ps_roi_pool_matches_caffe_reference(data, spatial_scale):
    maps, boxes = data
    out = ps_roi_pool(maps, boxes, group_size=K, output_dim=D, spatial_scale=spatial_scale).numpy()
    assert out.shape == (2, boxes.shape[1], K, K, D)
    empty = 0
    for b in range(2):
        for r in range(boxes.shape[1]):
            y1, x1, y2, x2 = boxes[b, r]
            # our exclusive bottom/right edge -> Caffe's inclusive pixel index
            ref, edges = caffe_psroi_pool(maps[b], (x1, y1, x2 - np.float32(1), y2 - np.float32(1)), K, D, spatial_scale)
            np.testing.assert_allclose(out[b, r], ref, atol=1e-5, rtol=0, err_msg=f"box {b},{r}")
            empty += sum(he <= hs or we <= ws for row in edges for hs, he, ws, we in row)
    assert empty >= K * K  # the fully-outside boxes at least


def test_ps_roi_pool_hand_values():
    # One output channel, k=2, stride 1: channel (gh*2 + gw) holds 10*(gh*2+gw) + 100*y + x.
    # Box [1, 2, 5, 6) (exclusive) -> Caffe (2, 1, 5, 4) -> rows 1..4, cols 2..5, 2x2-cell bins.
    yy, xx = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    maps = np.stack([10.0 * c + 100 * yy + xx for c in range(4)], -1)[None].astype("float32")
    out = ps_roi_pool(maps, np.array([[[1, 2, 5, 6]]], "float32"), group_size=2, output_dim=1, spatial_scale=1.0)
    # bin (gh, gw): rows 1+2gh..2+2gh, cols 2+2gw..3+2gw -> mean 100*(1.5+2gh) + 2.5+2gw + 10*(2gh+gw)
    expected = [[150 + 2.5, 150 + 4.5 + 10], [350 + 2.5 + 20, 350 + 4.5 + 30]]
    np.testing.assert_allclose(out.numpy()[0, 0, :, :, 0], expected, atol=1e-4)


@pytest.mark.parametrize("sampling_ratio,aligned", [(1, True), (2, True), (3, True), (2, False)])
def test_ps_roi_align_matches_torchvision_reference(data, sampling_ratio, aligned):
    maps, boxes = data
    scale = 1 / 8
    out = ps_roi_align(maps, boxes, group_size=K, output_dim=D, spatial_scale=scale,
                       sampling_ratio=sampling_ratio, aligned=aligned).numpy()
    for b in range(2):
        for r in range(boxes.shape[1]):
            y1, x1, y2, x2 = (float(v) for v in boxes[b, r])
            ref = torchvision_ps_roi_align(maps[b].astype(np.float64), (x1, y1, x2, y2), K, D, scale, sampling_ratio, aligned)
            np.testing.assert_allclose(out[b, r], ref, atol=1e-5, err_msg=f"box {b},{r}")


def _inside_boxes(rng, num, scale, size):
    """Boxes whose bin centres and samples stay inside ``[0, size-1]`` in feature space."""
    lo, hi = 1.0 / scale, (size - 1.5) / scale
    y1 = rng.uniform(lo, hi - 20, num)
    x1 = rng.uniform(lo, hi - 20, num)
    return np.stack([y1, x1, np.minimum(y1 + rng.uniform(3, 50, num), hi), np.minimum(x1 + rng.uniform(3, 50, num), hi)], -1).astype("float32")


def test_layout_is_caffe_not_odapi_and_align_agrees_with_odapi(data):
    maps, _ = data
    rng = np.random.RandomState(3)
    scale, size = 1 / 8, 12
    boxes = _inside_boxes(rng, 10, scale, size)
    # our aligned feature box (box * s - 0.5) in the OD API's normalized coordinates
    normalized = (boxes * scale - 0.5) / (size - 1)
    odapi_maps = caffe_to_odapi_layout(maps[0], K, D)
    assert not np.allclose(odapi_maps, maps[0])
    # crop_size == k: crop_and_resize samples each bin at its centre == sampling_ratio 1
    ours = ps_roi_align(maps[:1], boxes[None], group_size=K, output_dim=D, spatial_scale=scale, sampling_ratio=1)
    peer = odapi_position_sensitive_crop_regions(odapi_maps, normalized, [K, K], [K, K], global_pool=False)
    np.testing.assert_allclose(ours.numpy()[0], peer, atol=1e-5)
    # global_pool == R-FCN voting
    voted = PSRoIPooling(output_dim=D, group_size=K, spatial_scale=scale, method="align", sampling_ratio=1, vote=True)
    peer_pooled = odapi_position_sensitive_crop_regions(odapi_maps, normalized, [K, K], [K, K], global_pool=True)
    np.testing.assert_allclose(voted(maps[:1], boxes[None]).numpy()[0], peer_pooled[:, 0, 0], atol=1e-5)
    # without the channel permutation the OD API reads other channels: the layouts differ
    wrong = odapi_position_sensitive_crop_regions(maps[0], normalized, [K, K], [K, K], global_pool=False)
    assert np.abs(wrong - ours.numpy()[0]).max() > 0.1


def test_bin_aligned_boxes_pool_align_and_odapi_agree(data):
    maps, _ = data
    scale, size = 1 / 4, 12
    # integer feature-cell boxes [y0, y0 + k*m) x [x0, x0 + k*m): every bin is exactly m x m cells
    cells = [(1, 2, 1), (4, 0, 1), (0, 3, 2), (8, 9, 1), (2, 5, 2)]  # (y0, x0, m)
    for m in (1, 2):
        chosen = [(y0, x0) for y0, x0, mm in cells if mm == m]
        boxes = np.array([[y0, x0, y0 + K * m, x0 + K * m] for y0, x0 in chosen], "float32")[None] / scale
        pool = ps_roi_pool(maps[:1], boxes, group_size=K, output_dim=D, spatial_scale=scale).numpy()
        align = ps_roi_align(maps[:1], boxes, group_size=K, output_dim=D, spatial_scale=scale, sampling_ratio=m).numpy()
        np.testing.assert_allclose(pool, align, atol=1e-5)  # samples at the cell centres
        if m == 1:  # one cell per bin: the OD API's bin-centre crop reads the same cell
            normalized = (boxes[0] * scale - 0.5) / (size - 1)
            peer = odapi_position_sensitive_crop_regions(caffe_to_odapi_layout(maps[0], K, D), normalized, [K, K], [K, K], False)
            np.testing.assert_allclose(pool[0], peer, atol=1e-5)
            y0, x0 = chosen[0]
            direct = maps[0, y0:y0 + K, x0:x0 + K].reshape(K, K, D, K * K)
            np.testing.assert_allclose(pool[0, 0], [[direct[i, j, :, i * K + j] for j in range(K)] for i in range(K)], atol=1e-6)


def test_ps_roi_pool_gradient_matches_adjoint_reference(data):
    maps, boxes = data
    scale = 1 / 8
    rng = np.random.RandomState(5)
    upstream = rng.randn(2, boxes.shape[1], K, K, D).astype("float32")
    x = tf.constant(maps)
    bx = tf.constant(boxes)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, bx])
        loss = tf.reduce_sum(ps_roi_pool(x, bx, group_size=K, output_dim=D, spatial_scale=scale) * upstream)
    grad = tape.gradient(loss, x).numpy()
    assert tape.gradient(loss, bx) is None  # boxes are stop_gradient'ed
    ref = np.zeros_like(maps, np.float64)
    for b in range(2):
        for r in range(boxes.shape[1]):
            y1, x1, y2, x2 = boxes[b, r]
            _, edges = caffe_psroi_pool(maps[b], (x1, y1, x2 - np.float32(1), y2 - np.float32(1)), K, D, scale)
            for ph in range(K):
                for pw in range(K):
                    hs, he, ws, we = edges[ph][pw]
                    if he <= hs or we <= ws:
                        continue
                    for c in range(D):
                        ref[b, hs:he, ws:we, (c * K + ph) * K + pw] += upstream[b, r, ph, pw, c] / ((he - hs) * (we - ws))
    np.testing.assert_allclose(grad, ref, atol=1e-5)


@pytest.mark.parametrize("method", ["pool", "align"])
def test_gradient_is_the_adjoint_of_the_linear_op(data, method):
    # Both ops are linear in the maps: <op(M), G> == <M, d<op(M), G>/dM> for any M.
    maps, boxes = data
    layer = PSRoIPooling(output_dim=D, group_size=K, spatial_scale=1 / 8, method=method)
    rng = np.random.RandomState(6)
    upstream = rng.randn(2, boxes.shape[1], K, K, D).astype("float32")
    x = tf.Variable(maps)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x, boxes) * upstream)
    grad = tape.gradient(loss, x).numpy()
    assert np.abs(grad).sum() > 0
    np.testing.assert_allclose(float(loss), float(np.sum(grad.astype(np.float64) * maps)), rtol=1e-5)


def test_layer_config_round_trip_vote_and_functional_model(data):
    maps, boxes = data
    layer = PSRoIPooling(output_dim=D, group_size=K, spatial_scale=1 / 8, method="align", sampling_ratio=3, vote=True)
    clone = PSRoIPooling.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(revived, PSRoIPooling) and revived.sampling_ratio == 3 and revived.vote
    voted = layer(maps, boxes)
    assert voted.shape == (2, boxes.shape[1], D)
    full = PSRoIPooling(output_dim=D, group_size=K, spatial_scale=1 / 8, method="align", sampling_ratio=3)(maps, boxes)
    np.testing.assert_allclose(voted, tf.reduce_mean(full, [2, 3]), atol=1e-6)
    # functional model with dynamic H, W
    fm = keras.Input((None, None, K * K * D))
    bi = keras.Input((boxes.shape[1], 4))
    model = keras.Model([fm, bi], PSRoIPooling(output_dim=D, group_size=K, spatial_scale=1 / 8)(fm, bi))
    assert tuple(model.output.shape) == (None, boxes.shape[1], K, K, D)
    np.testing.assert_allclose(
        model([maps, boxes]), ps_roi_pool(maps, boxes, group_size=K, output_dim=D, spatial_scale=1 / 8), atol=1e-6
    )
    with pytest.raises(ValueError):
        PSRoIPooling(output_dim=D, method="max")
    with pytest.raises(ValueError):
        PSRoIPooling(output_dim=4, group_size=K)(maps, boxes)  # 27 channels != 9 * 4


def test_xla_compiles_and_matches_eager(data):
    # one compiled function for both methods (XLA compilation dominates this file's time)
    maps, boxes = data
    layers = [PSRoIPooling(output_dim=D, group_size=K, spatial_scale=1 / 8, method=m) for m in ("pool", "align")]

    def forward_backward(x, b):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outs = [layer(x, b) for layer in layers]
            loss = tf.add_n([tf.reduce_sum(o * o) for o in outs])
        return outs, tape.gradient(loss, x)

    (pool, align), grad = tf.function(forward_backward, jit_compile=True)(tf.constant(maps), tf.constant(boxes))
    (pool_e, align_e), grad_e = forward_backward(tf.constant(maps), tf.constant(boxes))
    # exact bin edges give the same bins under XLA (data box [1, 11] has an integer last-bin
    # edge, -1.875 + 3 * 8.875 / 3 = 7, that a float32 evaluation put at 8 under XLA)
    np.testing.assert_allclose(pool, pool_e, atol=1e-5)
    np.testing.assert_allclose(align, align_e, atol=1e-5)
    np.testing.assert_allclose(grad, grad_e, atol=1e-4)
