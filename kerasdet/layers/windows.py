"""Resampling square windows out of images and masks back into them (DeepMask / SharpMask).

:func:`crop_windows` cuts training patches (:mod:`kerasdet.data.patches`) and
:func:`paste_masks` puts a window's predicted mask back into image coordinates (the
full-image inference of :class:`kerasdet.models.sharpmask.SharpMask`); both use pixel
edges for windows and the half-pixel (pixel-centre) sampling convention of
``tf.image.resize``, so a crop and a paste of the same window are inverse resamplings.
Graph ops, batched over windows (one ``crop_and_resize`` call each, or, with
``backend="matmul"``, two batched matrix products that XLA compiles: ``crop_and_resize``
has no XLA kernel).
"""
import tensorflow as tf


#: ``backend`` values of :func:`crop_windows` / :func:`paste_masks`.
BACKENDS = ("crop_and_resize", "matmul")


def _axis_weights(coord, length):
    """Bilinear weights ``[M, S, length]`` of the samples ``coord`` ``[M, S]`` (pixel-index
    coordinates) on an axis of ``length`` pixels, ``crop_and_resize``'s rule: rows ``floor``
    and ``floor + 1`` by the fraction; a sample outside ``[0, length - 1]`` has no weights.
    Also returns the ``[M, S]`` validity."""
    valid = (coord >= 0.0) & (coord <= tf.cast(length, tf.float32) - 1.0)
    top = tf.floor(coord)
    frac = (coord - top)[..., None]
    top = tf.cast(top, tf.int32)
    low = tf.one_hot(tf.clip_by_value(top, 0, length - 1), length)
    high = tf.one_hot(tf.clip_by_value(top + 1, 0, length - 1), length)
    valid_f = tf.cast(valid, tf.float32)
    return (low * (1.0 - frac) + high * frac) * valid_f[..., None], valid_f


def _crop_matmul(images, windows, box_indices, size_h, size_w, extrapolation_value):
    """:func:`crop_windows` on the padded ``images`` (``windows`` in their pixel edges) as
    ``W_y @ image @ W_x^T`` per window (bilinear)."""
    shape = tf.shape(images)
    y0, x0, y1, x1 = tf.unstack(windows, axis=-1)

    def centres(start, end, n):  # pixel-centre samples in pixel-index coordinates
        n = tf.cast(n, tf.float32)
        return start[:, None] - 0.5 + (tf.range(n)[None, :] + 0.5) * ((end - start) / n)[:, None]

    wy, vy = _axis_weights(centres(y0, y1, size_h), shape[1])
    wx, vx = _axis_weights(centres(x0, x1, size_w), shape[2])
    picked = tf.gather(images, tf.cast(box_indices, tf.int32))
    out = tf.einsum("msh,mhwc,mtw->mstc", wy, picked, wx)
    if extrapolation_value:
        outside = 1.0 - vy[:, :, None] * vx[:, None, :]
        out += float(extrapolation_value) * outside[..., None]
    return out


def crop_windows(images, windows, box_indices, size, *, method="bilinear", extrapolation_value=0.0,
                 backend="crop_and_resize"):
    """Resamples ``windows`` (yxyx pixel edges of ``images``) to ``size`` (an int for a
    square, or ``(height, width)``).

    Pixel ``(i, j)`` of a crop samples the window at ``(y0 + (i + 0.5) * h / size_h, x0 +
    (j + 0.5) * w / size_w)`` (pixel centres: the half-pixel convention of
    ``tf.image.resize``), bilinearly (``method``) from ``images`` ``[N, H, W, C]``
    extended by ``extrapolation_value`` all around: exactly what sampling the image padded
    with that value gives (the image is padded by one pixel, so a sample a rounding error
    past the last pixel centre still reads that pixel). ``windows`` ``[M, 4]``,
    ``box_indices`` ``[M]`` int32. Returns ``[M, size_h, size_w, C]`` float32.

    ``backend``: ``"crop_and_resize"`` (default; ``tf.image.crop_and_resize``) or
    ``"matmul"`` (the same samples as two batched matrix products with one-hot bilinear
    weights: XLA-compilable, ``method="bilinear"`` only; equal to the default to float
    rounding).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    size_h, size_w = (size, size) if isinstance(size, int) else size
    images = tf.pad(tf.cast(images, tf.float32), [[0, 0], [1, 1], [1, 1], [0, 0]],
                    constant_values=extrapolation_value)
    windows = tf.cast(windows, tf.float32) + 1.0
    if backend == "matmul":
        if method != "bilinear":
            raise ValueError(f"backend 'matmul' is bilinear only, got method={method!r}")
        return _crop_matmul(images, windows, box_indices, size_h, size_w, extrapolation_value)
    shape = tf.shape(images)
    height = tf.cast(shape[1], tf.float32)
    width = tf.cast(shape[2], tf.float32)
    y0, x0, y1, x1 = tf.unstack(windows, axis=-1)
    half_y = 0.5 * (y1 - y0) / tf.cast(size_h, tf.float32)
    half_x = 0.5 * (x1 - x0) / tf.cast(size_w, tf.float32)
    # crop_and_resize samples y0' * (H - 1) ... y1' * (H - 1) with the end points on
    # the first / last sample: map the pixel-centre samples onto that.
    boxes = tf.stack([(y0 + half_y - 0.5) / tf.maximum(height - 1.0, 1.0),
                      (x0 + half_x - 0.5) / tf.maximum(width - 1.0, 1.0),
                      (y1 - half_y - 0.5) / tf.maximum(height - 1.0, 1.0),
                      (x1 - half_x - 0.5) / tf.maximum(width - 1.0, 1.0)], axis=-1)
    return tf.image.crop_and_resize(images, boxes, tf.cast(box_indices, tf.int32), [size_h, size_w], method=method,
                                    extrapolation_value=extrapolation_value)


def paste_masks(masks, windows, box_indices, size, *, method="bilinear", backend="crop_and_resize"):
    """Puts ``masks`` ``[M, m, m]`` (each covering its ``windows`` row, yxyx pixel edges
    of an image of ``size = (height, width)``) into image coordinates: ``[M, height,
    width]`` float32. ``box_indices`` must be ``range(M)`` (one mask per window; the
    argument keeps :func:`crop_windows`' layout).

    Image pixel ``(y, x)`` whose centre lies inside its window reads the mask at ``((y +
    0.5 - y0) * m / h - 0.5, ...)``, interpolated with the edge rows / columns repeated
    (what ``tf.image.resize`` does at the borders, so a mask resized to the window's size
    and pasted agree); pixels outside the window are 0. ``backend``: as
    :func:`crop_windows` (``"matmul"``: XLA-compilable).
    """
    masks = tf.cast(masks, tf.float32)
    windows = tf.cast(windows, tf.float32)
    side = tf.cast(tf.shape(masks)[1], tf.float32)
    height, width = size
    fh, fw = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    padded = tf.pad(masks, [[0, 0], [1, 1], [1, 1]], mode="SYMMETRIC")  # edge repeated once
    y0, x0, y1, x1 = tf.unstack(windows, axis=-1)
    sy = side / tf.maximum(y1 - y0, 1e-6)
    sx = side / tf.maximum(x1 - x0, 1e-6)
    # the image rectangle in the padded mask's pixel edges (one extra pixel on each side)
    rect = tf.stack([1.0 - y0 * sy, 1.0 - x0 * sx, 1.0 + (fh - y0) * sy, 1.0 + (fw - x0) * sx], axis=-1)
    pasted = crop_windows(padded[..., None], rect, box_indices, (height, width), method=method,
                          backend=backend)[..., 0]
    cy = tf.range(fh) + 0.5
    cx = tf.range(fw) + 0.5
    inside_y = (cy[None, :] >= y0[:, None]) & (cy[None, :] < y1[:, None])
    inside_x = (cx[None, :] >= x0[:, None]) & (cx[None, :] < x1[:, None])
    return pasted * tf.cast(inside_y[:, :, None] & inside_x[:, None, :], tf.float32)
