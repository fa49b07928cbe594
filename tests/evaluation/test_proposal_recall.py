"""Class-agnostic proposal recall (``useCats=0``, maxDets 10/100/1000) of boxes and
segments equals pycocotools run directly (its ``summarize()`` stats 6..11 are exactly
AR@maxDets[0..2] and AR small/medium/large @maxDets[2]); crowd regions and an image
without objects included (segm_testdata)."""
import numpy as np
import pytest
from segm_testdata import (
    CATEGORY_IDS,
    IMAGES,
    SCALES,
    detections,
    direct_cocoeval,
    reference_results,
    to_network_batch,
    write_gt,
)

from kerasdet.evaluation import (
    MASK_PROPOSAL_STAT_KEYS,
    PROPOSAL_STAT_KEYS,
    ProposalRecallEvaluator,
    run_proposal_recall,
)
from kerasdet.evaluation.coco_eval import coco_evaluate
from kerasdet.evaluation.metrics import format_stats, make_evaluator, primary_key, stat_keys
from kerasdet.evaluation.proposal_recall import average_recall, recall_keys

IMAGE_IDS = sorted(IMAGES)


@pytest.fixture
def gt_file(tmp_path):
    return write_gt(tmp_path / "instances_masks.json")


def _feed(evaluator, dets, max_det, with_masks=True, agnostic=False):
    for ids in ((1,), (2, 3)):
        out = to_network_batch(dets, list(ids), max_det, with_masks=with_masks)
        classes = out["classes"]
        if agnostic:  # one "object" class for every proposal, -1 padding kept
            classes = np.where(np.arange(max_det)[None] < out["num_detections"][:, None], 0, -1)
        evaluator.update(np.array(ids), out["boxes"], out["scores"], classes,
                         out["num_detections"], np.array([SCALES[i] for i in ids], np.float32),
                         masks=out["masks"] if with_masks else None)


def _direct_ar(gt_file, dets, iou_type, max_dets=(10, 100, 1000), image_ids=None):
    stats = direct_cocoeval(gt_file, reference_results(dets, iou_type), iou_type,
                            use_cats=False, max_dets=max_dets, image_ids=image_ids)
    return stats[6:12]


def test_keys():
    assert PROPOSAL_STAT_KEYS == ("AR10", "AR100", "AR1000", "ARs1000", "ARm1000", "ARl1000")
    assert MASK_PROPOSAL_STAT_KEYS == tuple("mask_" + k for k in PROPOSAL_STAT_KEYS)
    assert recall_keys((2, 5, 20)) == ("AR2", "AR5", "AR20", "ARs20", "ARm20", "ARl20")
    assert stat_keys("proposals_segm") == PROPOSAL_STAT_KEYS + MASK_PROPOSAL_STAT_KEYS
    assert (primary_key("proposals"), primary_key("proposals_segm")) == ("AR1000", "mask_AR1000")


def test_box_and_segment_ar_equal_pycocotools(gt_file):
    dets = detections(seed=0, extra=40)
    want_box = _direct_ar(gt_file, dets, "bbox")
    want_segm = _direct_ar(gt_file, dets, "segm")
    assert 0.0 < want_box[0] < want_box[1] < 1.0 and want_box != want_segm

    ev = make_evaluator("proposals_segm", gt_file, category_ids=CATEGORY_IDS)
    assert isinstance(ev, ProposalRecallEvaluator) and ev.needs_masks
    _feed(ev, dets, max_det=64)
    stats = ev.evaluate()
    assert list(stats) == list(PROPOSAL_STAT_KEYS + MASK_PROPOSAL_STAT_KEYS)
    np.testing.assert_allclose([stats[k] for k in PROPOSAL_STAT_KEYS], want_box, rtol=0, atol=1e-12)
    np.testing.assert_allclose([stats[k] for k in MASK_PROPOSAL_STAT_KEYS], want_segm, rtol=0,
                               atol=1e-12)
    table = format_stats(stats)
    assert "mask_ARs1000" in table and "Segment Proposal Recall" in table
    assert len(table.splitlines()) == 2 + 12


def test_ar_at_1000_proposals_boxes(gt_file):
    dets = detections(seed=3, extra=150)  # > 100 proposals per image
    want = _direct_ar(gt_file, dets, "bbox")
    assert want[1] < want[2]  # AR100 < AR1000: the 1000 level is really exercised
    ev = make_evaluator("proposals", gt_file, category_ids=CATEGORY_IDS)
    assert not ev.needs_masks
    _feed(ev, dets, max_det=170, with_masks=False)
    stats = ev.evaluate()
    assert list(stats) == list(PROPOSAL_STAT_KEYS)
    np.testing.assert_allclose([stats[k] for k in PROPOSAL_STAT_KEYS], want, rtol=0, atol=1e-12)


def test_other_max_dets_read_off_the_recall_array(gt_file):
    dets = detections(seed=1, extra=10)
    want = _direct_ar(gt_file, dets, "segm", max_dets=(2, 5, 20))
    assert want[0] < want[1] < want[2]
    ev = ProposalRecallEvaluator(gt_file, category_ids=CATEGORY_IDS, iou_type="segm",
                                 max_dets=(2, 5, 20))
    _feed(ev, dets, max_det=32)
    stats = ev.evaluate()
    keys = recall_keys((2, 5, 20), prefix="mask_")
    assert list(stats) == list(keys)
    np.testing.assert_allclose([stats[k] for k in keys], want, rtol=0, atol=1e-12)
    # the same from the results list, and average_recall on an accumulated COCOeval
    results = reference_results(dets, "segm")
    assert run_proposal_recall(gt_file, results, iou_type="segm", max_dets=(2, 5, 20)) == stats
    coco_eval = coco_evaluate(gt_file, results, iou_type="segm", use_cats=False,
                              max_dets=(2, 5, 20), summarize=False)
    assert average_recall(coco_eval, area="medium", max_dets=20) == stats["mask_ARm20"]
    with pytest.raises(ValueError, match="max_dets 100"):
        average_recall(coco_eval, max_dets=100)


def test_class_agnostic(gt_file):
    dets = detections(seed=2, extra=20)
    ev = ProposalRecallEvaluator(gt_file, category_ids=CATEGORY_IDS)
    _feed(ev, dets, max_det=40, with_masks=False)
    with_classes = ev.evaluate()
    ev.reset()
    _feed(ev, dets, max_det=40, with_masks=False, agnostic=True)
    assert ev.evaluate() == with_classes  # classes do not matter, -1 still pads
    class_aware = make_evaluator("coco", gt_file, category_ids=CATEGORY_IDS)
    _feed(class_aware, dets, max_det=40, with_masks=False)
    assert with_classes["AR100"] > class_aware.evaluate()["AR100"]  # wrong-class hits count


def test_crowd_and_image_without_objects(gt_file):
    ev = ProposalRecallEvaluator(gt_file, category_ids=CATEGORY_IDS, iou_type=("bbox", "segm"))
    dets = [d for d in detections(seed=0, extra=5) if d[0] == 3]
    out = to_network_batch(dets, [3], 16)
    ev.update([3], out["boxes"], out["scores"], out["classes"], out["num_detections"], [1.0],
              masks=out["masks"])
    stats = ev.evaluate()  # image 3 alone: no ground truth anywhere
    assert set(stats.values()) == {-1.0}
    assert _direct_ar(gt_file, dets, "segm", image_ids=[3]) == [-1.0] * 6
    # image 1 holds the crowd region: proposals on it are ignored, not false positives
    dets = [d for d in detections(seed=0, extra=5) if d[0] == 1]
    ev.reset()
    out = to_network_batch(dets, [1], 16)
    ev.update([1], out["boxes"], out["scores"], out["classes"], out["num_detections"], [2.0],
              masks=out["masks"])
    stats = ev.evaluate()
    np.testing.assert_allclose([stats[k] for k in MASK_PROPOSAL_STAT_KEYS],
                               _direct_ar(gt_file, dets, "segm", image_ids=[1]), rtol=0,
                               atol=1e-12)
