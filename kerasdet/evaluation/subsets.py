"""COCO AP on a subset of the ground-truth objects (e.g. the context digits' degraded vs
clean members, ``generate_digits(context_pairs=True)``).

The objects outside the subset become ignore regions: their annotations are marked
``iscrowd = 1`` before pycocotools' ``COCOeval`` runs, so a detection on them is neither a
true nor a false positive (COCO's crowd rule: a detection matched to a crowd region is
ignored; its overlap is intersection over the detection's area, which for a detection of
that very object is about 1). Every image keeps its detections, so a false positive on the
background still counts against the subset. This is the protocol of the COCO toolkit's
own area ranges (objects outside the range are ignored), applied to any predicate.
"""
from __future__ import annotations

import copy
from typing import Callable

from kerasdet.evaluation.coco_eval import load_coco_gt, quiet, run_cocoeval


def subset_ground_truth(coco_gt, keep: Callable[[dict], bool]):
    """A pycocotools ``COCO`` copy of ``coco_gt`` (``COCO``, JSON path or source) in which
    every annotation with ``keep(annotation)`` false is ``iscrowd = 1`` (ignored) and the
    kept ones keep their own ``iscrowd``. Returns ``(coco, number of kept non-crowd objects)``."""
    from pycocotools.coco import COCO

    base = load_coco_gt(coco_gt)
    dataset = copy.deepcopy(base.dataset)
    kept = 0
    for ann in dataset["annotations"]:
        if keep(ann):
            kept += int(not ann.get("iscrowd", 0))
        else:
            ann["iscrowd"] = 1
    coco = COCO()
    coco.dataset = dataset
    with quiet(False):
        coco.createIndex()
    return coco, kept


def subset_ap(coco_gt, results: list[dict], keep: Callable[[dict], bool], *, iou_type: str = "bbox") -> dict:
    """pycocotools AP / AP50 / AP75 of ``results`` on the objects ``keep`` selects (the rest
    ignored, see the module docstring), plus ``"objects"``: how many objects were scored.
    An empty subset gives ``-1`` stats (pycocotools' "no ground truth")."""
    coco, kept = subset_ground_truth(coco_gt, keep)
    stats = run_cocoeval(coco, results, iou_type=iou_type)
    return {"AP": stats["AP"], "AP50": stats["AP50"], "AP75": stats["AP75"], "objects": kept}
