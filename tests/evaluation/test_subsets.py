"""COCO AP on a subset of the objects (kerasdet.evaluation.subsets) and duplicate counts
(kerasdet.evaluation.duplicates): by hand and against pycocotools on the reduced set."""
import copy
import json

import pytest

from kerasdet.evaluation.coco_eval import run_cocoeval
from kerasdet.evaluation.duplicates import count_duplicates
from kerasdet.evaluation.subsets import subset_ap


def _gt():
    images = [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}]
    anns = [  # image 1: a degraded and a clean digit; image 2: one clean digit
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0,
         "degraded": True},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 20, 20], "area": 400, "iscrowd": 0,
         "degraded": False},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [30, 30, 20, 20], "area": 400, "iscrowd": 0,
         "degraded": False},
    ]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def _write(tmp_path, gt, name="gt.json"):
    path = tmp_path / name
    path.write_text(json.dumps(gt))
    return str(path)


def test_subset_ap_by_hand(tmp_path):
    gt = _write(tmp_path, _gt())
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},   # the degraded digit
        {"image_id": 1, "category_id": 2, "bbox": [50, 50, 20, 20], "score": 0.8},   # the clean one
        {"image_id": 2, "category_id": 1, "bbox": [70, 70, 20, 20], "score": 0.95},  # a false positive
    ]
    degraded = subset_ap(gt, results, lambda a: a["degraded"])
    # class 1: FP (0.95) ranked above the degraded TP (0.9): precision 1/2 at recall 1 -> AP 0.5;
    # class 2 has no degraded object (-1, left out of the mean); the clean digit's detection is ignored
    assert degraded["objects"] == 1
    assert degraded["AP50"] == pytest.approx(0.5)
    clean = subset_ap(gt, results, lambda a: not a["degraded"])
    # class 1: FP 0.95, the detection on the degraded digit is ignored, clean digit of image 2 missed -> 0;
    # class 2: one TP -> 1. Mean 0.5.
    assert clean["objects"] == 2 and clean["AP50"] == pytest.approx(0.5)


def test_subset_ap_equals_pycocotools_on_the_reduced_set(tmp_path):
    """Ignoring an object equals deleting it together with the detections on it."""
    gt = _gt()
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [11, 10, 20, 21], "score": 0.7},
        {"image_id": 1, "category_id": 2, "bbox": [50, 52, 20, 18], "score": 0.6},
        {"image_id": 2, "category_id": 1, "bbox": [31, 29, 18, 20], "score": 0.5},
        {"image_id": 2, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.4},
    ]
    ours = subset_ap(_write(tmp_path, gt), results, lambda a: not a["degraded"])
    reduced = copy.deepcopy(gt)
    reduced["annotations"] = [a for a in reduced["annotations"] if not a["degraded"]]
    peer = run_cocoeval(_write(tmp_path, reduced, "reduced.json"), results[1:])
    for key in ("AP", "AP50", "AP75"):
        assert ours[key] == pytest.approx(peer[key])


def test_count_duplicates_by_hand():
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [1, 0, 10, 10], "score": 0.8},  # IoU 0.82 with the first
        {"image_id": 1, "category_id": 2, "bbox": [1, 0, 10, 10], "score": 0.7},  # other class: not a duplicate
        {"image_id": 1, "category_id": 1, "bbox": [30, 30, 10, 10], "score": 0.2},  # apart
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.1},  # other image
    ]
    out = count_duplicates(results, score_thresholds=(0.05, 0.85))
    assert out == {"dup@0.05": 1, "dets@0.05": 5, "dup@0.85": 0, "dets@0.85": 1}
