"""SSD's training augmentation (Liu et al. 2016 §2.2.3; used unchanged by ASSD, seed 002 §4).

Per example, before :func:`kerasdet.data.augment.preprocess_example` resizes onto the
canvas (kept in its own module next to ``augment.py`` because it changes the image content
and the object set, not only the geometry):

1. :func:`photometric_distort` -- brightness +-32, then contrast [0.5, 1.5] before or after
   the HSV step (saturation [0.5, 1.5], hue +-18 degrees), then a random channel swap; each
   with p = 0.5 (the ssd.pytorch order the ASSD authors use);
2. :func:`random_expand` -- zoom out: p = 0.5, the image placed at a random offset on a
   canvas ``U(1, 4)`` times larger filled with the mean pixel (123.7, 116.3, 103.5) (the
   authors' code fills with a normalised mean on a 0-255 image, i.e. black: spec ambiguity
   12; we fill with the mean pixel as SSD intends);
3. :func:`iou_random_crop` -- one of {whole image, min IoU 0.1/0.3/0.5/0.7/0.9, any patch}
   (SSD's set; the authors' code drops 0.5), sides ``U(0.3, 1)`` of the image, aspect
   ``h / w`` in [0.5, 2]; up to 50 trials drawn AT ONCE (vectorised) and the first that
   satisfies the mode wins; objects whose centre falls inside are kept and clipped. When
   no trial qualifies the image is kept whole (ssd.pytorch redraws the mode forever);
4. horizontal flip (p = 0.5), optional (off for digits: a mirrored digit is another glyph).

All graph ops with stateless randomness (``seed``: ``[2]`` int tensor), vectorised over
boxes and trials. Images are float32 0..255 ``[h, w, 3]``; boxes yxyx absolute pixels.

Where we differ from SSD: the final resize keeps the aspect ratio and pads (kerasdet's
pipeline), where SSD squashes to a square.
"""
from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from kerasdet import boxes as box_ops
from kerasdet.data.augment import random_horizontal_flip

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
