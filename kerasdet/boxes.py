"""Box utilities: format conversion, IoU, R-CNN box coding and clipping.

Every function is a batched TensorFlow graph op (usable inside ``tf.function``, tf.data and
the serving graph). Inside kerasdet boxes are ``[ymin, xmin, ymax, xmax]`` (``"yxyx"``) in
absolute pixels of the network input; the public API takes Keras' ``bounding_box_format``
names and converts at the edges with :func:`convert_format`.
"""
import math

import tensorflow as tf
from keras.utils import bounding_boxes as keras_bounding_boxes

#: Keras' bounding box format names, accepted wherever a ``bounding_box_format`` is taken.
BOX_FORMATS = (
    "xyxy",
    "yxyx",
    "xywh",
    "center_xywh",
    "center_yxhw",
    "rel_xyxy",
    "rel_yxyx",
    "rel_xywh",
    "rel_center_xywh",
)

#: Largest log-scale delta accepted when decoding (Detectron's ``log(1000 / 16)``): keeps
#: ``exp`` finite for wild regressions early in training.
BBOX_XFORM_CLIP = math.log(1000.0 / 16.0)


def convert_format(boxes, *, source, target, height=None, width=None):
    """Converts boxes between Keras' bounding box formats.

    A thin wrapper over ``keras.utils.bounding_boxes.convert_format`` (the peer all Keras
    users already know), validating the format names with a clear error. ``height`` and
    ``width`` are needed for the ``rel_*`` formats.
    """
    for name, fmt in (("source", source), ("target", target)):
        if fmt not in BOX_FORMATS:
            raise ValueError(f"Unknown bounding box {name} format {fmt!r}; expected one of {BOX_FORMATS}.")
    if source == target:
        return tf.convert_to_tensor(boxes, tf.float32)
    return keras_bounding_boxes.convert_format(
        tf.convert_to_tensor(boxes, tf.float32), source=source, target=target, height=height, width=width
    )


def area(boxes):
    """Area of ``[..., 4]`` yxyx boxes (0 for degenerate boxes)."""
    ymin, xmin, ymax, xmax = tf.unstack(boxes, 4, axis=-1)
    return tf.maximum(ymax - ymin, 0.0) * tf.maximum(xmax - xmin, 0.0)


def intersection(boxes1, boxes2):
    """Pairwise intersection areas: ``[..., N, 4]`` x ``[..., M, 4]`` -> ``[..., N, M]``."""
    y1a, x1a, y2a, x2a = [t[..., :, None] for t in tf.unstack(boxes1, 4, axis=-1)]
    y1b, x1b, y2b, x2b = [t[..., None, :] for t in tf.unstack(boxes2, 4, axis=-1)]
    h = tf.maximum(tf.minimum(y2a, y2b) - tf.maximum(y1a, y1b), 0.0)
    w = tf.maximum(tf.minimum(x2a, x2b) - tf.maximum(x1a, x1b), 0.0)
    return h * w


def iou(boxes1, boxes2):
    """Pairwise IoU of yxyx boxes: ``[..., N, 4]`` x ``[..., M, 4]`` -> ``[..., N, M]``.

    Leading (batch) dimensions broadcast. Pairs whose union is empty get IoU 0, never NaN.
    """
    boxes1 = tf.convert_to_tensor(boxes1, tf.float32)
    boxes2 = tf.convert_to_tensor(boxes2, tf.float32)
    inter = intersection(boxes1, boxes2)
    union = area(boxes1)[..., :, None] + area(boxes2)[..., None, :] - inter
    return tf.math.divide_no_nan(inter, union)


def ioa(boxes1, boxes2):
    """Pairwise intersection over the area of ``boxes1`` (``[..., N, M]``).

    This is how COCO scores a detection against an ``iscrowd`` region, and how anchors that
    fall inside crowd regions are found.
    """
    inter = intersection(boxes1, boxes2)
    return tf.math.divide_no_nan(inter, area(boxes1)[..., :, None])


def _centers_sizes(boxes):
    ymin, xmin, ymax, xmax = tf.unstack(boxes, 4, axis=-1)
    h = ymax - ymin
    w = xmax - xmin
    return ymin + 0.5 * h, xmin + 0.5 * w, h, w


def encode(boxes, anchors, *, weights=(1.0, 1.0, 1.0, 1.0)):
    """R-CNN box encoding of yxyx ``boxes`` against ``anchors`` (broadcasting shapes).

    Returns ``[..., 4]`` deltas ordered ``(ty, tx, th, tw)``::

        ty = wy * (y - ya) / ha    tx = wx * (x - xa) / wa
        th = wh * log(h / ha)      tw = ww * log(w / wa)

    ``weights = (wy, wx, wh, ww)``: (1, 1, 1, 1) for RetinaNet (Detectron), (10, 10, 5, 5)
    for Fast R-CNN heads. Degenerate target sizes are floored at 1e-6 px so the log stays
    finite.
    """
    wy, wx, wh, ww = weights
    yc, xc, h, w = _centers_sizes(tf.convert_to_tensor(boxes, tf.float32))
    yca, xca, ha, wa = _centers_sizes(tf.convert_to_tensor(anchors, tf.float32))
    eps = 1e-6
    ha = tf.maximum(ha, eps)
    wa = tf.maximum(wa, eps)
    ty = wy * (yc - yca) / ha
    tx = wx * (xc - xca) / wa
    th = wh * tf.math.log(tf.maximum(h, eps) / ha)
    tw = ww * tf.math.log(tf.maximum(w, eps) / wa)
    return tf.stack([ty, tx, th, tw], axis=-1)


def decode(deltas, anchors, *, weights=(1.0, 1.0, 1.0, 1.0), scale_clip=BBOX_XFORM_CLIP):
    """Inverse of :func:`encode`: ``(ty, tx, th, tw)`` deltas + anchors -> yxyx boxes.

    ``th``/``tw`` are clipped at ``scale_clip`` (``log(1000/16)``) before ``exp``.
    """
    wy, wx, wh, ww = weights
    deltas = tf.convert_to_tensor(deltas)
    dtype = deltas.dtype
    deltas = tf.cast(deltas, tf.float32)
    yca, xca, ha, wa = _centers_sizes(tf.convert_to_tensor(anchors, tf.float32))
    ty, tx, th, tw = tf.unstack(deltas, 4, axis=-1)
    th = tf.minimum(th / wh, scale_clip)
    tw = tf.minimum(tw / ww, scale_clip)
    yc = ty / wy * ha + yca
    xc = tx / wx * wa + xca
    h = tf.exp(th) * ha
    w = tf.exp(tw) * wa
    out = tf.stack([yc - 0.5 * h, xc - 0.5 * w, yc + 0.5 * h, xc + 0.5 * w], axis=-1)
    return tf.cast(out, dtype)


def clip(boxes, height, width):
    """Clips yxyx boxes to ``[0, height] x [0, width]`` (scalars or broadcastable tensors)."""
    boxes = tf.convert_to_tensor(boxes)
    height = tf.cast(height, boxes.dtype)
    width = tf.cast(width, boxes.dtype)
    ymin, xmin, ymax, xmax = tf.unstack(boxes, 4, axis=-1)
    zero = tf.zeros_like(ymin)
    ymin = tf.clip_by_value(ymin, zero, zero + height)
    ymax = tf.clip_by_value(ymax, zero, zero + height)
    xmin = tf.clip_by_value(xmin, zero, zero + width)
    xmax = tf.clip_by_value(xmax, zero, zero + width)
    return tf.stack([ymin, xmin, ymax, xmax], axis=-1)


def boxes_from_masks(masks):
    """Tight ``[ymin, xmin, ymax, xmax]`` pixel-edge boxes ``[..., 4]`` of binary masks
    ``[..., H, W]`` (rows ``r0..r1`` give ``[r0, r1 + 1]``); zeros for an empty mask. Graph
    ops over the whole batch (the boxes of SharpMask / FPN mask proposals, decompNet's
    boxes from its maps)."""
    masks = tf.cast(masks, tf.bool)
    rows = tf.reduce_any(masks, axis=-1)
    cols = tf.reduce_any(masks, axis=-2)

    def span(any_along):
        length = tf.shape(any_along)[-1]
        first = tf.argmax(tf.cast(any_along, tf.int32), axis=-1, output_type=tf.int32)
        last = length - tf.argmax(tf.cast(tf.reverse(any_along, axis=[-1]), tf.int32), axis=-1, output_type=tf.int32)
        return tf.cast(first, tf.float32), tf.cast(last, tf.float32)

    y0, y1 = span(rows)
    x0, x1 = span(cols)
    boxes = tf.stack([y0, x0, y1, x1], axis=-1)
    return tf.where(tf.reduce_any(rows, axis=-1)[..., None], boxes, 0.0)
