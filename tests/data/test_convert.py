"""kerasdet.data.convert: voc2coco JSON, and the same pycocotools AP from the file as from
the in-memory ground truth COCO evaluation builds for a VOC source."""
import contextlib
import copy
import io
import json
import os

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from kerasdet.data.coco import load_coco
from kerasdet.data.convert import coco_ground_truth, source_to_coco_dict, voc_to_coco
from kerasdet.data.voc import VOC_CLASSES, load_voc_sets
from kerasdet.errors import DataFileNotFoundError

from .test_voc import make_devkit

SETS = ("2007/trainval", "2012/trainval")


def _direct_cocoeval(gt_path, results):
    """pycocotools as its README uses it (reference path, no kerasdet code)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_voc2coco_json_loads_in_pycocotools(tmp_path):
    root = make_devkit(tmp_path, missing_image=False)
    out = voc_to_coco(root, str(tmp_path / "out" / "voc0712.json"), sets=SETS)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(out)
    assert sorted(coco.getImgIds()) == [0, 1, 2, 3, 4]
    img = coco.loadImgs([3])[0]
    assert img == {"id": 3, "file_name": "VOC2012/JPEGImages/2012_000001.jpg", "height": 24, "width": 32}
    cats = coco.loadCats(coco.getCatIds())
    assert [c["id"] for c in cats] == list(range(1, 21)) and [c["name"] for c in cats] == list(VOC_CLASSES)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[0]))
    # 000001: dog (1, 1, 10, 20) 1-based inclusive -> COCO [x, y, w, h] = [0, 0, 10, 20];
    # the difficult person (5, 6, 7, 8) -> [4, 5, 3, 3] with iscrowd=1.
    assert [(a["category_id"], a["bbox"], a["area"], a["iscrowd"]) for a in anns] == [
        (VOC_CLASSES.index("dog") + 1, [0.0, 0.0, 10.0, 20.0], 200.0, 0),
        (VOC_CLASSES.index("person") + 1, [4.0, 5.0, 3.0, 3.0], 9.0, 1),
    ]
    assert sorted(coco.getAnnIds()) == [1, 2, 3, 4, 5, 6]  # unknown 'unicorn's not written
    # load_coco on the JSON, images relative to the VOCdevkit, gives back the VOC source.
    voc = load_voc_sets(root, SETS)
    back = load_coco(out, root)
    assert back.image_paths == [os.path.normpath(p) for p in voc.image_paths]
    assert back.category_ids == voc.category_ids
    for k in range(len(voc)):
        np.testing.assert_array_equal(back.boxes[k], voc.boxes[k])
        np.testing.assert_array_equal(back.classes[k], voc.classes[k])
        np.testing.assert_array_equal(back.is_crowd[k], voc.is_crowd[k])
    # use_difficult writes difficult objects as normal ones; a source can be passed too.
    out2 = voc_to_coco(root, str(tmp_path / "d.json"), sets=["2007/trainval"], use_difficult=True)
    assert [a["iscrowd"] for a in json.load(open(out2))["annotations"]] == [0, 0, 0]
    out3 = voc_to_coco(voc, str(tmp_path / "s.json"))
    assert json.load(open(out3))["images"][0]["file_name"] == voc.image_paths[0].replace(os.sep, "/")


def test_voc2coco_missing_image_and_folder(tmp_path):
    root = make_devkit(tmp_path)  # 2012_000002.jpg listed but missing
    with pytest.raises(DataFileNotFoundError, match=r"2012_000002\.jpg"):
        voc_to_coco(root, str(tmp_path / "x.json"), sets=SETS)
    with pytest.raises(DataFileNotFoundError, match="VOC2009"):
        voc_to_coco(root, str(tmp_path / "x.json"), sets=["2009/test"])
    assert not os.path.exists(tmp_path / "x.json")


def test_annotation_ids_renumbered_when_zero_or_duplicate(tmp_path):
    voc = load_voc_sets(make_devkit(tmp_path, missing_image=False), SETS)
    voc.annotation_ids = [np.zeros_like(a) for a in voc.annotation_ids]
    ids = [a["id"] for a in source_to_coco_dict(voc)["annotations"]]
    assert ids == [1, 2, 3, 4, 5, 6]


def _detections():
    """Hand-made detections on the devkit's images, yxyx original px, contiguous classes:
    per image id -> (boxes, scores, classes)."""
    dog, person, car, cat = (VOC_CLASSES.index(n) for n in ("dog", "person", "car", "cat"))
    return {
        0: ([[0, 0, 20, 10], [0, 0, 18, 10], [5, 4, 8, 7], [20, 20, 30, 40]],
            [0.9, 0.6, 0.8, 0.7], [dog, dog, person, dog]),  # TP, duplicate, on difficult, FP
        1: ([[2, 19, 20, 24]], [0.5], [car]),                   # jittered car
        2: ([[1, 1, 9, 9]], [0.99], [cat]),                     # FP on an empty image
        3: ([[3, 2, 20, 21], [0, 0, 6, 6]], [0.95, 0.97], [cat, dog]),  # cat, difficult dog
        4: ([[1, 0, 11, 10], [0, 0, 5, 5]], [0.85, 0.2], [dog, cat]),
    }


def test_voc2coco_json_gives_the_in_memory_ap(tmp_path):
    from kerasdet.evaluation.coco_eval import STAT_KEYS, CocoEvaluator

    root = make_devkit(tmp_path, missing_image=False)
    source = load_voc_sets(root, SETS)
    path = voc_to_coco(root, str(tmp_path / "gt.json"), sets=SETS)

    evaluator = CocoEvaluator(source)  # ground truth built in memory from the source
    assert isinstance(coco_ground_truth(source), COCO)
    results = []
    for image_id, (boxes, scores, classes) in _detections().items():
        n = len(scores)
        evaluator.update([image_id], np.asarray([boxes], np.float64), [scores], [classes], [n], [1.0])
        for (y0, x0, y1, x1), s, c in zip(boxes, scores, classes):
            results.append({"image_id": image_id, "category_id": c + 1,
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": s})
    stats = evaluator.evaluate()
    want = dict(zip(STAT_KEYS, _direct_cocoeval(path, results)))
    assert 0.0 < want["AP"] < 1.0 and 0.0 < want["AP50"] < 1.0
    assert stats == pytest.approx(want, abs=1e-12)
    # The top-scored dog detection lies on the difficult dog (iscrowd=1): ignored, not a
    # false positive. Without it the stats are the same; moved off it, they drop.
    dog = VOC_CLASSES.index("dog") + 1
    on_difficult = [r["image_id"] == 3 and r["category_id"] == dog for r in results]
    without = [r for r, d in zip(results, on_difficult) if not d]
    assert dict(zip(STAT_KEYS, _direct_cocoeval(path, without))) == pytest.approx(want, abs=1e-12)
    moved = [dict(r, bbox=[20.0, 10.0, 4.0, 4.0]) if d else r for r, d in zip(results, on_difficult)]
    assert _direct_cocoeval(path, moved)[1] < want["AP50"] - 0.05


def test_joined_sets_through_the_pipeline_score_perfectly(tmp_path):
    """The pipeline's own labels of the 07+12 source, fed back as detections (network px,
    per-image scale, image ids across both years), score 1: ids and boxes map back."""
    from kerasdet.data.pipeline import make_dataset
    from kerasdet.evaluation import make_evaluator

    source = load_voc_sets(make_devkit(tmp_path, missing_image=False), SETS)
    evaluators = {m: make_evaluator(m, source) for m in ("voc07", "voc12", "coco")}
    seen = []
    for _, labels in make_dataset(source, batch_size=2, image_size=(64, 64)):
        classes = labels["classes"].numpy()
        for evaluator in evaluators.values():
            evaluator.update(labels["image_id"], labels["boxes"], np.ones(classes.shape, np.float32),
                             classes, (classes >= 0).sum(axis=1), labels["image_scale"])
        seen.extend(labels["image_id"].numpy().tolist())
    assert seen == source.image_ids
    assert evaluators["voc07"].evaluate()["mAP"] == pytest.approx(1.0, abs=1e-6)
    assert evaluators["voc12"].evaluate()["mAP"] == pytest.approx(1.0, abs=1e-6)
    assert evaluators["coco"].evaluate()["AP"] == pytest.approx(1.0, abs=1e-6)
