import logging

import numpy as np
import pytest

from kerasdet.evaluation.voc_ap import voc_ap, voc_eval

# Boxes below are yxyx (the package default) unless a test says otherwise.
A = [0.0, 0.0, 10.0, 10.0]
B = [20.0, 20.0, 40.0, 30.0]
FAR = [50.0, 50.0, 60.0, 60.0]


def _gt(boxes, classes, difficult=None):
    out = {"boxes": np.array(boxes, np.float32).reshape(-1, 4), "classes": np.array(classes)}
    if difficult is not None:
        out["difficult"] = np.array(difficult, bool)
    return out


def _det(boxes, scores, classes):
    return {"boxes": np.array(boxes, np.float32).reshape(-1, 4),
            "scores": np.array(scores, np.float32), "classes": np.array(classes)}


# ------------------------------------------------------------------------------ voc_ap

def test_voc_ap_hand_computed_curve():
    # ranked TP, FP, TP with 2 positives: recall .5 .5 1, precision 1 .5 2/3
    rec = np.array([0.5, 0.5, 1.0])
    prec = np.array([1.0, 0.5, 2 / 3])
    # area under the envelope: 0.5 * 1 + 0.5 * 2/3
    assert voc_ap(rec, prec) == pytest.approx(5 / 6)
    # 11-point: thresholds 0..0.5 (6 of them) see precision 1, 0.6..1 (5) see 2/3
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_voc_ap_edge_cases():
    assert voc_ap([], []) == 0.0
    assert voc_ap([], [], use_07_metric=True) == 0.0
    # recall exactly 0.3 reaches the 0.3 threshold (devkit's 0:0.1:1), 4 of 11 points
    assert voc_ap([0.3], [1.0], use_07_metric=True) == pytest.approx(4 / 11)
    with pytest.raises(ValueError, match="same length"):
        voc_ap([0.1, 0.2], [1.0])


# ---------------------------------------------------------------------------- voc_eval

@pytest.mark.parametrize("use_07, want", [(False, 5 / 6), (True, (6 + 5 * 2 / 3) / 11)])
def test_duplicate_is_false_positive(use_07, want):
    gts = {"img": _gt([A, B], [0, 0])}
    # A (TP), duplicate of A (FP), B (TP)
    dets = {"img": _det([A, A, B], [0.9, 0.8, 0.7], [0, 0, 0])}
    out = voc_eval(dets, gts, use_07_metric=use_07)
    assert out["per_class_ap"] == {0: pytest.approx(want)}
    assert out["mAP"] == pytest.approx(want)
    assert out["num_positives"] == {0: 2}


def test_ranking_is_over_all_images():
    gts = {1: _gt([A], [0]), 2: _gt([B], [0])}
    # image 2's FP outranks image 1's TP: FP, TP, TP -> recall 0 .5 1, prec 0 .5 2/3
    dets = {1: _det([A], [0.5], [0]), 2: _det([FAR, B], [0.9, 0.4], [0, 0])}
    out = voc_eval(dets, gts)
    assert out["mAP"] == pytest.approx(0.5 * 2 / 3 + 0.5 * 2 / 3)


def test_difficult_boxes_are_ignored():
    gts = {0: _gt([A, B], [0, 0], difficult=[False, True])}
    # the difficult box is found first: ignored (not FP); not finding it is no miss
    dets = {0: _det([B, A], [0.9, 0.8], [0, 0])}
    out = voc_eval(dets, gts)
    assert out["per_class_ap"][0] == pytest.approx(1.0)
    assert out["num_positives"] == {0: 1}
    # the same without the flag: B is a positive too
    plain = voc_eval(dets, {0: _gt([A, B], [0, 0])})
    assert plain["per_class_ap"][0] == pytest.approx(1.0) and plain["num_positives"] == {0: 2}
    # and missing the difficult one costs nothing, while missing a normal one does
    only_a = {0: _det([A], [0.8], [0])}
    assert voc_eval(only_a, gts)["mAP"] == pytest.approx(1.0)
    assert voc_eval(only_a, {0: _gt([A, B], [0, 0])})["mAP"] == pytest.approx(0.5)


def test_iou_threshold_is_inclusive_and_configurable():
    gts = {0: _gt([[0, 0, 10, 10]], [0])}
    half = {0: _det([[0, 0, 10, 5]], [0.9], [0])}  # IoU exactly 0.5
    assert voc_eval(half, gts)["mAP"] == pytest.approx(1.0)
    assert voc_eval(half, gts, iou_threshold=0.51)["mAP"] == 0.0


def test_pixel_inclusive_and_xyxy():
    gts = {0: _gt([[0, 0, 9, 9]], [0])}
    det = {0: _det([[0, 0, 4, 9]], [0.9], [0])}  # xyxy: 5 x 10 of 10 x 10 pixels
    # inclusive pixels: IoU 50/100 = 0.5 -> TP; continuous: 36/81 -> FP
    assert voc_eval(det, gts, bounding_box_format="xyxy", pixel_inclusive=True)["mAP"] == 1.0
    assert voc_eval(det, gts, bounding_box_format="xyxy")["mAP"] == 0.0


def test_multi_class_map_and_missing_class(caplog):
    gts = {0: _gt([A, B, FAR], [0, 1, 1]), 1: _gt([], [])}
    dets = {0: _det([A, B], [0.9, 0.8], [0, 1]),
            1: _det([A], [0.1], [2]),          # class without ground truth
            "unlabelled": _det([A], [0.2], [0])}  # image absent from GT: FP (low score)
    out = voc_eval(dets, gts)
    # class 0: TP then FP -> 1.0; class 1: one of two found -> 0.5
    assert out["per_class_ap"] == {0: pytest.approx(1.0), 1: pytest.approx(0.5)}
    assert out["mAP"] == pytest.approx(0.75)
    with caplog.at_level(logging.WARNING):
        out = voc_eval(dets, gts, class_ids=[0, 1, 2], use_07_metric=True)
    assert set(out["per_class_ap"]) == {0, 1}
    assert out["per_class_ap"][1] == pytest.approx(6 / 11)
    assert "no non-difficult ground truth" in caplog.text


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"detections\[0\].*scores"):
        voc_eval({0: {"boxes": np.zeros((1, 4)), "classes": [0]}}, {0: _gt([A], [0])})
    with pytest.raises(ValueError, match="lengths differ"):
        voc_eval({}, {0: {"boxes": np.zeros((2, 4)), "classes": [0]}})
    with pytest.raises(ValueError, match="no class"):
        voc_eval({}, {0: _gt([A], [0], difficult=[True])})


def _reference_voc_eval(dets, gts, cls, ovthresh, use_07):
    """py-faster-rcnn's voc_eval.py loop (xyxy, +1 pixels, '>' threshold), transcribed,
    with one deliberate change: 11-point thresholds k / 10 instead of np.arange(0, 1.1,
    0.1), whose 0.30000000000000004 misses a recall of exactly 0.3 (see voc_ap.py)."""
    class_recs, npos = {}, 0
    for img, g in gts.items():
        m = g["classes"] == cls
        bbox = g["boxes"][m][:, [1, 0, 3, 2]].astype(float)
        diff = g["difficult"][m]
        npos += int(np.sum(~diff))
        class_recs[img] = {"bbox": bbox, "difficult": diff, "det": [False] * len(bbox)}
    ids, conf, bb = [], [], []
    for img, d in dets.items():
        m = d["classes"] == cls
        ids += [img] * int(m.sum())
        conf += list(d["scores"][m])
        bb += list(d["boxes"][m][:, [1, 0, 3, 2]].astype(float))
    order = np.argsort(-np.array(conf), kind="stable")
    nd = len(ids)
    tp, fp = np.zeros(nd), np.zeros(nd)
    for n, d in enumerate(order):
        R = class_recs[ids[d]]
        b = bb[d]
        ovmax = -np.inf
        BBGT = R["bbox"]
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], b[0])
            iymin = np.maximum(BBGT[:, 1], b[1])
            ixmax = np.minimum(BBGT[:, 2], b[2])
            iymax = np.minimum(BBGT[:, 3], b[3])
            iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
            ih = np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = ((b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0)
                   + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0)
                   - inters)
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[n] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[n] = 1.0
        else:
            fp[n] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if use_07:
        ap = 0.0
        for t in np.arange(11) / 10.0:
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap += p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


@pytest.mark.parametrize("use_07", [False, True])
def test_matches_py_faster_rcnn_reference_on_random_data(use_07):
    rng = np.random.default_rng(3)
    gts, dets = {}, {}
    for img in range(12):
        n = int(rng.integers(1, 5))
        yx = rng.uniform(0, 80, size=(n, 2))
        hw = rng.uniform(8, 40, size=(n, 2))
        boxes = np.concatenate([yx, yx + hw], axis=1)
        gts[img] = {"boxes": boxes, "classes": rng.integers(0, 3, n),
                    "difficult": rng.uniform(size=n) < 0.15}
        # noisy copies, duplicates and random boxes
        m = int(rng.integers(0, 8))
        pick = rng.integers(0, n, m)
        src = boxes[pick] + rng.normal(0, 1.5, size=(m, 4))
        rand = rng.uniform(0, 100, size=(3, 2))
        rand = np.concatenate([rand, rand + 15], axis=1)
        dets[img] = {"boxes": np.concatenate([src, rand]),
                     "scores": rng.uniform(size=m + 3),
                     "classes": np.concatenate([gts[img]["classes"][pick],
                                                rng.integers(0, 3, 3)])}
    out = voc_eval(dets, gts, use_07_metric=use_07, pixel_inclusive=True)
    for cls in range(3):
        want = _reference_voc_eval(dets, gts, cls, 0.5, use_07)
        assert out["per_class_ap"][cls] == pytest.approx(want, abs=1e-12), cls
