"""COCO segmentations -> uint8 masks, on the host: checking, decoding, rasterizing.

What ``make_dataset(masks=...)`` (:mod:`kerasdet.data.pipeline`) feeds the graph:

* :func:`check_segmentations` checks and cleans every ``segmentation`` of a source once,
  when the dataset is made: a malformed entry raises ``ValueError`` naming the annotation
  file, the annotation id and the image id; polygon parts with fewer than 3 points or an
  odd number of coordinates are dropped and counted, as Detectron2 does.
* :func:`decode_segmentation` decodes one entry (polygons, uncompressed or compressed
  RLE) with ``pycocotools`` at the *original* image size; :func:`filled_box` is the mask of
  an object without a usable segmentation (box-only annotations, VOC, all polygon parts
  degenerate): its filled box. That fallback is **our extension**: Attention CoupleNet
  (Zhu et al., "Attention CoupleNet: Fully Convolutional Attention Coupling Network for
  Object Detection", §III-B "Cascade Attention FCN") supervises its attention maps with
  instance segmentations only.
* :func:`rasterize_masks` stacks one image's objects as ``"union"`` (1 non-crowd
  foreground, :data:`IGNORE` = 255 where only crowd regions cover a pixel, 0 elsewhere)
  or ``"instances"`` (one 0/1 channel per object).
* :func:`mask_loader` wraps the rasterization of image ``index`` in a
  ``tf.numpy_function`` for the load step of the ``tf.data`` pipeline.

The graph then moves the masks exactly like the image
(:func:`kerasdet.data.preprocess.preprocess_example`).
"""
from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from .coco import DetectionSource

logger = logging.getLogger(__name__)

__all__ = ["MASK_MODES", "IGNORE", "check_segmentations", "filled_box",
           "decode_segmentation", "rasterize_masks", "mask_loader"]

#: Values of ``make_dataset(masks=...)``.
MASK_MODES = (None, "union", "instances")
#: ``labels["foreground"]`` value of crowd-only pixels: ignore them in a loss.
IGNORE = 255


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _check_segmentation(segm, height, width, where, stats):
    """A cleaned copy of one COCO ``segmentation`` (None: no usable mask -> filled box).

    Raises ValueError (prefixed with ``where``) for an entry pycocotools cannot read.
    """
    if segm is None or (isinstance(segm, (list, tuple)) and len(segm) == 0):
        return None
    if isinstance(segm, (list, tuple)):  # polygons: [[x0, y0, x1, y1, ...], ...]
        parts = []
        for part in segm:
            if not isinstance(part, (list, tuple)) or not all(_is_num(v) for v in part):
                raise ValueError(f"{where}: bad polygon segmentation (each polygon must be "
                                 f"a list of numbers), got {str(part)[:80]}")
            coords = np.asarray(part, np.float64)
            if not np.isfinite(coords).all():
                raise ValueError(f"{where}: polygon segmentation has non-finite coordinates")
            if len(coords) < 6 or len(coords) % 2:
                stats["dropped_polygons"] += 1
                continue
            parts.append([float(v) for v in coords])
        return parts or None
    if isinstance(segm, dict):  # RLE
        if "counts" not in segm or "size" not in segm:
            raise ValueError(f"{where}: RLE segmentation needs 'counts' and 'size', got "
                             f"keys {sorted(segm)}")
        size = segm["size"]
        if (not isinstance(size, (list, tuple)) or len(size) != 2
                or [v for v in size] != [height, width]):
            raise ValueError(f"{where}: RLE segmentation size {size!r} differs from the "
                             f"image size [height, width]=[{height}, {width}]")
        counts = segm["counts"]
        if isinstance(counts, (list, tuple)):
            if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0
                       for v in counts):
                raise ValueError(f"{where}: uncompressed RLE counts must be non-negative "
                                 "integers")
            if sum(counts) != height * width:
                raise ValueError(f"{where}: uncompressed RLE counts sum to {sum(counts)}, "
                                 f"not height * width = {height * width}")
            return {"size": [height, width], "counts": [int(v) for v in counts]}
        if isinstance(counts, (str, bytes)):
            return {"size": [height, width], "counts": counts}
        raise ValueError(f"{where}: RLE counts must be a list or a string, got "
                         f"{type(counts).__name__}")
    raise ValueError(f"{where}: segmentation must be a polygon list or an RLE dict, got "
                     f"{type(segm).__name__}")


def check_segmentations(source: DetectionSource):
    """Check and clean every ``segmentation`` of ``source`` (once, on the host).

    Returns ``(entries, stats)``: ``entries[i][j]`` is the cleaned segmentation of object
    ``j`` of image ``i`` or None (no usable mask: its filled box is used); ``stats``
    counts ``fallback_images``, ``fallback_annotations`` and ``dropped_polygons``
    (polygon parts with < 3 points or an odd number of coordinates).

    Raises:
      ValueError: naming the annotation file, annotation id and image id of an entry
        that is not a polygon list / RLE, has non-numeric or non-finite coordinates, or
        an RLE whose size is not the image's or whose counts do not add up.
    """
    stats = {"fallback_images": 0, "fallback_annotations": 0, "dropped_polygons": 0}
    entries = []
    for i in range(len(source)):
        n = len(source.boxes[i])
        segms = source.masks[i] if source.masks is not None else None
        segms = [None] * n if segms is None else list(segms)
        if len(segms) != n:
            raise ValueError(f"{source.annotation_file}: image id {source.image_ids[i]} has "
                             f"{len(segms)} segmentation entries for {n} boxes")
        h, w = int(source.heights[i]), int(source.widths[i])
        cleaned = []
        for j, segm in enumerate(segms):
            ann_id = int(source.annotation_ids[i][j]) if source.annotation_ids else -1
            where = (f"{source.annotation_file}: annotation id {ann_id} (image id "
                     f"{source.image_ids[i]})")
            cleaned.append(_check_segmentation(segm, h, w, where, stats))
        missing = sum(c is None for c in cleaned)
        stats["fallback_annotations"] += missing
        stats["fallback_images"] += int(missing > 0)
        entries.append(cleaned)
    return entries, stats


def filled_box(box, height, width):
    """uint8 [h, w]: 1 on the pixels whose centres lie inside the yxyx ``box`` (at least
    one pixel per axis)."""
    out = np.zeros((height, width), np.uint8)
    y0, x0, y1, x1 = (float(v) for v in box)
    r0 = min(max(int(np.ceil(y0 - 0.5)), 0), height - 1)
    c0 = min(max(int(np.ceil(x0 - 0.5)), 0), width - 1)
    r1 = min(max(int(np.ceil(y1 - 0.5)), r0 + 1), height)
    c1 = min(max(int(np.ceil(x1 - 0.5)), c0 + 1), width)
    out[r0:r1, c0:c1] = 1
    return out


def decode_segmentation(segm, height, width):
    """uint8 ``[h, w]`` 0/1 mask of one cleaned COCO segmentation (polygon parts merged,
    uncompressed or compressed RLE), decoded with ``pycocotools``."""
    from pycocotools import mask as mask_utils

    if isinstance(segm, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm["counts"], list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segm, height, width)
    else:  # compressed RLE
        counts = segm["counts"]
        rle = {"size": segm["size"],
               "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return np.asarray(mask_utils.decode(rle), np.uint8)


def rasterize_masks(segms, boxes, is_crowd, height, width, mode, where="",
                    annotation_ids=None):
    """Host rasterization of one image's objects at its original size.

    ``segms``: cleaned entries (:func:`check_segmentations`; None -> filled box).
    Returns uint8 ``[h, w, 1]`` (``mode="union"``: 1 non-crowd foreground, 255 crowd
    only, 0 background) or ``[h, w, n]`` (``"instances"``: 0/1 per object).
    """
    n = len(segms)
    objs = []
    for j in range(n):
        if segms[j] is None:
            objs.append(filled_box(boxes[j], height, width))
            continue
        name = (f"{where}: annotation id {annotation_ids[j]}" if annotation_ids is not None
                else f"{where}: object {j}")
        try:
            m = decode_segmentation(segms[j], height, width)
        except Exception as e:  # noqa: BLE001 - re-raised naming the annotation
            raise ValueError(f"{name}: could not decode its segmentation "
                             f"({type(e).__name__}: {e})") from None
        if m.shape != (height, width):
            raise ValueError(f"{name}: segmentation decodes to {m.shape}, not the image "
                             f"size {(height, width)}")
        objs.append(m)
    if mode == "instances":
        out = np.zeros((height, width, n), np.uint8)
        for j, m in enumerate(objs):
            out[..., j] = m != 0
        return out
    fg = np.zeros((height, width), bool)
    crowd = np.zeros((height, width), bool)
    for j, m in enumerate(objs):
        if is_crowd[j]:
            crowd |= m != 0
        else:
            fg |= m != 0
    out = np.where(fg, np.uint8(1), np.where(crowd, np.uint8(IGNORE), np.uint8(0)))
    return out[..., None]


def mask_loader(source, mode, cache=None):
    """The mask load step of ``make_dataset(masks=mode)`` for ``source``.

    Checks every segmentation now (:func:`check_segmentations`; logs the filled-box
    fallback once as a warning) and returns ``(load, stats)``: ``load(index)`` is a graph
    op giving image ``index``'s :func:`rasterize_masks` output, uint8 ``[h, w, 1]``
    (``"union"``) or ``[h, w, n]`` (``"instances"``); ``cache``: optional dict
    index -> masks kept across calls (default None: rasterize on every call).
    """
    entries, stats = check_segmentations(source)
    if stats["fallback_annotations"] or stats["dropped_polygons"]:
        logger.warning(
            "make_dataset(masks=%r) on %s: %d annotation(s) in %d image(s) have no usable "
            "segmentation (box-only or degenerate; %d degenerate polygon part(s) dropped); "
            "their filled boxes are used as masks (our extension: Attention CoupleNet, "
            "section III-B, supervises its attention maps with instance segmentations "
            "only)", mode, source.annotation_file,
            stats["fallback_annotations"], stats["fallback_images"],
            stats["dropped_polygons"])
    boxes = [np.asarray(b, np.float32).reshape(-1, 4) for b in source.boxes]
    crowd = [np.asarray(c, bool).reshape(-1) for c in source.is_crowd]
    heights = [int(h) for h in source.heights]
    widths = [int(w) for w in source.widths]
    ann_ids = [None if not source.annotation_ids else [int(a) for a in source.annotation_ids[i]]
               for i in range(len(source))]

    def numpy_fn(index):
        i = int(index)
        if cache is not None and i in cache:
            return cache[i]
        out = rasterize_masks(entries[i], boxes[i], crowd[i], heights[i], widths[i], mode,
                              where=f"{source.annotation_file} (image id "
                                    f"{source.image_ids[i]}, {source.image_paths[i]})",
                              annotation_ids=ann_ids[i])
        if cache is not None:
            cache[i] = out
        return out

    def load(index):
        masks = tf.numpy_function(numpy_fn, [index], tf.uint8, stateful=False)
        masks.set_shape([None, None, 1 if mode == "union" else None])
        return masks

    return load, stats
