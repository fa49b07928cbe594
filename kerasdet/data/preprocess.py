"""Per-example preprocessing for detection: the standard path and SSD's augmentation.

Graph ops over one decoded example (``tf.data`` map functions), built from the
primitives of :mod:`kerasdet.data.geometry`; vectorized over boxes (and crop trials), with
stateless randomness (``seed``: ``[2]`` int tensor). Images are ``[h, w, 3]`` (uint8 or
float32 0..255); boxes yxyx absolute pixels.

Order of operations in :func:`preprocess_example` (and why):

1. optionally SSD's augmentation, :func:`ssd_augment` (below), which changes the image
   content and the object set, before anything is resized;
2. ``scale = resize_scale(...)`` -- letterbox fit into the canvas, or the Detectron rule
   (short side -> ``min_size``, long side capped at ``max_size``), times a random
   scale-jitter factor when training;
3. resize the image to ``round(h * scale), round(w * scale)`` (bilinear); boxes are
   scaled by the *per-axis* ratios ``new_h / h``, ``new_w / w`` so they follow the pixels
   exactly;
4. horizontal flip (p = 0.5) of the resized image: ``xmin' = new_w - xmax`` with
   ``new_w`` the resized width *before* padding;
5. crop to the canvas at a random offset if the resized image is larger (offset 0 when
   not training), then pad bottom/right with zeros to the canvas size;
6. boxes are shifted, clipped to the visible image region and dropped when less than
   ``min_visible_fraction`` of their area remains; kept boxes are compacted to the front
   (non-crowd first) and padded to ``max_boxes`` with class ``-1``.

Optional masks (``preprocess_example(masks=...)``): a uint8 ``[h, w, k]`` stack on the
original image's pixel grid follows the image through steps 3-5 with *the same* size,
flip decision and crop offset, resized with nearest neighbour
(:func:`~kerasdet.data.geometry.resize_masks`). With ``mask_rows=True`` the ``k``
channels are per-object masks that are compacted, dropped and padded row-for-row with
the boxes in step 6.

SSD's training augmentation (Liu et al., "SSD: Single Shot MultiBox Detector", ECCV 2016,
§2.2 "Training", paragraph "Data augmentation"; used unchanged by ASSD, Yi et al., "ASSD:
Attentive Single Shot Multibox Detector", §4 "Implementation Details"):

1. :func:`photometric_distort` -- brightness +-32, then contrast [0.5, 1.5] before or after
   the HSV step (saturation [0.5, 1.5], hue +-18 degrees), then a random channel swap; each
   with p = 0.5 (the ssd.pytorch order the ASSD authors use);
2. :func:`random_expand` -- zoom out: p = 0.5, the image placed at a random offset on a
   canvas ``U(1, 4)`` times larger filled with the mean pixel (123.7, 116.3, 103.5) (the
   authors' code fills with a normalised mean on a 0-255 image, i.e. black; we fill with
   the mean pixel as SSD intends);
3. :func:`iou_random_crop` -- one of {whole image, min IoU 0.1/0.3/0.5/0.7/0.9, any patch}
   (SSD's set; the authors' code drops 0.5), sides ``U(0.3, 1)`` of the image, aspect
   ``h / w`` in [0.5, 2]; up to 50 trials drawn AT ONCE (vectorised) and the first that
   satisfies the mode wins; objects whose centre falls inside are kept and clipped. When
   no trial qualifies the image is kept whole (ssd.pytorch redraws the mode forever);
4. horizontal flip (p = 0.5), optional (off for digits: a mirrored digit is another glyph).

Where we differ from SSD: the final resize keeps the aspect ratio and pads (kerasdet's
pipeline), where SSD squashes to a square.
"""
from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from kerasdet import boxes as box_ops
from kerasdet.data.geometry import (
    MIN_VISIBLE_FRACTION,
    clip_boxes_to_region,
    compact_and_pad,
    compaction_order,
    crop_and_pad,
    random_crop_offset,
    random_horizontal_flip,
    random_scale_factor,
    resize_image_and_boxes,
    resize_masks,
    resize_scale,
    resized_shape,
)

MEAN_PIXEL = (123.7, 116.3, 103.5)
#: SSD's crop modes: 0 = whole image, -1 = any patch, else the minimum IoU with every object.
CROP_MIN_IOUS = (0.1, 0.3, 0.5, 0.7, 0.9)

_PERMUTATIONS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


def _split(seed, n):
    return tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=n))


def _maybe(seed, probability, fn, x):
    apply = tf.random.stateless_uniform([], seed=seed) < probability
    return tf.cond(apply, lambda: fn(x), lambda: x)


def photometric_distort(image, seed, *, brightness=32.0, contrast=(0.5, 1.5), saturation=(0.5, 1.5),
                        hue_degrees=18.0, probability=0.5):
    """SSD's photometric distortions of a float 0..255 RGB image (shape kept, clipped to 0..255)."""
    s = _split(seed, 14)
    image = tf.cast(image, tf.float32)

    def bright(x):
        return x + tf.random.stateless_uniform([], seed=s[1], minval=-brightness, maxval=brightness)

    def contrast_op(x):
        return x * tf.random.stateless_uniform([], seed=s[3], minval=contrast[0], maxval=contrast[1])

    def hsv_ops(x):
        hsv = tf.image.rgb_to_hsv(tf.clip_by_value(x, 0.0, 255.0) / 255.0)
        h, sat, v = tf.unstack(hsv, axis=-1)
        sat_factor = tf.random.stateless_uniform([], seed=s[5], minval=saturation[0], maxval=saturation[1])
        sat = tf.where(tf.random.stateless_uniform([], seed=s[6]) < probability, tf.clip_by_value(sat * sat_factor, 0.0, 1.0), sat)
        shift = tf.random.stateless_uniform([], seed=s[7], minval=-hue_degrees, maxval=hue_degrees) / 360.0
        h = tf.where(tf.random.stateless_uniform([], seed=s[8]) < probability, tf.math.floormod(h + shift, 1.0), h)
        return tf.image.hsv_to_rgb(tf.stack([h, sat, v], axis=-1)) * 255.0

    image = _maybe(s[0], probability, bright, image)
    contrast_first = tf.random.stateless_uniform([], seed=s[9]) < 0.5
    image = tf.cond(contrast_first, lambda: _maybe(s[2], probability, contrast_op, image), lambda: image)
    image = hsv_ops(image)
    image = tf.cond(contrast_first, lambda: image, lambda: _maybe(s[2], probability, contrast_op, image))
    perm = tf.gather(tf.constant(_PERMUTATIONS), tf.random.stateless_uniform([], seed=s[10], maxval=6, dtype=tf.int32))
    image = _maybe(s[11], probability, lambda x: tf.gather(x, perm, axis=-1), image)
    return tf.clip_by_value(image, 0.0, 255.0)


def random_expand(image, boxes, seed, *, max_ratio=4.0, probability=0.5, fill=MEAN_PIXEL):
    """Zoom out: place ``image`` on a ``U(1, max_ratio)``-times larger ``fill`` canvas.

    Returns ``(image, boxes)``; boxes shifted by the placement offset.
    """
    s = _split(seed, 3)
    image = tf.cast(image, tf.float32)
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    apply = tf.random.stateless_uniform([], seed=s[0]) < probability
    ratio = tf.where(apply, tf.random.stateless_uniform([], seed=s[1], minval=1.0, maxval=max_ratio), 1.0)
    new_h = tf.cast(tf.cast(h, tf.float32) * ratio, tf.int32)
    new_w = tf.cast(tf.cast(w, tf.float32) * ratio, tf.int32)
    u = tf.random.stateless_uniform([2], seed=s[2])
    top = tf.cast(u[0] * tf.cast(new_h - h, tf.float32), tf.int32)
    left = tf.cast(u[1] * tf.cast(new_w - w, tf.float32), tf.int32)
    fill = tf.constant(fill, tf.float32)
    canvas = tf.pad(image - fill, [[top, new_h - h - top], [left, new_w - w - left], [0, 0]]) + fill
    shift = tf.cast(tf.stack([top, left, top, left]), tf.float32)
    return canvas, tf.cast(boxes, tf.float32) + shift


def iou_random_crop(image, boxes, valid, seed, *, min_ious: Sequence[float] = CROP_MIN_IOUS, trials=50,
                    min_scale=0.3, aspect_range=(0.5, 2.0), mode=None):
    """SSD's IoU-constrained random crop.

    Args:
        image: ``[h, w, c]``. boxes: ``[n, 4]`` yxyx px. valid: ``[n]`` bool (real objects).
        seed: ``[2]`` int tensor.
        min_ious: the IoU modes; with "whole image" and "any patch" they are drawn uniformly.
        trials: candidate crops drawn at once. Default 50.
        min_scale: smallest crop side as a fraction of the image side. Default 0.3.
        aspect_range: allowed crop ``h / w``. Default (0.5, 2).
        mode: force a mode (``0`` whole image, ``-1`` any patch, or a minimum IoU) instead of
            drawing one (tests).
    Returns:
        ``(image, boxes, keep)``: the cropped image, boxes shifted and clipped to it, and
        ``keep`` (valid objects whose centre lies inside the crop).
    """
    s = _split(seed, 3)
    boxes = tf.cast(boxes, tf.float32)
    valid = tf.cast(valid, tf.bool)
    shape = tf.shape(image)
    hf, wf = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    modes = tf.constant([0.0, *[float(m) for m in min_ious], -1.0])
    if mode is None:
        chosen = tf.gather(modes, tf.random.stateless_uniform([], seed=s[0], maxval=len(min_ious) + 2, dtype=tf.int32))
    else:
        chosen = tf.constant(float(mode))
    u = tf.random.stateless_uniform([trials, 4], seed=s[1])
    ch = (min_scale + (1.0 - min_scale) * u[:, 0]) * hf
    cw = (min_scale + (1.0 - min_scale) * u[:, 1]) * wf
    top = tf.floor(u[:, 2] * (hf - ch))
    left = tf.floor(u[:, 3] * (wf - cw))
    ch, cw = tf.floor(ch), tf.floor(cw)
    crops = tf.stack([top, left, top + ch, left + cw], axis=-1)  # [T, 4]
    ok_aspect = (ch / tf.maximum(cw, 1.0) >= aspect_range[0]) & (ch / tf.maximum(cw, 1.0) <= aspect_range[1]) & (ch >= 1) & (cw >= 1)
    overlaps = box_ops.iou(crops, boxes)  # [T, n]
    min_overlap = tf.reduce_min(tf.where(valid[None, :], overlaps, 2.0), axis=1)
    centers = 0.5 * (boxes[:, :2] + boxes[:, 2:])  # [n, 2]
    inside = (
        (centers[None, :, 0] > crops[:, None, 0]) & (centers[None, :, 0] < crops[:, None, 2])
        & (centers[None, :, 1] > crops[:, None, 1]) & (centers[None, :, 1] < crops[:, None, 3])
        & valid[None, :]
    )  # [T, n]
    has_objects = tf.reduce_any(valid)
    qualifies = ok_aspect & ((min_overlap >= chosen) | (chosen < 0)) & (tf.reduce_any(inside, axis=1) | ~has_objects)
    found = tf.reduce_any(qualifies) & (chosen != 0.0)
    pick = tf.argmax(tf.cast(qualifies, tf.int32), output_type=tf.int32)
    whole = tf.stack([0.0, 0.0, hf, wf])
    crop = tf.where(found, crops[pick], whole)
    keep = tf.where(found, inside[pick], valid)
    y0, x0 = tf.cast(crop[0], tf.int32), tf.cast(crop[1], tf.int32)
    size = tf.cast(tf.stack([crop[2] - crop[0], crop[3] - crop[1]]), tf.int32)
    image = tf.slice(image, tf.stack([y0, x0, 0]), tf.concat([size, [-1]], 0))
    shift = tf.stack([crop[0], crop[1], crop[0], crop[1]])
    limit = tf.stack([crop[2] - crop[0], crop[3] - crop[1]] * 2)
    boxes = tf.clip_by_value(boxes - shift, 0.0, limit)
    return image, boxes, keep


def ssd_augment(image, boxes, classes, is_crowd, seed, *, photometric=True, expand=True, crop=True, flip=True,
                expand_max_ratio=4.0):
    """The full SSD chain on one example (unpadded ``[n]`` labels).

    Returns ``(image float32, boxes, classes, is_crowd)`` with the objects the crop dropped
    removed.
    """
    s = _split(seed, 4)
    image = tf.cast(image, tf.float32)
    boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
    classes = tf.cast(classes, tf.int32)
    is_crowd = tf.cast(is_crowd, tf.bool)
    if photometric:
        image = photometric_distort(image, s[0])
    if expand:
        image, boxes = random_expand(image, boxes, s[1], max_ratio=expand_max_ratio)
    if crop:
        image, boxes, keep = iou_random_crop(image, boxes, classes >= 0, s[2])
        boxes, classes, is_crowd = (tf.boolean_mask(t, keep) for t in (boxes, classes, is_crowd))
    if flip:
        image, boxes, _ = random_horizontal_flip(image, boxes, s[3])
    return image, boxes, classes, is_crowd


def preprocess_example(
    image,
    boxes,
    classes,
    is_crowd,
    *,
    image_size: Sequence[int],
    min_size: int | None = None,
    max_size: int | None = None,
    flip: bool = False,
    scale_jitter: Sequence[float] | None = None,
    seed=None,
    max_boxes: int = 100,
    min_visible_fraction: float = MIN_VISIBLE_FRACTION,
    ssd_augmentation: bool = False,
    masks=None,
    mask_rows: bool = False,
):
    """Resize (+ optional random flip / scale jitter), crop/pad to the canvas, pad labels.

    Args:
      image: [h, w, 3] uint8 or float image.
      boxes: [n, 4] yxyx boxes in ``image`` pixels; ``classes`` [n] int32;
        ``is_crowd`` [n] bool.
      image_size: canvas ``(H, W)``.
      min_size, max_size: see :func:`resize_scale`.
      flip: random horizontal flip with p = 0.5.
      scale_jitter: ``(low, high)`` multiplies the resize scale by a uniform factor; the
        result is randomly cropped to the canvas when larger.
      seed: ``[2]`` int tensor, required when ``flip`` or ``scale_jitter`` is used.
      max_boxes: label rows after padding.
      ssd_augmentation: first apply SSD's photometric distortion, expand and IoU crop
        (:func:`ssd_augment`; its flip is this function's ``flip``). Needs ``seed``.
      masks: optional uint8 ``[h, w, k]`` on ``image``'s pixel grid, transformed exactly
        like the image (nearest-neighbour resize, same flip and crop offset, zero pad).
        Not supported with ``ssd_augmentation``.
      mask_rows: ``masks`` holds one channel per box (``k == n``): return them as
        ``[max_boxes, H, W]`` compacted/dropped/padded (zeros) like the boxes; otherwise
        the canvas ``[H, W, k]`` is returned as is.

    Returns:
      ``(image float32 [H, W, 3], boxes [max_boxes, 4], classes [max_boxes],
      is_crowd [max_boxes], scale float32 scalar)``, plus the transformed ``masks`` as a
      sixth item when ``masks`` is given.
    """
    random = flip or scale_jitter is not None or ssd_augmentation
    if random and seed is None:
        raise ValueError("preprocess_example: a seed is required for flip/scale_jitter/ssd_augmentation")
    if masks is not None and ssd_augmentation:
        raise ValueError("preprocess_example: masks are not supported with ssd_augmentation "
                         "(its expand/crop does not transform masks)")
    if random:
        flip_seed, scale_seed, crop_seed, ssd_seed = tf.unstack(
            tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=4))
    boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
    if ssd_augmentation:
        image, boxes, classes, is_crowd = ssd_augment(image, boxes, classes, is_crowd, ssd_seed, flip=False)
    shape = tf.shape(image)
    scale = resize_scale(shape[0], shape[1], image_size, min_size, max_size)
    if scale_jitter is not None:
        scale = scale * random_scale_factor(scale_seed, scale_jitter)
    new_h, new_w = resized_shape(shape[0], shape[1], scale)
    image, boxes = resize_image_and_boxes(image, boxes, new_h, new_w)
    if masks is not None:
        masks = resize_masks(masks, new_h, new_w)
    if flip:
        image, boxes, flipped = random_horizontal_flip(image, boxes, flip_seed)
        if masks is not None:
            masks = tf.cond(flipped, lambda: tf.reverse(masks, axis=[1]), lambda: masks)
    if scale_jitter is not None:
        offset = random_crop_offset(new_h, new_w, image_size, crop_seed)
    else:
        offset = tf.zeros([2], tf.int32)
    image, boxes, visible = crop_and_pad(image, boxes, offset, image_size)
    boxes, keep = clip_boxes_to_region(boxes, visible, min_visible_fraction)
    is_crowd = tf.cast(is_crowd, tf.bool)
    if masks is not None:
        masks, _, _ = crop_and_pad(masks, tf.zeros([0, 4], tf.float32), offset, image_size)
        if mask_rows:
            order = compaction_order(is_crowd, keep, max_boxes)
            masks = tf.gather(tf.transpose(masks, [2, 0, 1]), order)
            masks = tf.pad(masks, [[0, max_boxes - tf.shape(order)[0]], [0, 0], [0, 0]])
            masks.set_shape([max_boxes, int(image_size[0]), int(image_size[1])])
    boxes, classes, is_crowd = compact_and_pad(
        boxes, tf.cast(classes, tf.int32), is_crowd, keep, max_boxes)
    if masks is not None:
        return image, boxes, classes, is_crowd, scale, masks
    return image, boxes, classes, is_crowd, scale
