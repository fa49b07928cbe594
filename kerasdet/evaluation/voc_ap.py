"""Pascal VOC average precision (per class, one IoU threshold), in numpy.

Follows the VOC development kit (``VOCevaldet.m`` / ``VOCap.m``):

* Detections of a class are ranked by score over the whole set; each is matched greedily
  to the ground-truth box of the same image and class with the highest IoU. If that IoU
  is ``>= iou_threshold`` (the devkit's ``ovmax >= minoverlap``; py-faster-rcnn's port
  uses ``>``) the detection is a true positive unless the box was already taken
  (duplicate -> false positive) or is marked ``difficult`` (the detection is ignored:
  neither TP nor FP). Otherwise it is a false positive.
* ``difficult`` boxes do not count as positives (they are excluded from recall).
* AP is either the VOC2007 11-point interpolated AP (``use_07_metric=True``) or the
  VOC2010+ area under the monotone precision envelope (``use_07_metric=False``).

Choices to know:

* Boxes default to the package's ``[ymin, xmin, ymax, xmax]``; ``bounding_box_format=
  "xyxy"`` takes VOC-file order. IoU uses continuous coordinates by default;
  ``pixel_inclusive=True`` adds the devkit's ``+1`` to widths and heights (integer,
  inclusive pixel boxes as in the VOC XML files) to reproduce devkit numbers exactly.
* The 11 recall thresholds are ``k / 10`` (exactly ``0.3`` etc.), as in the devkit's
  ``0:0.1:1``; ``np.arange(0, 1.1, 0.1)`` of the Python ports has ``0.30000000000000004``,
  which differs when a recall is exactly ``0.3``, ``0.6`` or ``0.7``.
* A class without any non-difficult ground truth has no defined AP: it is left out of
  ``per_class_ap`` and of the mean (reported once with ``logging.warning`` when the
  class was requested explicitly through ``class_ids``).
"""
from __future__ import annotations

import logging
from typing import Iterable, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)


def voc_ap(recall, precision, use_07_metric: bool = False) -> float:
    """AP from a ranked precision/recall curve.

    Args:
      recall: ``[N]`` cumulative recall after each ranked detection (non-decreasing).
      precision: ``[N]`` cumulative precision after each ranked detection.
      use_07_metric: ``True`` for VOC2007's 11-point interpolated AP (mean over recall
        thresholds ``0, 0.1, ..., 1`` of the best precision at recall ``>=`` threshold);
        ``False`` for VOC2010+'s area under the precision envelope.

    Returns:
      AP as a Python float in ``[0, 1]`` (``0.0`` for an empty curve).
    """
    recall = np.asarray(recall, dtype=np.float64).reshape(-1)
    precision = np.asarray(precision, dtype=np.float64).reshape(-1)
    if recall.shape != precision.shape:
        raise ValueError(
            f"voc_ap: recall and precision must have the same length, got "
            f"{recall.shape[0]} and {precision.shape[0]}")
    if not (np.all(np.isfinite(recall)) and np.all(np.isfinite(precision))):
        raise ValueError("voc_ap: recall/precision contain NaN or inf")
    if use_07_metric:
        thresholds = np.arange(11, dtype=np.float64) / 10.0  # 0, 0.1, ..., 1 exactly
        mask = recall[None, :] >= thresholds[:, None]  # [11, N]
        best = np.where(mask, precision[None, :], 0.0).max(axis=1, initial=0.0)
        return float(best.sum() / 11.0)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _to_xyxy(boxes, fmt: str, where: str) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.size == 0:
        return np.zeros((0, 4))
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: 'boxes' must be [N, 4], got shape {boxes.shape}")
    if fmt == "yxyx":
        return boxes[:, [1, 0, 3, 2]]
    if fmt == "xyxy":
        return boxes
    raise ValueError(f"bounding_box_format must be 'yxyx' or 'xyxy', got {fmt!r}")


def _iou(box, gts, offset: float) -> np.ndarray:
    """IoU of one xyxy box against ``[N, 4]`` xyxy boxes (``offset`` 1 = devkit pixels)."""
    iw = np.minimum(box[2], gts[:, 2]) - np.maximum(box[0], gts[:, 0]) + offset
    ih = np.minimum(box[3], gts[:, 3]) - np.maximum(box[1], gts[:, 1]) + offset
    inter = np.clip(iw, 0.0, None) * np.clip(ih, 0.0, None)
    area_d = (box[2] - box[0] + offset) * (box[3] - box[1] + offset)
    area_g = (gts[:, 2] - gts[:, 0] + offset) * (gts[:, 3] - gts[:, 1] + offset)
    union = area_d + area_g - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _items(collection, name):
    if isinstance(collection, Mapping):
        return list(collection.items())
    if isinstance(collection, Sequence):
        return list(enumerate(collection))
    raise ValueError(f"voc_eval: '{name}' must be a mapping image_id -> dict (or a list)")


def _field(entry, key, where, default=None):
    if key in entry:
        return np.asarray(entry[key])
    if default is not None:
        return default
    raise ValueError(f"{where}: missing field '{key}'")


def voc_eval(
    detections,
    ground_truths,
    *,
    iou_threshold: float = 0.5,
    use_07_metric: bool = False,
    class_ids: Iterable[int] | None = None,
    bounding_box_format: str = "yxyx",
    pixel_inclusive: bool = False,
) -> dict:
    """Pascal VOC per-class AP and mAP.

    Args:
      detections: mapping ``image_id -> {"boxes": [M, 4], "scores": [M], "classes": [M]}``
        (a list is read as ``image_id = index``). An image id absent from
        ``ground_truths`` is an image without objects: its detections are false positives.
      ground_truths: mapping ``image_id -> {"boxes": [N, 4], "classes": [N],
        "difficult": [N] bool (optional, default all False)}``.
      iou_threshold: minimum IoU (inclusive) for a true positive; VOC uses 0.5.
      use_07_metric: VOC2007 11-point AP instead of the VOC2010+ area under the curve.
      class_ids: the classes to score; default every class present in ``ground_truths``.
      bounding_box_format: ``"yxyx"`` (package default) or ``"xyxy"``.
      pixel_inclusive: add 1 to box widths/heights as the VOC devkit does.

    Returns:
      ``{"per_class_ap": {class: float}, "mAP": float, "num_positives": {class: int}}``;
      ``mAP`` is the mean over the classes in ``per_class_ap``.

    Raises:
      ValueError: on malformed inputs, or when no requested class has any non-difficult
        ground truth (the mean would be undefined).
    """
    offset = 1.0 if pixel_inclusive else 0.0
    gts = {}
    for image_id, entry in _items(ground_truths, "ground_truths"):
        where = f"ground_truths[{image_id!r}]"
        boxes = _to_xyxy(_field(entry, "boxes", where), bounding_box_format, where)
        classes = _field(entry, "classes", where).astype(np.int64).reshape(-1)
        difficult = _field(entry, "difficult", where, np.zeros(len(classes), bool))
        difficult = difficult.astype(bool).reshape(-1)
        if not (len(boxes) == len(classes) == len(difficult)):
            raise ValueError(
                f"{where}: 'boxes', 'classes', 'difficult' lengths differ "
                f"({len(boxes)}, {len(classes)}, {len(difficult)})")
        gts[image_id] = (boxes, classes, difficult)

    det_image, det_boxes, det_scores, det_classes = [], [], [], []
    for image_id, entry in _items(detections, "detections"):
        where = f"detections[{image_id!r}]"
        boxes = _to_xyxy(_field(entry, "boxes", where), bounding_box_format, where)
        scores = _field(entry, "scores", where).astype(np.float64).reshape(-1)
        classes = _field(entry, "classes", where).astype(np.int64).reshape(-1)
        if not (len(boxes) == len(scores) == len(classes)):
            raise ValueError(
                f"{where}: 'boxes', 'scores', 'classes' lengths differ "
                f"({len(boxes)}, {len(scores)}, {len(classes)})")
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"{where}: 'scores' contain NaN or inf")
        det_image.extend([image_id] * len(scores))
        det_boxes.append(boxes)
        det_scores.append(scores)
        det_classes.append(classes)
    det_boxes = np.concatenate(det_boxes) if det_boxes else np.zeros((0, 4))
    det_scores = np.concatenate(det_scores) if det_scores else np.zeros((0,))
    det_classes = np.concatenate(det_classes) if det_classes else np.zeros((0,), np.int64)

    if class_ids is None:
        class_ids = sorted({int(c) for _, cls, _ in gts.values() for c in cls})
        explicit = False
    else:
        class_ids = [int(c) for c in class_ids]
        explicit = True

    per_class_ap, num_positives, skipped = {}, {}, []
    for c in class_ids:
        npos = int(sum(np.sum((cls == c) & ~diff) for _, cls, diff in gts.values()))
        if npos == 0:
            skipped.append(c)
            continue
        ap = _class_ap(
            c, gts, det_image, det_boxes, det_scores, det_classes,
            iou_threshold=iou_threshold, npos=npos, offset=offset,
            use_07_metric=use_07_metric)
        per_class_ap[c] = ap
        num_positives[c] = npos
    if skipped and explicit:
        logger.warning(
            "voc_eval: %d class(es) %s have no non-difficult ground truth; left out of mAP",
            len(skipped), skipped)
    if not per_class_ap:
        raise ValueError("voc_eval: no class has any non-difficult ground truth box")
    return {
        "per_class_ap": per_class_ap,
        "mAP": float(np.mean(list(per_class_ap.values()))),
        "num_positives": num_positives,
    }


def _class_ap(c, gts, det_image, det_boxes, det_scores, det_classes, *,
              iou_threshold, npos, offset, use_07_metric) -> float:
    """Greedy VOC matching for one class; returns its AP."""
    idx = np.nonzero(det_classes == c)[0]
    order = idx[np.argsort(-det_scores[idx], kind="stable")]
    taken = {}
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    keep = np.ones(len(order), bool)
    for rank, d in enumerate(order):
        image_id = det_image[d]
        if image_id in gts:
            boxes, classes, difficult = gts[image_id]
            sel = np.nonzero(classes == c)[0]
        else:
            sel = np.zeros((0,), np.int64)
        if len(sel) == 0:
            fp[rank] = 1
            continue
        ious = _iou(det_boxes[d], boxes[sel], offset)
        j = int(np.argmax(ious))
        if ious[j] >= iou_threshold:
            if difficult[sel[j]]:
                keep[rank] = False  # matched a difficult box: ignored
            else:
                used = taken.setdefault(image_id, set())
                if sel[j] in used:
                    fp[rank] = 1  # duplicate detection
                else:
                    used.add(sel[j])
                    tp[rank] = 1
        else:
            fp[rank] = 1
    tp = np.cumsum(tp[keep])
    fp = np.cumsum(fp[keep])
    recall = tp / float(npos)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap(recall, precision, use_07_metric=use_07_metric)


__all__ = ["voc_ap", "voc_eval"]
