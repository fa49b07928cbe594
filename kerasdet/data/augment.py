"""Per-example geometry for detection input pipelines: resize, flip, scale jitter, crop/pad.

Pure TensorFlow graph ops, vectorized over the boxes of an image (no Python loops over
boxes), usable inside ``tf.data`` map functions. Boxes are ``[ymin, xmin, ymax, xmax]``
float32 in absolute pixels with the pixel-edge convention (a box covering pixel columns
0..9 has ``xmin = 0``, ``xmax = 10``). Randomness is stateless: every random op takes an
explicit ``seed`` (shape ``[2]`` integer tensor), so results are reproducible.

Order of operations in :func:`preprocess_example` (and why):

1. ``scale = resize_scale(...)`` -- letterbox fit into the canvas, or the Detectron rule
   (short side -> ``min_size``, long side capped at ``max_size``), times a random
   scale-jitter factor when training.
2. Resize the image to ``round(h * scale), round(w * scale)`` (bilinear); boxes are scaled
   by the *per-axis* ratios ``new_h / h``, ``new_w / w`` so they follow the pixels exactly.
3. Horizontal flip (p = 0.5) of the resized image: ``xmin' = new_w - xmax`` with
   ``new_w`` the resized width *before* padding.
4. Crop to the canvas at a random offset if the resized image is larger (offset 0 when
   not training), then pad bottom/right with zeros to the canvas size.
5. Boxes are shifted, clipped to the visible image region and dropped when less than
   ``min_visible_fraction`` of their area remains; kept boxes are compacted to the front
   (non-crowd first) and padded to ``max_boxes`` with class ``-1``.

Optional masks (``preprocess_example(masks=...)``): a uint8 ``[h, w, k]`` stack on the
original image's pixel grid follows the image through steps 2-4 with *the same* size,
flip decision and crop offset. They are resized with **nearest neighbour** (TF2's
``half_pixel_centers`` sampling, the same pixel-centre mapping as the image's bilinear
resize), so label values (0/1, or 255 = "ignore") survive unchanged and a union of
masks commutes with the resize (nearest neighbour only selects source pixels). With
``mask_rows=True`` the ``k`` channels are per-object masks that are compacted, dropped
and padded row-for-row with the boxes in step 5.
"""
from __future__ import annotations

from typing import Sequence

import tensorflow as tf

#: A box cut by the crop survives when at least this fraction of its area stays visible.
MIN_VISIBLE_FRACTION = 0.25


def resize_scale(height, width, image_size: Sequence[int], min_size=None, max_size=None):
    """Resize factor (network px per original px) as a float32 scalar tensor.

    * ``min_size``/``max_size`` None: ``min(H / h, W / w)`` (fit inside the canvas).
    * ``min_size`` given: ``min_size / min(h, w)``, reduced so that ``max(h, w) * scale
      <= max_size`` when ``max_size`` is given (Detectron's rule).
    * only ``max_size``: ``max_size / max(h, w)``.
    """
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    if min_size is None and max_size is None:
        return tf.minimum(float(image_size[0]) / h, float(image_size[1]) / w)
    long_side = tf.maximum(h, w)
    if min_size is None:
        return float(max_size) / long_side
    scale = float(min_size) / tf.minimum(h, w)
    if max_size is not None:
        scale = tf.minimum(scale, float(max_size) / long_side)
    return scale


def resized_shape(height, width, scale):
    """``(round(h * scale), round(w * scale))`` as int32 scalars, at least 1 each."""
    h = tf.cast(height, tf.float32) * scale
    w = tf.cast(width, tf.float32) * scale
    return (tf.maximum(tf.cast(tf.round(h), tf.int32), 1),
            tf.maximum(tf.cast(tf.round(w), tf.int32), 1))


def resize_image_and_boxes(image, boxes, new_height, new_width):
    """Bilinear resize of ``image`` [h, w, c] to ``(new_height, new_width)`` as float32;
    ``boxes`` [n, 4] are scaled by the per-axis ratios. Skips the resize when the size is
    unchanged."""
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    same = tf.logical_and(tf.equal(h, new_height), tf.equal(w, new_width))
    image = tf.cond(
        same,
        lambda: tf.cast(image, tf.float32),
        lambda: tf.image.resize(image, tf.stack([new_height, new_width]), method="bilinear"),
    )
    ratio = tf.stack([
        tf.cast(new_height, tf.float32) / tf.cast(h, tf.float32),
        tf.cast(new_width, tf.float32) / tf.cast(w, tf.float32),
    ])
    boxes = tf.reshape(boxes, [-1, 4]) * tf.tile(ratio, [2])
    return image, boxes


def resize_masks(masks, new_height, new_width):
    """Nearest-neighbour resize of uint8 ``masks`` [h, w, k] to ``(new_height,
    new_width)`` (values kept exactly; skipped when the size is unchanged or ``k == 0``,
    which TF's resize op rejects)."""
    shape = tf.shape(masks)
    same = tf.logical_and(tf.equal(shape[0], new_height), tf.equal(shape[1], new_width))
    empty = tf.equal(shape[2], 0)
    masks = tf.cond(empty, lambda: tf.zeros(tf.stack([new_height, new_width, 0]), masks.dtype),
                    lambda: masks)
    same = tf.logical_or(same, empty)
    return tf.cond(
        same,
        lambda: masks,
        lambda: tf.image.resize(masks, tf.stack([new_height, new_width]),
                                method="nearest"),
    )


def flip_boxes_horizontal(boxes, width):
    """Mirror yxyx boxes in an image of ``width`` px: ``xmin' = width - xmax``,
    ``xmax' = width - xmin``."""
    width = tf.cast(width, boxes.dtype)
    ymin, xmin, ymax, xmax = tf.unstack(boxes, num=4, axis=-1)
    return tf.stack([ymin, width - xmax, ymax, width - xmin], axis=-1)


def random_horizontal_flip(image, boxes, seed, probability: float = 0.5):
    """Flip ``image`` [h, w, c] and its ``boxes`` left-right with ``probability``.

    ``w`` is the image's own width (call this before padding). Returns
    ``(image, boxes, flipped)``.
    """
    flipped = tf.random.stateless_uniform([], seed=seed) < probability
    width = tf.shape(image)[1]
    image = tf.cond(flipped, lambda: tf.reverse(image, axis=[1]), lambda: image)
    boxes = tf.cond(flipped, lambda: flip_boxes_horizontal(boxes, width), lambda: boxes)
    return image, boxes, flipped


def random_scale_factor(seed, scale_jitter: Sequence[float]):
    """A factor drawn uniformly from ``[low, high]`` (``scale_jitter``)."""
    low, high = float(scale_jitter[0]), float(scale_jitter[1])
    return tf.random.stateless_uniform([], seed=seed, minval=low, maxval=high)


def random_crop_offset(height, width, image_size: Sequence[int], seed):
    """Uniform top-left offset ``(oy, ox)`` int32 of a canvas-sized crop inside an image of
    ``(height, width)``; 0 along an axis where the image is not larger than the canvas."""
    slack = tf.maximum(tf.stack([height - image_size[0], width - image_size[1]]), 0)
    u = tf.random.stateless_uniform([2], seed=seed)
    offset = tf.cast(tf.floor(u * tf.cast(slack + 1, tf.float32)), tf.int32)
    return tf.minimum(offset, slack)


def crop_and_pad(image, boxes, offset, image_size: Sequence[int]):
    """Crop ``image`` [h, w, c] at ``offset`` (oy, ox) to at most the canvas, pad it
    bottom/right with zeros to ``image_size``; shift ``boxes`` by the offset.

    Returns ``(canvas image [H, W, c], boxes, visible (h_vis, w_vis) int32)`` where
    ``visible`` is the size of the real-image region at the canvas's top-left.
    """
    shape = tf.shape(image)
    canvas = tf.constant([int(image_size[0]), int(image_size[1])], tf.int32)
    visible = tf.minimum(shape[:2] - offset, canvas)
    image = tf.slice(image, tf.concat([offset, [0]], 0), tf.concat([visible, [-1]], 0))
    image = tf.pad(image, [[0, canvas[0] - visible[0]], [0, canvas[1] - visible[1]], [0, 0]])
    image.set_shape([int(image_size[0]), int(image_size[1]), None])
    shift = tf.tile(tf.cast(offset, boxes.dtype), [2])
    return image, boxes - shift, visible


def clip_boxes_to_region(boxes, region_hw, min_visible_fraction: float = MIN_VISIBLE_FRACTION):
    """Clip yxyx boxes to ``[0, h] x [0, w]``; ``keep`` is False for boxes with no area
    left or less than ``min_visible_fraction`` of their area visible."""
    hw = tf.cast(region_hw, boxes.dtype)
    limit = tf.tile(hw, [2])
    clipped = tf.clip_by_value(boxes, tf.zeros_like(limit), limit)

    def area(b):
        return tf.maximum(b[:, 2] - b[:, 0], 0.0) * tf.maximum(b[:, 3] - b[:, 1], 0.0)

    before, after = area(boxes), area(clipped)
    keep = tf.logical_and(after > 0.0, after >= min_visible_fraction * before)
    return clipped, keep


def compaction_order(is_crowd, keep, max_boxes: int):
    """Indices of the rows :func:`compact_and_pad` keeps, in output order: kept rows,
    non-crowd before crowd (otherwise stable), at most ``max_boxes``."""
    priority = tf.where(keep, tf.cast(is_crowd, tf.int32), 2)
    count = tf.minimum(tf.reduce_sum(tf.cast(keep, tf.int32)), max_boxes)
    return tf.argsort(priority, stable=True)[:count]


def compact_and_pad(boxes, classes, is_crowd, keep, max_boxes: int):
    """Move kept boxes to the front (non-crowd before crowd, otherwise stable), truncate
    to ``max_boxes`` and pad: boxes with 0, classes with -1, is_crowd with False."""
    order = compaction_order(is_crowd, keep, max_boxes)
    pad = max_boxes - tf.shape(order)[0]
    boxes = tf.pad(tf.gather(boxes, order), [[0, pad], [0, 0]])
    classes = tf.pad(tf.gather(classes, order), [[0, pad]], constant_values=-1)
    is_crowd = tf.pad(tf.gather(is_crowd, order), [[0, pad]], constant_values=False)
    boxes.set_shape([max_boxes, 4])
    classes.set_shape([max_boxes])
    is_crowd.set_shape([max_boxes])
    return boxes, classes, is_crowd


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
        (:func:`kerasdet.data.ssd_augment.ssd_augment`; its flip is this function's
        ``flip``). Needs ``seed``.
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
        from kerasdet.data.ssd_augment import ssd_augment

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
