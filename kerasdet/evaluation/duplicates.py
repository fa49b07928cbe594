"""Duplicate detections in COCO results: a detection is a duplicate when a higher-scored
detection of the same class in the same image overlaps it with IoU > a threshold (what
NMS removes; the Spatial Memory Network's claim is that it learns not to emit them, Chen &
Gupta, "Spatial Memory for Context Reasoning in Object Detection", ICCV 2017, §5.1)."""
from __future__ import annotations

import numpy as np


def count_duplicates(results, *, iou_threshold=0.5, score_thresholds=(0.05, 0.3)):
    """Duplicates in a COCO results list (``image_id, category_id, bbox`` xywh, ``score``).
    Returns ``{"dup@T": duplicates, "dets@T": detections}`` for each score threshold T
    (only detections scoring >= T are counted)."""
    by_key = {}
    for r in results:
        by_key.setdefault((r["image_id"], r["category_id"]), []).append(r)
    out = {}
    for thr in score_thresholds:
        dups = total = 0
        for dets in by_key.values():
            dets = sorted((d for d in dets if d["score"] >= thr), key=lambda d: -d["score"])
            total += len(dets)
            if len(dets) < 2:
                continue
            b = np.array([d["bbox"] for d in dets], dtype=np.float64)
            x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
            iw = np.maximum(0, np.minimum(x2[:, None], x2[None]) - np.maximum(x1[:, None], x1[None]))
            ih = np.maximum(0, np.minimum(y2[:, None], y2[None]) - np.maximum(y1[:, None], y1[None]))
            inter = iw * ih
            area = b[:, 2] * b[:, 3]
            iou = inter / np.maximum(area[:, None] + area[None] - inter, 1e-9)
            higher = np.triu(iou > iou_threshold, 1)  # [i, j]: i scores higher than j
            dups += int(higher.any(axis=0).sum())
        out[f"dup@{thr}"] = dups
        out[f"dets@{thr}"] = total
    return out
