"""Position-sensitive RoI pooling (R-FCN): exact Caffe ``PSROIPooling`` and a bilinear
``ps_roi_align`` variant.

Inputs follow the house style of :mod:`kerasdet.layers.roi_align`: score maps
``[B, H, W, k*k*D]`` (NHWC), boxes ``[B, R, 4]`` yxyx in network-input pixels with a static
``R`` (pad; never zero RoIs). Outputs are ``[B, R, k, k, D]`` (``[B, R, D]`` after voting).
Gradients flow to the score maps only: boxes are wrapped in ``stop_gradient`` (R-FCN's
Caffe layer has no box gradient either).

**Channel layout** (Caffe ``PSROIPooling`` of the R-FCN and CoupleNet code releases): *class-major*.
Output channel ``c`` of bin ``(gh, gw)`` reads input channel ``(c*k + gh)*k + gw``, i.e.
the input channels are ``[D, k, k]`` row-major. A 1x1 conv with ``k*k*(C+1)`` filters
trained for Caffe R-FCN can be used as is; torchvision's ``ps_roi_align`` uses the same
order (``c_in = (c_out*k + ph)*k + pw``). TF Object Detection API's
``position_sensitive_crop_regions`` instead splits the depth into ``k*k`` *bin-major*
groups of ``D`` channels (channel ``bin*D + c``, ``bin = gh*k + gw``); the two are related
by the permutation
``caffe[..., c*k*k + bin] == odapi[..., bin*D + c]`` (tested).

**``ps_roi_pool``** — exact Caffe ``PSROIPoolingForward`` (R-FCN's CUDA kernel):

* Caffe RoIs are *inclusive* pixel indices ``(x1, y1, x2, y2)`` (py-faster-rcnn: width is
  ``x2 - x1 + 1``). Our boxes have an *exclusive* right/bottom edge (a box covering pixels
  0..15 is ``[0, 16)``), so the Caffe coordinates are ``x1`` and ``x2 - 1``; they are then
  processed exactly as Caffe does: ``start = round(x1) * s``,
  ``end = (round(x2 - 1) + 1) * s`` (``round`` half away from zero, C ``round``), so for an
  integer box ``end = x2 * s``. RoI size ``max(end - start, 0.1)``, bin size
  ``size / k``, bin ``[floor(start + i*bin), ceil(start + (i+1)*bin))`` clipped to
  ``[0, H]``; the bin value is the mean over its cells, 0 if the bin is empty.
* Bin edges: ``start``, ``end`` and ``size`` are float32 as in Caffe, but
  ``floor(start + i * size / k)`` is evaluated *exactly* (``k*start + i*size`` in float64,
  then an exact integer floor/ceil of the quotient). Caffe's float32 evaluation of that
  expression is itself not reproducible: nvcc contracts it into an FMA by default, a CPU
  build does not, and XLA evaluates it differently again. When the exact edge is an
  integer (common: with ``s = 1/16`` every RoI edge is a multiple of 1/16) those roundings
  can move a bin's ``ceil`` by a whole cell (seen with a float32 version of this op:
  ``-1.875 + 3 * (8.875 / 3)`` -> ``ceil`` 8 under XLA, 7 in eager). Exact evaluation gives the mathematically intended edges, is
  identical in eager, graph and XLA mode, and equals the CUDA kernel except when its
  float32 rounding crosses an integer.
* Implementation: one summed-area table per image (``tf.cumsum`` over H and W of the maps
  rearranged to ``[B, k*k, H+1, W+1, D]`` with a leading zero row/column) and four
  ``tf.gather`` calls at the integer bin corners — ``O(B*H*W*k*k*D)`` for the table plus
  ``O(B*R*k*k*D)`` per corner, independent of the RoI size, no loops. The table is
  accumulated in **float64** (then the bin means are cast back): a bin sum is a
  difference of prefix sums whose magnitude grows with ``H*W`` (all positive on ReLU
  maps), so a float32 table would lose ~``eps * |prefix sum|`` absolute per bin; in float64
  the result is exact to float32 rounding. Gradient: the
  adjoint of the cumsums/gathers, i.e. each bin spreads ``grad / area`` uniformly over its
  cells (tested against that reference). Compiles with XLA.

**``ps_roi_align``** — torchvision ``ps_roi_align`` (``aligned=True``, torchvision's only
behaviour): feature box ``box * s - 0.5``, no rounding, no minimum size; each of the
``k x k`` bins averages ``sampling_ratio**2`` bilinear samples at the bin's sub-cell
centres, read from the bin's own channel group, with torchvision's border rule (samples
with ``y < -1`` or ``y > H`` (same for x) read 0, samples in ``[-1, 0)`` are clamped to
0, samples beyond ``H - 1`` to ``H - 1``). ``aligned=False`` drops the half-pixel shift and
forces the RoI to at least 1x1 cell (torchvision ``roi_align(aligned=False)``; no peer for
the PS variant). Implementation: the maps are rearranged bin-major ``[B, k*k*H*W, D]``
(a ``(B*k*k, H, W, D)`` view of the class-major maps) and the four bilinear neighbours of every
sample of every bin are gathered from that bin's own group in one ``tf.gather`` each —
exact torchvision semantics including the border band, memory ``B*R*k*k*S*S*D`` floats per
corner, compiles with XLA. (One ``crop_and_resize`` per bin-group, the other obvious
implementation, reads 0 instead of clamping in the one-cell border band and does not compile
with XLA, so the gather form is the only backend.) ``sampling_ratio`` must be >= 1
(torchvision's adaptive 0 needs data-dependent shapes).

**Voting** (R-FCN): ``vote=True`` averages the ``k x k`` bins (Caffe's 7x7 AVE pool with
stride 7), giving ``[B, R, D]``.
"""
import keras
import tensorflow as tf

from kerasdet.layers.roi_align import bilinear_axis

PSROI_METHODS = ("pool", "align")


def _check_channels(score_maps, group_size, output_dim):
    channels = score_maps.shape[-1]
    if channels is not None and channels != group_size * group_size * output_dim:
        raise ValueError(
            f"score_maps have {channels} channels; group_size**2 * output_dim = "
            f"{group_size}**2 * {output_dim} = {group_size * group_size * output_dim} expected."
        )


def _bin_major(maps, group_size, output_dim):
    """``[B, H, W, D*k*k]`` (class-major) -> ``[B, k*k, H, W, D]``."""
    shape = tf.shape(maps)
    maps = tf.reshape(maps, [shape[0], shape[1], shape[2], output_dim, group_size * group_size])
    return tf.transpose(maps, [0, 4, 1, 2, 3])


def _round_half_away(x):
    """C ``round``: halves away from zero (``tf.round`` rounds halves to even)."""
    t = tf.sign(x) * tf.floor(tf.abs(x))  # trunc, exact
    return t + tf.sign(x) * tf.cast(tf.abs(x - t) >= 0.5, x.dtype)


def _floor_div(num, k):
    """Exact ``floor(num / k)`` for float64 ``num`` and a small integer ``k``.

    The quotient is corrected by exact integer-valued comparisons, so it does not depend on
    how the division is rounded (e.g. a reciprocal multiply under XLA).
    """
    q = tf.floor(num / float(k))
    q = tf.where((q + 1.0) * k <= num, q + 1.0, q)
    return tf.where(q * k > num, q - 1.0, q)


def _ceil_div(num, k):
    """Exact ``ceil(num / k)`` (see :func:`_floor_div`)."""
    q = tf.math.ceil(num / float(k))
    q = tf.where((q - 1.0) * k >= num, q - 1.0, q)
    return tf.where(q * k < num, q + 1.0, q)


def _caffe_bin_edges(start, end, group_size, limit):
    """Integer ``[B, R, k]`` bin starts/ends along one axis.

    ``start``/``end``/``size = max(end - start, 0.1)`` are float32 as in Caffe; the bin
    edges ``floor(start + i * size / k)`` / ``ceil(start + (i+1) * size / k)`` are then
    evaluated exactly: ``k * start + i * size`` is exact in float64 and the division by
    ``k`` is an exact floor/ceil.
    """
    k = group_size
    size = tf.maximum(end - start, 0.1)
    i = tf.range(k + 1, dtype=tf.float64)
    num = float(k) * tf.cast(start, tf.float64)[..., None] + i * tf.cast(size, tf.float64)[..., None]  # k * edge_i
    limit = tf.cast(limit, tf.float64)
    lo = tf.clip_by_value(_floor_div(num[..., :-1], k), 0.0, limit)
    hi = tf.clip_by_value(_ceil_div(num[..., 1:], k), 0.0, limit)
    return tf.cast(lo, tf.int32), tf.cast(hi, tf.int32)


def ps_roi_pool(score_maps, boxes, *, group_size, output_dim, spatial_scale):
    """Exact R-FCN PSRoI average pooling (Caffe ``PSROIPooling``) via a summed-area table.

    Args:
        score_maps: ``[B, H, W, group_size**2 * output_dim]``, class-major channels (module
            docstring).
        boxes: ``[B, R, 4]`` yxyx input pixels, exclusive bottom/right edge.
        group_size: k (bins per side; Caffe ``group_size == pooled_size``).
        output_dim: D (channels per bin, e.g. C+1 or 8).
        spatial_scale: map scale, ``1 / stride``.
    Returns:
        ``[B, R, k, k, D]`` in ``score_maps.dtype``.
    """
    k, d = int(group_size), int(output_dim)
    _check_channels(score_maps, k, d)
    boxes = tf.stop_gradient(tf.cast(boxes, tf.float32))
    batch = tf.shape(boxes)[0]
    num_rois = boxes.shape[1] if boxes.shape[1] is not None else tf.shape(boxes)[1]
    height = tf.shape(score_maps)[1]
    width = tf.shape(score_maps)[2]
    s = tf.constant(spatial_scale, tf.float32)

    # our exclusive edge x2 is Caffe's inclusive pixel x2 - 1
    y1, x1, y2, x2 = tf.unstack(boxes, 4, axis=-1)
    start_h = _round_half_away(y1) * s
    start_w = _round_half_away(x1) * s
    end_h = (_round_half_away(y2 - 1.0) + 1.0) * s
    end_w = (_round_half_away(x2 - 1.0) + 1.0) * s
    hs, he = _caffe_bin_edges(start_h, end_h, k, height)  # [B, R, k]
    ws, we = _caffe_bin_edges(start_w, end_w, k, width)

    # summed-area table, bin-major: sat[b, bin, i, j] = sum_{y<i, x<j} maps[b, y, x, channel(bin)]
    grouped = _bin_major(tf.cast(score_maps, tf.float64), k, d)
    sat = tf.cumsum(tf.cumsum(grouped, axis=2), axis=3)
    sat = tf.pad(sat, [[0, 0], [0, 0], [1, 0], [1, 0], [0, 0]])
    plane = (height + 1) * (width + 1)
    sat = tf.reshape(sat, [batch, k * k * plane, d])

    bins = tf.reshape(tf.range(k * k, dtype=tf.int32), [1, 1, k, k]) * plane
    row = width + 1

    def corner(yi, xi):
        index = bins + yi[..., :, None] * row + xi[..., None, :]  # [B, R, k, k]
        values = tf.gather(sat, tf.reshape(index, [batch, -1]), batch_dims=1)
        return tf.reshape(values, [batch, num_rois, k, k, d])

    total = corner(he, we) - corner(hs, we) - corner(he, ws) + corner(hs, ws)
    area = (he - hs)[..., :, None] * (we - ws)[..., None, :]  # [B, R, k, k], >= 0
    area = tf.cast(area, tf.float64)[..., None]
    out = tf.where(area > 0, total / tf.maximum(area, 1.0), tf.zeros_like(total))
    return tf.cast(out, score_maps.dtype)


def ps_roi_align(score_maps, boxes, *, group_size, output_dim, spatial_scale, sampling_ratio=2, aligned=True):
    """Bilinear PSRoI pooling (torchvision ``ps_roi_align`` semantics; module docstring).

    Args:
        score_maps: ``[B, H, W, group_size**2 * output_dim]``, class-major channels.
        boxes: ``[B, R, 4]`` yxyx input pixels.
        group_size, output_dim, spatial_scale: as :func:`ps_roi_pool`.
        sampling_ratio: S >= 1 samples per bin side.
        aligned: ``-0.5`` half-pixel shift (torchvision). ``False``: no shift, RoI >= 1 cell.
    Returns:
        ``[B, R, k, k, D]`` in ``score_maps.dtype``.
    """
    k, d, n = int(group_size), int(output_dim), int(sampling_ratio)
    if n < 1:
        raise ValueError("sampling_ratio must be >= 1 (adaptive sampling needs dynamic shapes).")
    _check_channels(score_maps, k, d)
    boxes = tf.stop_gradient(tf.cast(boxes, tf.float32))
    batch = tf.shape(boxes)[0]
    num_rois = boxes.shape[1] if boxes.shape[1] is not None else tf.shape(boxes)[1]
    height = tf.shape(score_maps)[1]
    width = tf.shape(score_maps)[2]

    shift = 0.5 if aligned else 0.0
    fb = boxes * spatial_scale - shift
    y0, x0, y1, x1 = tf.unstack(fb, 4, axis=-1)
    h, w = y1 - y0, x1 - x0
    if not aligned:
        h = tf.maximum(h, 1.0)
        w = tf.maximum(w, 1.0)
    # sample coordinates [B, R, k, S]: bin start + (i + 0.5) * bin / S
    steps = (tf.range(n, dtype=tf.float32) + 0.5) / float(n)
    cells = tf.range(k, dtype=tf.float32)[:, None] + steps[None, :]  # [k, S]
    ys = y0[..., None, None] + (h / float(k))[..., None, None] * cells
    xs = x0[..., None, None] + (w / float(k))[..., None, None] * cells
    y_lo, y_hi, wy_lo, wy_hi, vy = bilinear_axis(ys, height)
    x_lo, x_hi, wx_lo, wx_hi, vx = bilinear_axis(xs, width)

    flat = tf.reshape(_bin_major(tf.cast(score_maps, tf.float32), k, d), [batch, -1, d])  # [B, k*k*H*W, D]
    plane = height * width
    bins = tf.reshape(tf.range(k * k, dtype=tf.int32), [1, 1, k, k, 1, 1]) * plane

    def expand_y(t):  # [B, R, k(gh), S(iy)] -> [B, R, k, 1, S, 1]
        return t[:, :, :, None, :, None]

    def expand_x(t):  # [B, R, k(gw), S(ix)] -> [B, R, 1, k, 1, S]
        return t[:, :, None, :, None, :]

    def gather(yi, xi):
        index = bins + expand_y(yi) * width + expand_x(xi)  # [B, R, k, k, S, S]
        values = tf.gather(flat, tf.reshape(index, [batch, -1]), batch_dims=1)
        return tf.reshape(values, [batch, num_rois, k, k, n, n, d])

    valid = tf.cast(expand_y(vy) & expand_x(vx), tf.float32)

    def weight(a, b):
        return (expand_y(a) * expand_x(b) * valid)[..., None]

    out = (
        gather(y_lo, x_lo) * weight(wy_lo, wx_lo)
        + gather(y_lo, x_hi) * weight(wy_lo, wx_hi)
        + gather(y_hi, x_lo) * weight(wy_hi, wx_lo)
        + gather(y_hi, x_hi) * weight(wy_hi, wx_hi)
    )
    return tf.cast(tf.reduce_mean(out, axis=[4, 5]), score_maps.dtype)


@keras.saving.register_keras_serializable(package="kerasdet")
class PSRoIPooling(keras.layers.Layer):
    """Position-sensitive RoI pooling (R-FCN local branch) on one score map.

    Call with ``(score_maps, boxes)``: ``score_maps [B, H, W, group_size**2 * output_dim]``
    in Caffe's class-major layout (output channel ``c`` of bin ``(gh, gw)`` is input channel
    ``(c*k + gh)*k + gw``), ``boxes [B, R, 4]`` yxyx input pixels (exclusive bottom/right
    edge). Returns ``[B, R, k, k, D]``, or ``[B, R, D]`` with ``vote=True``.

    Args:
        output_dim: D, channels per bin (``C + 1`` for the class maps, 8 for R-FCN's
            class-agnostic box maps). Required.
        group_size: k bins per side. Default 7 (R-FCN / CoupleNet).
        spatial_scale: ``1 / stride`` of the score maps. Default 1/16 (dilated ResNet).
        method: ``"pool"`` — exact Caffe PSROIPooling (rounded RoI, floor/ceil bins,
            average; R-FCN's op, the default); ``"align"`` — torchvision ``ps_roi_align``
            (no quantization, ``sampling_ratio**2`` bilinear samples per bin).
        sampling_ratio: S >= 1 for ``"align"``. Default 2.
        aligned: half-pixel shift for ``"align"``. Default True (torchvision).
        vote: average the ``k x k`` bins (R-FCN voting). Default False.

    Both methods are batched gather ops, differentiable w.r.t. the score maps, and compile
    with XLA (module docstring).
    """

    def __init__(
        self,
        *,
        output_dim,
        group_size=7,
        spatial_scale=1.0 / 16.0,
        method="pool",
        sampling_ratio=2,
        aligned=True,
        vote=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if method not in PSROI_METHODS:
            raise ValueError(f"method must be one of {PSROI_METHODS}, got {method!r}.")
        if int(group_size) < 1 or int(output_dim) < 1:
            raise ValueError("group_size and output_dim must be >= 1.")
        if int(sampling_ratio) < 1:
            raise ValueError("sampling_ratio must be >= 1 (adaptive sampling needs dynamic shapes).")
        self.output_dim = int(output_dim)
        self.group_size = int(group_size)
        self.spatial_scale = float(spatial_scale)
        self.method = method
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.vote = bool(vote)

    def call(self, score_maps, boxes):
        kwargs = dict(group_size=self.group_size, output_dim=self.output_dim, spatial_scale=self.spatial_scale)
        if self.method == "pool":
            out = ps_roi_pool(score_maps, boxes, **kwargs)
        else:
            out = ps_roi_align(
                score_maps, boxes, sampling_ratio=self.sampling_ratio, aligned=self.aligned, **kwargs
            )
        if self.vote:
            out = tf.reduce_mean(out, axis=[2, 3])
        return out

    def compute_output_shape(self, score_maps_shape, boxes_shape):
        lead = (boxes_shape[0], boxes_shape[1])
        if self.vote:
            return lead + (self.output_dim,)
        return lead + (self.group_size, self.group_size, self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "output_dim": self.output_dim,
                "group_size": self.group_size,
                "spatial_scale": self.spatial_scale,
                "method": self.method,
                "sampling_ratio": self.sampling_ratio,
                "aligned": self.aligned,
                "vote": self.vote,
            }
        )
        return config
