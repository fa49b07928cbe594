"""kerasdet.evaluation.per_class: per-category AP at IoU 0.5 for boxes and masks through
pycocotools, against hand-made cases; count accuracy by hand."""
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from kerasdet.evaluation.per_class import count_accuracy, masks_to_coco_results, per_class_pr


def _gt(tmp_path):
    masks = [np.zeros((20, 20), np.uint8) for _ in range(3)]
    masks[0][2:8, 2:8] = 1
    masks[1][10:18, 10:18] = 1
    masks[2][2:6, 12:18] = 1
    anns = []
    for i, (m, cat) in enumerate(zip(masks, [1, 1, 2])):
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode("ascii")
        anns.append({"id": i + 1, "image_id": 1, "category_id": cat, "segmentation": rle, "iscrowd": 0,
                     "area": float(m.sum()), "bbox": mask_utils.toBbox(rle).tolist()})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": [{"id": 1, "height": 20, "width": 20}], "annotations": anns,
                                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return str(path), masks


def test_per_class_box_and_mask_ap(tmp_path):
    path, masks = _gt(tmp_path)
    # class 1: both found (one at 0.9, one at 0.8) plus a false positive at 0.95 -> AP 1 - ranks
    # class 2: missed entirely -> AP 0
    dets = np.stack([masks[0], masks[1], np.zeros((20, 20), np.uint8)])
    dets[2, 0:2, 0:2] = 1
    results = masks_to_coco_results(image_ids=[1], masks=dets[None], scores=[[0.9, 0.8, 0.95]],
                                    classes=[[0, 0, 0]], num_detections=[3], category_ids=[1, 2])
    segm = per_class_pr(path, results, iou_type="segm")
    # precision after the FP: 0/1, 1/2, 2/3 -> interpolated precision is 2/3 at every recall
    assert segm[1]["ap"] == pytest.approx(2 / 3, abs=1e-6)
    assert segm[2]["ap"] == 0.0 and segm["mean"] == pytest.approx(1 / 3, abs=1e-6)
    boxes = [dict(r, bbox=mask_utils.toBbox(r["segmentation"]).tolist()) for r in results]
    for r in boxes:
        r.pop("segmentation")
    box = per_class_pr(path, boxes[:2], iou_type="bbox")
    assert box[1]["ap"] == pytest.approx(1.0) and len(box[1]["precision"]) == 101


def test_count_accuracy_by_hand():
    out = count_accuracy([[1, 2], [3, 0], [0, 0]], [[1, 2], [2, 0], [0, 1]])
    assert out["per_class"] == pytest.approx([2 / 3, 2 / 3])
    assert out["per_image"] == pytest.approx(1 / 3) and out["mae"] == pytest.approx(2 / 6)
    with pytest.raises(ValueError):
        count_accuracy([1, 2], [1, 2])
