import numpy as np
import pytest
import tensorflow as tf

from kerasdet.matching import ArgMaxMatcher, hungarian_match


def _anchors():
    return tf.constant(
        [
            [0.0, 0.0, 10.0, 10.0],  # IoU 1.0 with gt0
            [0.0, 0.0, 10.0, 12.0],  # IoU 10/12=0.833 with gt0
            [0.0, 0.0, 10.0, 22.0],  # IoU 100/220=0.4545 with gt0 -> ignore
            [0.0, 0.0, 10.0, 30.0],  # IoU 0.333 -> negative
            [50.0, 50.0, 60.0, 70.0],  # IoU 100/300=0.333 with gt1 (its best) -> forced positive
            [90.0, 90.0, 99.0, 99.0],  # nothing -> negative
        ]
    )


def test_thresholds_and_low_quality():
    gt = tf.constant([[[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 80.0, 60.0], [0.0, 0.0, 0.0, 0.0]]])
    valid = tf.constant([[True, True, False]])
    matched, labels = ArgMaxMatcher()(_anchors(), gt, valid)
    np.testing.assert_array_equal(labels.numpy(), [[1, 1, -1, 0, 1, 0]])
    np.testing.assert_array_equal(matched.numpy()[0, [0, 1, 4]], [0, 0, 1])
    _, labels = ArgMaxMatcher(allow_low_quality_matches=False)(_anchors(), gt, valid)
    np.testing.assert_array_equal(labels.numpy(), [[1, 1, -1, 0, 0, 0]])


def test_rpn_thresholds_and_empty_image():
    gt = tf.constant([[[0.0, 0.0, 10.0, 10.0]], [[0.0, 0.0, 0.0, 0.0]]])
    valid = tf.constant([[True], [False]])
    m = ArgMaxMatcher(positive_threshold=0.7, negative_threshold=0.3, allow_low_quality_matches=False)
    _, labels = m(_anchors(), gt, valid)
    np.testing.assert_array_equal(labels.numpy()[0], [1, 1, -1, -1, 0, 0])  # 0.333 is in [0.3, 0.7)
    np.testing.assert_array_equal(labels.numpy()[1], [0, 0, 0, 0, 0, 0])  # no objects: all negative


def test_crowd_regions_ignore_negatives():
    gt = tf.constant([[[0.0, 0.0, 10.0, 10.0], [85.0, 85.0, 100.0, 100.0]]])
    valid = tf.constant([[True, False]])
    crowd = tf.constant([[False, True]])
    _, labels = ArgMaxMatcher()(_anchors(), gt, valid, crowd)
    np.testing.assert_array_equal(labels.numpy(), [[1, 1, -1, 0, 0, -1]])


def test_bad_thresholds():
    with pytest.raises(ValueError):
        ArgMaxMatcher(positive_threshold=0.3, negative_threshold=0.5)


def test_hungarian_against_brute_force():
    import itertools

    rng = np.random.RandomState(0)
    cost = rng.uniform(size=(2, 4, 4)).astype("float32")
    got = hungarian_match(cost).numpy()
    for b in range(2):
        best = min(itertools.permutations(range(4)), key=lambda p: sum(cost[b, i, p[i]] for i in range(4)))
        np.testing.assert_array_equal(got[b], best)
    rect = hungarian_match(rng.uniform(size=(1, 3, 2)).astype("float32")).numpy()
    assert sorted(rect[0].tolist()).count(-1) == 1


def test_match_labels_gathers_matched_ground_truth_and_skips_crowds():
    from kerasdet.matching import ArgMaxMatcher, match_labels

    anchors = tf.constant([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], tf.float32)
    labels = {
        "boxes": tf.constant([[[0, 0, 10, 11], [19, 19, 31, 31], [48, 48, 62, 62]]], tf.float32),
        "classes": tf.constant([[4, 7, 2]]),
        "is_crowd": tf.constant([[False, False, True]]),
    }
    boxes, classes, lab = match_labels(ArgMaxMatcher(), anchors, labels)
    assert lab.numpy().tolist() == [[1, 1, -1]]  # the crowd region is ignored, never matched
    assert classes.numpy()[0, :2].tolist() == [4, 7]
    np.testing.assert_allclose(boxes.numpy()[0, :2], labels["boxes"].numpy()[0, :2])
