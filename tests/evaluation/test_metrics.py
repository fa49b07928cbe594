"""kerasdet.evaluation.metrics: metric="coco" | "voc07" | "voc12" on hand-made detections,
against hand-computed VOC APs and pycocotools run directly."""
import contextlib
import copy
import glob
import io
import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from evaluation_testdata import LookupDetector

from kerasdet.data.coco import DetectionSource
from kerasdet.data.convert import write_coco_json
from kerasdet.errors import ConfigError, DataError
from kerasdet.evaluation import (
    STAT_KEYS,
    DetectionEvalCallback,
    VocEvaluator,
    evaluate_model,
    format_stats,
    make_evaluator,
    primary_key,
)

CAT, DOG = 0, 1
SCALES = {0: 0.5, 1: 2.0, 2: 1.0}  # network px per original px


def make_source(difficult=True):
    """Three 100x100 images, classes cat (id 1) and dog (id 2), yxyx original px.
    0: cat A, cat B (difficult), dog C; 1: cat D, dog E; 2: no objects."""
    boxes = [np.array([[0, 0, 50, 50], [60, 60, 90, 90], [0, 50, 40, 100]], np.float32),
             np.array([[10, 10, 60, 60], [50, 0, 100, 40]], np.float32),
             np.zeros((0, 4), np.float32)]
    return DetectionSource(
        image_paths=["a.jpg", "b.jpg", "c.jpg"], image_ids=[0, 1, 2], heights=[100] * 3,
        widths=[100] * 3, boxes=boxes,
        classes=[np.array([CAT, CAT, DOG], np.int32), np.array([CAT, DOG], np.int32),
                 np.zeros((0,), np.int32)],
        is_crowd=[np.array([False, difficult, False]), np.array([False, False]),
                  np.zeros((0,), bool)],
        annotation_ids=[np.array([1, 2, 3]), np.array([4, 5]), np.zeros((0,), np.int64)],
        category_ids=[1, 2], category_names=["cat", "dog"], annotation_file="hand-made")


#: image id -> [(yxyx original px, score, class)], with the VOC outcome of each.
DETECTIONS = {
    0: [([0, 0, 50, 50], 0.9, CAT),      # TP (A)
        ([60, 60, 90, 90], 0.85, CAT),   # on the difficult B: ignored
        ([1, 1, 50, 50], 0.7, CAT),      # duplicate of A (IoU 0.96): FP
        ([0, 50, 20, 100], 0.5, DOG)],   # IoU with C exactly 0.5: TP (>= 0.5)
    1: [([10, 10, 60, 60], 0.6, CAT),    # TP (D)
        ([50, 0, 100, 40], 0.95, DOG)],  # TP (E)
    2: [([0, 0, 20, 20], 0.8, CAT),      # FP (no objects)
        ([0, 0, 30, 30], 0.7, DOG)],     # FP
}

# Hand computation. cat, ranked without the ignored one: TP FP FP TP, 2 positives ->
# recall .5 .5 .5 1, precision 1 1/2 1/3 1/2.
#   all-point: .5 * 1 + .5 * 1/2 = 3/4;  11-point: (6 * 1 + 5 * 1/2) / 11 = 8.5/11.
# dog: TP FP TP -> recall .5 .5 1, precision 1 1/2 2/3.
#   all-point: .5 * 1 + .5 * 2/3 = 5/6;  11-point: (6 * 1 + 5 * 2/3) / 11 = 28/33.
VOC12 = {"cat": 3 / 4, "dog": 5 / 6}
VOC07 = {"cat": 8.5 / 11, "dog": 28 / 33}
# cat with B not difficult: TP TP FP FP TP, 3 positives -> recall 1/3 2/3 2/3 2/3 1,
# precision 1 1 2/3 1/2 3/5; all-point 1/3 + 1/3 + 1/3 * 3/5 = 13/15.
VOC12_CAT_NOT_DIFFICULT = 13 / 15


def coco_results():
    return [{"image_id": i, "category_id": c + 1, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": s}
            for i, dets in DETECTIONS.items() for (y0, x0, y1, x1), s, c in dets]


def _table(max_det=6):
    """Detections by image id (network pixels, padded with class -1) for
    :class:`LookupDetector`."""
    n = max(DETECTIONS) + 1
    boxes = np.zeros((n, max_det, 4), np.float32)
    scores = np.zeros((n, max_det), np.float32)
    classes = np.full((n, max_det), -1, np.int32)
    num = np.zeros((n,), np.int32)
    for i, dets in DETECTIONS.items():
        for k, (box, s, c) in enumerate(dets):
            boxes[i, k] = np.asarray(box, np.float32) * SCALES[i]
            scores[i, k], classes[i, k] = s, c
        num[i] = len(dets)
    classes[0, len(DETECTIONS[0])] = CAT  # past num_detections: must be ignored
    scores[0, len(DETECTIONS[0])] = 0.99
    return {"boxes": boxes, "scores": scores, "classes": classes, "num_detections": num}


def dataset(batch_size=2):
    ids = sorted(DETECTIONS)
    images = np.zeros((len(ids), 4, 4, 3), np.float32)
    images[:, 0, 0, 0] = ids
    labels = {"image_id": np.array(ids, np.int64),
              "image_scale": np.array([SCALES[i] for i in ids], np.float32)}
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)


def direct_cocoeval(gt_path, results):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(STAT_KEYS, ev.stats))


def feed(evaluator):
    for i, dets in DETECTIONS.items():
        evaluator.update([i], np.asarray([[d[0] for d in dets]], np.float64),
                         [[d[1] for d in dets]], [[d[2] for d in dets]], [len(dets)], [1.0])
    return evaluator


@pytest.mark.parametrize("metric, want", [("voc07", VOC07), ("voc12", VOC12)])
def test_voc_map_equals_hand_computed(metric, want):
    stats = feed(make_evaluator(metric, make_source())).evaluate()
    assert stats["AP/cat"] == pytest.approx(want["cat"], abs=1e-12)
    assert stats["AP/dog"] == pytest.approx(want["dog"], abs=1e-12)
    assert stats["mAP"] == pytest.approx((want["cat"] + want["dog"]) / 2, abs=1e-12)
    assert set(stats) == {"mAP", "AP/cat", "AP/dog"}
    assert primary_key(metric) == "mAP"


def test_difficult_is_what_is_ignored():
    stats = feed(VocEvaluator(make_source(difficult=False), use_07_metric=False)).evaluate()
    assert stats["AP/cat"] == pytest.approx(VOC12_CAT_NOT_DIFFICULT, abs=1e-12)
    assert stats["AP/dog"] == pytest.approx(VOC12["dog"], abs=1e-12)


def test_class_without_ground_truth_is_nan_and_left_out():
    source = make_source()
    source.category_ids, source.category_names = [1, 2, 3], ["cat", "dog", "emu"]
    stats = feed(make_evaluator("voc12", source)).evaluate()
    assert math.isnan(stats["AP/emu"])
    assert stats["mAP"] == pytest.approx((VOC12["cat"] + VOC12["dog"]) / 2, abs=1e-12)
    only_empty = make_evaluator("voc12", source)
    only_empty.update([2], np.zeros((1, 1, 4)), [[0.5]], [[0]], [1], [1.0])
    with pytest.raises(DataError, match="no non-difficult ground-truth box"):
        only_empty.evaluate()


def test_evaluate_model_metrics_through_a_model(tmp_path):
    model = LookupDetector(_table())
    source = make_source()
    for metric, want in (("voc07", VOC07), ("voc12", VOC12)):
        stats = evaluate_model(model, dataset(), source, metric=metric)
        assert stats["mAP"] == pytest.approx((want["cat"] + want["dog"]) / 2, abs=1e-7)
    # metric="coco" on a source without a COCO file: in-memory ground truth, the same
    # 12 numbers as pycocotools on the JSON the source converts to.
    gt_path = write_coco_json(source, str(tmp_path / "gt.json"))
    results_file = str(tmp_path / "res.json")
    stats = evaluate_model(model, dataset(batch_size=3), source, results_file=results_file)
    want = direct_cocoeval(gt_path, coco_results())
    assert 0.0 < want["AP"] < 1.0
    assert stats == pytest.approx(want, abs=1e-7)
    assert direct_cocoeval(gt_path, json.load(open(results_file))) == \
        pytest.approx(want, abs=1e-7)
    # The old form (file + category_ids) still works, and VOC metrics take a COCO JSON.
    assert evaluate_model(model, dataset(), gt_path, category_ids=[1, 2]) == pytest.approx(want, abs=1e-7)
    stats = evaluate_model(model, dataset(), gt_path, category_ids=[1, 2], metric="voc12")
    assert stats["mAP"] == pytest.approx((VOC12["cat"] + VOC12["dog"]) / 2, abs=1e-7)


def test_callback_logs_val_map_to_history_and_tensorboard(tmp_path):
    model = LookupDetector(_table())
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    callback = DetectionEvalCallback(dataset(), make_source(), metric="voc07",
                                     log_dir=str(tmp_path / "logs"), verbose=0)
    history = model.fit(dataset(), epochs=2, callbacks=[callback], verbose=0, shuffle=False)
    want = (VOC07["cat"] + VOC07["dog"]) / 2
    assert history.history["val_mAP"] == pytest.approx([want, want], abs=1e-7)
    assert history.history["val_AP/dog"] == pytest.approx([VOC07["dog"]] * 2, abs=1e-7)
    found = {}
    for path in glob.glob(os.path.join(str(tmp_path / "logs"), "validation", "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
    assert found[("val_mAP", 0)] == pytest.approx(want, abs=1e-6)
    assert found[("val_AP/cat", 1)] == pytest.approx(VOC07["cat"], abs=1e-6)


def test_format_stats_and_bad_metric(capsys):
    voc = {"mAP": 0.5, "AP/cat": 0.75, "AP/dog": float("nan")}
    text = format_stats(voc)
    assert "cat" in text and "0.7500" in text and "n/a" in text and text.splitlines()[-1].startswith("mAP")
    coco = dict(zip(STAT_KEYS, [0.25] * 12))
    assert format_stats(coco).splitlines()[2].startswith("AP ")
    with pytest.raises(ConfigError, match=r"metric must be one of \['coco', 'coco_segm', 'proposals', "
                       r"'proposals_segm', 'voc07', 'voc12'\]"):
        make_evaluator("voc2007", make_source())
    with pytest.raises(ConfigError):
        DetectionEvalCallback(dataset(), make_source(), metric="map")
    assert primary_key("COCO") == "AP"
