"""Geometry primitives of the detection input pipeline: resize, flip, crop offsets,
crop/pad, clipping, compaction/padding of the label rows.

Pure TensorFlow graph ops, vectorized over the boxes of an image (no Python loops over
boxes), usable inside ``tf.data`` map functions; :mod:`kerasdet.data.preprocess` chains
them into the per-example preprocessing. Boxes are ``[ymin, xmin, ymax, xmax]`` float32
in absolute pixels with the pixel-edge convention (a box covering pixel columns 0..9 has
``xmin = 0``, ``xmax = 10``). Randomness is stateless: every random op takes an explicit
``seed`` (shape ``[2]`` integer tensor), so results are reproducible.

* :func:`resize_scale` / :func:`resized_shape`: the resize rule (letterbox fit into the
  canvas, or Detectron's short side -> ``min_size`` with the long side capped at
  ``max_size``) and the resized size ``round(h * scale), round(w * scale)``;
  :func:`numpy_resized_shapes` is the same rule in numpy for whole sources (checking the
  canvas when a dataset is made) and :mod:`kerasdet.export` reuses the graph ops, so
  training and serving resize alike.
* :func:`resize_image_and_boxes`: bilinear image resize; boxes scaled by the *per-axis*
  ratios ``new_h / h``, ``new_w / w`` so they follow the pixels exactly.
* :func:`resize_masks`: **nearest neighbour** (TF2's ``half_pixel_centers`` sampling, the
  same pixel-centre mapping as the image's bilinear resize), so label values (0/1, or
  255 = "ignore") survive unchanged and a union of masks commutes with the resize
  (nearest neighbour only selects source pixels).
* :func:`flip_boxes_horizontal` / :func:`random_horizontal_flip`: ``xmin' = w - xmax``
  with ``w`` the image's own width (before padding).
* :func:`random_crop_offset` / :func:`crop_and_pad`: a canvas-sized crop of a larger
  image, zero padding bottom/right of a smaller one.
* :func:`clip_boxes_to_region` / :func:`compaction_order` / :func:`compact_and_pad`:
  boxes clipped to the visible region, dropped when less than ``min_visible_fraction``
  of their area remains, kept rows compacted to the front (non-crowd first) and padded
  to ``max_boxes`` with class ``-1``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
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


def numpy_resized_shapes(heights, widths, image_size, min_size=None, max_size=None):
    """Resized ``(h, w)`` int64 arrays per image: :func:`resize_scale` and
    :func:`resized_shape` (without jitter) in numpy, vectorized over a whole source (used
    to check the canvas when a dataset is made, without building graph ops per image)."""
    h = np.asarray(heights, np.float32)
    w = np.asarray(widths, np.float32)
    if min_size is None and max_size is None:
        scale = np.minimum(np.float32(image_size[0]) / h, np.float32(image_size[1]) / w)
    elif min_size is None:
        scale = np.float32(max_size) / np.maximum(h, w)
    else:
        scale = np.float32(min_size) / np.minimum(h, w)
        if max_size is not None:
            scale = np.minimum(scale, np.float32(max_size) / np.maximum(h, w))
    return (np.maximum(np.round(h * scale), 1).astype(np.int64),
            np.maximum(np.round(w * scale), 1).astype(np.int64))


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
