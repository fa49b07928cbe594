import json

import numpy as np
import pytest
from evaluation_testdata import (
    ANNOTATIONS,
    CATEGORY_IDS,
    IMAGES,
    direct_cocoeval,
    perfect_results,
    perturbed_results,
    to_network_batch,
)

from kerasdet.evaluation import (
    STAT_KEYS,
    CocoEvaluator,
    detections_to_coco_results,
    evaluate_results_file,
    format_table,
)

IMAGE_IDS = sorted(IMAGES)
SCALES = {11: 0.5, 22: 2.0, 33: 1.0, 44: 0.25}


# --------------------------------------------------------------------------- conversion

def test_conversion_hand_computed():
    boxes = np.array([[[10.0, 20.0, 50.0, 80.0],    # yxyx network px
                       [0.0, 0.0, 8.0, 4.0],
                       [1.0, 1.0, 2.0, 2.0]]], np.float32)  # beyond num_detections
    out = detections_to_coco_results(
        image_ids=np.array([42]),
        boxes=boxes,
        scores=np.array([[0.9, 0.5, 0.4]], np.float32),
        classes=np.array([[2, 0, 1]], np.int32),
        num_detections=np.array([2]),
        image_scales=np.array([0.5]),
        category_ids=CATEGORY_IDS,
    )
    assert len(out) == 2  # third row truncated by num_detections
    # original = network / 0.5; xywh
    assert out[0] == {"image_id": 42, "category_id": 15,
                      "bbox": [40.0, 20.0, 120.0, 80.0], "score": pytest.approx(0.9)}
    assert out[1]["bbox"] == [0.0, 0.0, 8.0, 16.0]
    assert out[1]["category_id"] == 3
    # plain Python types, JSON-serializable
    assert type(out[0]["image_id"]) is int and type(out[0]["category_id"]) is int
    assert type(out[0]["score"]) is float and all(type(v) is float for v in out[0]["bbox"])
    json.dumps(out)


def test_conversion_batched_padding_and_per_axis_scales():
    boxes = np.zeros((2, 3, 4), np.float32)
    boxes[0, 0] = [10, 10, 30, 50]
    boxes[0, 1] = [5, 5, 6, 6]  # class -1 inside num_detections: padding, dropped
    boxes[1, 0] = [20, 40, 60, 100]
    classes = np.array([[1, -1, 0], [0, 2, 2]], np.int32)
    scores = np.array([[0.8, 0.7, 0.6], [0.5, 0.4, 0.3]], np.float32)
    out = detections_to_coco_results(
        image_ids=[7, 9], boxes=boxes, scores=scores, classes=classes,
        num_detections=[2, 1], image_scales=np.array([[2.0, 2.0], [0.5, 0.25]]),
        category_ids=CATEGORY_IDS)
    assert [(r["image_id"], r["category_id"]) for r in out] == [(7, 7), (9, 3)]
    assert out[0]["bbox"] == [5.0, 5.0, 20.0, 10.0]
    # scale_y 0.5, scale_x 0.25: x = 40/0.25, y = 20/0.5, w = 60/0.25, h = 40/0.5
    assert out[1]["bbox"] == [160.0, 40.0, 240.0, 80.0]


def test_conversion_rejects_bad_input():
    kw = dict(image_ids=[1], boxes=np.zeros((1, 2, 4)), scores=np.zeros((1, 2)),
              classes=np.array([[0, 5]]), num_detections=[2], image_scales=[1.0],
              category_ids=CATEGORY_IDS)
    with pytest.raises(ValueError, match="category_ids"):
        detections_to_coco_results(**kw)
    kw["classes"] = np.array([[0, 1]])
    kw["boxes"] = np.zeros((1, 2, 3))
    with pytest.raises(ValueError, match="boxes"):
        detections_to_coco_results(**kw)
    kw["boxes"] = np.zeros((1, 2, 4))
    kw["image_scales"] = [0.0]
    with pytest.raises(ValueError, match="image_scales"):
        detections_to_coco_results(**kw)


# --------------------------------------------------------------------------- evaluator

def _feed(evaluator, results, image_ids, batch_size=2):
    for start in range(0, len(image_ids), batch_size):
        ids = image_ids[start:start + batch_size]
        scales = [SCALES[i] for i in ids]
        out = to_network_batch(results, ids, scales)
        evaluator.update(np.array(ids), out["boxes"], out["scores"], out["classes"],
                         out["num_detections"], np.array(scales, np.float32))


def test_perfect_detections_give_ap_one(coco_gt_file):
    ev = CocoEvaluator(str(coco_gt_file), category_ids=CATEGORY_IDS)
    _feed(ev, perfect_results(), IMAGE_IDS)
    stats = ev.evaluate()
    assert list(stats) == list(STAT_KEYS)
    for key in STAT_KEYS:
        if key != "AR1":
            assert stats[key] == pytest.approx(1.0), key
    # AR1 keeps one detection per image and category: image 22 has two objects of
    # category 3, so category 3 recalls 2/3 and the mean over 3 categories is 8/9.
    assert stats["AR1"] == pytest.approx(8 / 9)
    # the results went back to original pixels exactly
    got = sorted((r["image_id"], r["category_id"], tuple(r["bbox"])) for r in ev.results)
    want = sorted((i, c, tuple(b)) for i, c, b, crowd in ANNOTATIONS if not crowd)
    assert got == want


def test_perturbed_matches_pycocotools_exactly(coco_gt_file, tmp_path):
    results = perturbed_results(seed=1)
    ev = CocoEvaluator(str(coco_gt_file), category_ids=CATEGORY_IDS)
    _feed(ev, results, IMAGE_IDS, batch_size=3)
    stats = ev.evaluate()
    assert 0.0 < stats["AP"] < 1.0
    # same results file through pycocotools directly
    path = ev.write_results(tmp_path / "out" / "results.json")
    on_disk = json.loads(open(path).read())
    assert len(on_disk) == len(results)
    assert [stats[k] for k in STAT_KEYS] == direct_cocoeval(coco_gt_file, on_disk, IMAGE_IDS)
    # and the independent reference built from the original-pixel results
    assert [stats[k] for k in STAT_KEYS] == direct_cocoeval(coco_gt_file, results, IMAGE_IDS)
    # convenience entry point
    assert evaluate_results_file(coco_gt_file, path) == stats


def test_evaluation_restricted_to_seen_images(coco_gt_file):
    from pycocotools.coco import COCO

    results = perturbed_results(seed=2)
    gt = COCO(str(coco_gt_file))
    ev = CocoEvaluator(gt, category_ids=CATEGORY_IDS)
    _feed(ev, results, [11, 33])
    stats = ev.evaluate()
    subset = [r for r in results if r["image_id"] in (11, 33)]
    assert [stats[k] for k in STAT_KEYS] == direct_cocoeval(coco_gt_file, subset, [11, 33])
    assert [stats[k] for k in STAT_KEYS] != direct_cocoeval(coco_gt_file, subset)
    ev.reset()
    with pytest.raises(ValueError, match="no images"):
        ev.evaluate()


def test_zero_detections_give_zeros(coco_gt_file, tmp_path):
    ev = CocoEvaluator(coco_gt_file, category_ids=CATEGORY_IDS)
    _feed(ev, [], IMAGE_IDS)
    stats = ev.evaluate()
    for key in STAT_KEYS:
        assert stats[key] == 0.0, key
    # an empty results file is scored, not a crash
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert evaluate_results_file(coco_gt_file, empty) == stats


def test_empty_area_range_is_minus_one(coco_gt_file):
    # image 33 has only medium and large objects: no small GT -> pycocotools' -1
    ev = CocoEvaluator(coco_gt_file, category_ids=CATEGORY_IDS)
    _feed(ev, perfect_results(), [33])
    stats = ev.evaluate()
    assert stats["APs"] == -1.0 and stats["ARs"] == -1.0
    assert stats["AP"] == pytest.approx(1.0)
    ev.reset()
    _feed(ev, [], [33])
    stats = ev.evaluate()
    assert stats["APs"] == -1.0 and stats["AP"] == 0.0


def test_errors_name_the_problem(coco_gt_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CocoEvaluator(tmp_path / "missing.json", category_ids=CATEGORY_IDS)
    with pytest.raises(ValueError, match="category_ids"):
        CocoEvaluator(coco_gt_file, category_ids=[3, 8])
    ev = CocoEvaluator(coco_gt_file, category_ids=CATEGORY_IDS)
    _feed(ev, [], [11])
    ev.image_ids.add(999)
    with pytest.raises(ValueError, match="999"):
        ev.evaluate()


def test_quiet_unless_verbose(coco_gt_file, capsys):
    ev = CocoEvaluator(coco_gt_file, category_ids=CATEGORY_IDS)
    _feed(ev, perfect_results(), IMAGE_IDS)
    ev.evaluate()
    assert capsys.readouterr().out == ""
    ev.evaluate(verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_format_table():
    stats = {k: 0.5 for k in STAT_KEYS}
    stats["APs"] = -1.0
    table = format_table(stats)
    lines = table.splitlines()
    assert len(lines) == 2 + len(STAT_KEYS)
    assert "AP50" in table and "0.5000" in table and "n/a" in table
