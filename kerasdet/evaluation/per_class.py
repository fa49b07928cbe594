"""Per-category precision-recall at one IoU threshold (boxes or masks), through pycocotools,
and instance-count accuracy: the figures decompNet's paper shows (Fig. 4/5 PR curves per
digit class) and the per-class AP50, mask AP50 and count accuracy reported with them.

:func:`per_class_pr` runs ``COCOeval`` (``iouType`` ``"bbox"`` or ``"segm"``) and reads its
accumulated ``precision`` array at the requested IoU, all areas, the largest ``maxDets``:
per category the 101-point interpolated precision over recall and its mean (COCO-style AP
at that IoU, e.g. AP50). :func:`masks_to_coco_results` turns binary masks into COCO RLE
results for the ``"segm"`` evaluation.
"""
from __future__ import annotations

import copy

import numpy as np

from kerasdet.evaluation.coco_eval import empty_results, load_coco_gt, quiet


def masks_to_coco_results(*, image_ids, masks, scores, classes, num_detections, category_ids):
    """COCO segmentation results from ``masks`` ``[B, K, h, w]`` (0/1, original image size),
    ``scores``/``classes`` ``[B, K]`` (-1 padding), ``num_detections`` ``[B]``."""
    from pycocotools import mask as mask_utils

    masks = np.asarray(masks)
    results = []
    for b, image_id in enumerate(np.asarray(image_ids).reshape(-1)):
        for j in range(int(np.asarray(num_detections)[b])):
            c = int(classes[b][j])
            if c < 0:
                continue
            rle = mask_utils.encode(np.asfortranarray(masks[b, j] > 0.5, dtype=np.uint8))
            rle["counts"] = rle["counts"].decode("ascii")
            results.append({"image_id": int(image_id), "category_id": int(category_ids[c]),
                            "segmentation": rle, "score": float(scores[b][j])})
    return results


def per_class_pr(coco_gt, results, *, iou_type="bbox", iou=0.5, max_dets=100):
    """Per-category PR curves at one IoU threshold.

    Returns ``{category_id: {"ap": float, "recall": [101], "precision": [101]}}`` (the
    precision at pycocotools' recall points 0, 0.01, ..., 1; -1 where unreachable is
    reported as 0) and ``"mean"``: the mean AP over categories with ground truth.
    """
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    coco_gt = load_coco_gt(coco_gt)
    with quiet(False):
        coco_dt = coco_gt.loadRes(copy.deepcopy(results)) if results else None
        if coco_dt is None:
            coco_dt = empty_results(coco_gt)
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        ev.params.iouThrs = np.array([float(iou)])
        ev.params.maxDets = [int(max_dets)]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][0, :, :, 0, 0]  # [R, K] (area "all", maxDets)
    recall_points = np.asarray(ev.params.recThrs)
    out, aps = {}, []
    for j, cat in enumerate(ev.params.catIds):
        p = precision[:, j]
        has_gt = len(coco_gt.getAnnIds(catIds=[cat], iscrowd=False)) > 0
        ap = float(np.mean(np.maximum(p, 0.0))) if has_gt else float("nan")
        if has_gt:
            aps.append(ap)
        out[int(cat)] = {"ap": ap, "recall": recall_points.tolist(), "precision": np.maximum(p, 0.0).tolist()}
    out["mean"] = float(np.mean(aps)) if aps else float("nan")
    return out


def count_accuracy(predicted, target):
    """Instance-count accuracy from ``[N, C]`` predicted and true counts per category.

    Returns ``{"per_class": [C] fraction of images with the exact count of that category,
    "per_image": fraction of images with every category's count exact, "mae": mean
    absolute count error per (image, category)}``.
    """
    predicted = np.asarray(predicted, np.int64)
    target = np.asarray(target, np.int64)
    if predicted.shape != target.shape or predicted.ndim != 2:
        raise ValueError(f"counts must both be [N, C], got {predicted.shape} and {target.shape}")
    exact = predicted == target
    return {"per_class": exact.mean(axis=0).tolist(), "per_image": float(exact.all(axis=1).mean()),
            "mae": float(np.abs(predicted - target).mean())}
