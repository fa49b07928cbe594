"""Batched balanced sampling and Fast R-CNN RoI targets."""
import numpy as np
import tensorflow as tf

from kerasdet import boxes as box_ops
from kerasdet.sampling import sample_balanced, sample_rois


def test_sample_balanced_quota_and_counts():
    tf.random.set_seed(0)
    pos = np.zeros((3, 1000), bool)
    neg = np.zeros((3, 1000), bool)
    pos[0, :400] = True; neg[0, 400:] = True      # many of both: 128 + 128
    pos[1, :10] = True; neg[1, 10:] = True        # few positives: 10 + 246
    pos[2, :0] = True; neg[2, :100] = True        # no positives, few negatives: 0 + 100
    sp, sn = sample_balanced(pos, neg, num_samples=256, positive_fraction=0.5)
    sp, sn = sp.numpy(), sn.numpy()
    assert sp.sum(1).tolist() == [128, 10, 0]
    assert sn.sum(1).tolist() == [128, 246, 100]
    assert not np.any(sp & ~pos) and not np.any(sn & ~neg)
    # random: two draws differ
    sp2, _ = sample_balanced(pos, neg, num_samples=256, positive_fraction=0.5)
    assert not np.array_equal(sp2.numpy()[0], sp[0])


def test_sample_rois_hand_case():
    # one object; proposals: an exact copy (fg), IoU 0.25 (bg), a padding row (invalid)
    gt = np.array([[[0, 0, 10, 10], [0, 0, 0, 0]]], "float32")
    cls = np.array([[2, -1]], "int32")
    props = np.array([[[0, 0, 10, 10], [0, 5, 10, 15], [0, 0, 0, 0]]], "float32")
    valid = np.array([[True, True, False]])
    out = sample_rois(props, valid, gt, cls, num_classes=3, num_samples=4, foreground_fraction=0.5)
    labels = out["labels"].numpy()[0]
    weights = out["weights"].numpy()[0]
    fg = out["foreground"].numpy()[0]
    # candidates: 2 fg (proposal 0 + the added gt), 1 bg; quota 2 fg -> 2 fg, 1 bg, 1 filler
    assert fg.tolist() == [True, True, False, False]
    assert labels.tolist()[:3] == [3, 3, 0]  # class 2 -> label 3 (0 is background)
    assert weights.tolist() == [1, 1, 1, 0]
    np.testing.assert_allclose(out["box_targets"].numpy()[0, :2], 0.0, atol=1e-5)
    np.testing.assert_allclose(out["box_targets"].numpy()[0, 2:], 0.0)
    # a shifted foreground box: targets are the (10, 10, 5, 5)-weighted encoding
    props2 = np.array([[[1, 0, 11, 10]]], "float32")
    out = sample_rois(props2, np.array([[True]]), gt, cls, num_classes=3, num_samples=2, foreground_fraction=1.0,
                      add_ground_truth=False)
    expected = box_ops.encode(gt[0, :1], props2[0], weights=(10, 10, 5, 5)).numpy()
    np.testing.assert_allclose(out["box_targets"].numpy()[0, 0], expected[0], atol=1e-5)
    np.testing.assert_allclose(expected[0], [-1.0, 0, 0, 0], atol=1e-5)


def test_sample_rois_quota_thresholds_and_static_shape():
    rng = np.random.RandomState(0)
    gt = np.array([[[20, 20, 60, 60], [70, 10, 90, 50]]] * 2, "float32")
    cls = np.array([[0, 1], [-1, -1]], "int32")  # image 1: no objects
    y = rng.uniform(0, 80, (2, 300, 2))
    props = np.concatenate([y, y + rng.uniform(5, 50, (2, 300, 2))], -1).astype("float32")
    out = sample_rois(props, np.ones((2, 300), bool), gt, cls, num_classes=2, num_samples=64)
    assert out["rois"].shape == (2, 64, 4)
    fg = out["foreground"].numpy()
    iou = out["max_iou"].numpy()
    assert fg[0].sum() <= 16 and fg[0].sum() > 0
    assert np.all(iou[0][fg[0]] >= 0.5) and np.all(iou[0][~fg[0] & (out["weights"].numpy()[0] > 0)] < 0.5)
    # no objects: a valid all-background sample, finite targets
    assert fg[1].sum() == 0 and out["weights"].numpy()[1].sum() == 64
    assert np.all(out["labels"].numpy()[1] == 0)
    for v in out.values():
        assert np.all(np.isfinite(v.numpy().astype("float64")))


def test_sample_rois_crowds_are_not_targets():
    gt = np.array([[[0, 0, 10, 10]]], "float32")
    out = sample_rois(np.array([[[0, 0, 10, 10]]], "float32"), np.array([[True]]), gt, np.array([[1]], "int32"),
                      num_classes=2, gt_crowd=np.array([[True]]), num_samples=2)
    assert out["foreground"].numpy().sum() == 0
