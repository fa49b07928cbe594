"""RegionProposalNetwork: shapes, the pieces it composes, the loss on a hand-made case, config."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.layers.region_proposal import RegionProposalNetwork
from kerasdet.layers.rpn import rpn_losses
from kerasdet.matching import ArgMaxMatcher


def _bce(label, logit):
    p = 1.0 / (1.0 + np.exp(-logit))
    return -(label * np.log(p) + (1 - label) * np.log(1 - p))


def test_shapes_on_two_levels_and_one_map():
    rpn = RegionProposalNetwork(min_level=3, max_level=4, channels=8, aspect_ratios=(0.5, 1.0, 2.0),
                                post_nms_topk_train=20, post_nms_topk_test=10)
    feats = [tf.random.normal((2, 8, 8, 6), seed=1), tf.random.normal((2, 4, 4, 6), seed=2)]
    logits, deltas, anchors = rpn.outputs(feats)
    assert [l.shape for l in logits] == [(2, 192), (2, 48)]
    assert [d.shape for d in deltas] == [(2, 192, 4), (2, 48, 4)]
    assert [a.shape for a in anchors] == [(192, 4), (48, 4)]
    # one shared head: 3x3 conv 6 -> 8, 1x1 -> 3 objectness, 1x1 -> 12 deltas
    assert rpn.count_params() == (9 * 6 * 8 + 8) + (8 * 3 + 3) + (8 * 12 + 12)
    assert rpn.num_anchors == 3 and rpn.levels == [3, 4]
    boxes, scores, valid = rpn(feats, image_shape=(64, 64))
    assert boxes.shape == (2, 10, 4) and scores.shape == (2, 10) and valid.shape == (2, 10)
    boxes, _, _ = rpn(feats, image_shape=(64, 64), training=True)
    assert boxes.shape == (2, 20, 4)
    assert rpn.conv_features(feats[0]).shape == (2, 8, 8, 8)
    with pytest.raises(ValueError, match="levels"):
        rpn.outputs(feats[:1])
    single = RegionProposalNetwork(min_level=4, max_level=4, channels=8, scales=(1.0, 2.0), post_nms_topk_test=5)
    logits, deltas, anchors = single.outputs(feats[1])  # one map, no list
    assert logits[0].shape == (2, 96) and anchors[0].shape == (96, 4)
    assert single(feats[1], image_shape=(64, 64))[0].shape == (2, 5, 4)


def test_call_is_the_head_anchors_and_proposal_generator_composed():
    rpn = RegionProposalNetwork(min_level=3, max_level=4, channels=8, pre_nms_topk_test=50, post_nms_topk_test=16)
    feats = [tf.random.normal((2, 8, 8, 6), seed=3), tf.random.normal((2, 4, 4, 6), seed=4)]
    boxes, scores, valid = rpn(feats, image_shape=(64, 64))
    logits, deltas = rpn.head(feats)
    anchors = [rpn.anchor_generator.level_anchors(lvl, f.shape[1], f.shape[2]) for lvl, f in zip((3, 4), feats)]
    ref = rpn.proposal_generator(logits, deltas, anchors, image_shape=(64, 64), training=False)
    for mine, theirs in zip((boxes, scores, valid), ref):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    padded = rpn(feats, image_shape=(64, 64), nms_method="padded")
    np.testing.assert_array_equal(padded[2].numpy().sum(1), valid.numpy().sum(1))
    np.testing.assert_allclose(np.sort(padded[1].numpy(), 1), np.sort(scores.numpy(), 1), atol=1e-6)


def test_loss_hand_computed():
    # One ground truth equal to anchor 0 (IoU 1: positive); anchor 1 (IoU 0.5) and anchor 2
    # (IoU 1/3) lie between the thresholds (ignored); anchor 3 (IoU 0) is negative. With 4
    # samples per image both labelled anchors are sampled: 2 sampled, 1 positive.
    anchors = np.array([[0, 0, 10, 10], [0, 0, 10, 20], [0, 5, 10, 15], [50, 50, 60, 60]], "float32")
    logits = np.array([[1.5, 0.3, -0.2, -2.0]], "float32")
    deltas = np.zeros((1, 4, 4), "float32")
    deltas[0, 0, 0] = 0.05  # target 0: |x| < beta = 1/9 -> 0.5 x^2 / beta
    deltas[0, 2, :] = 5.0  # an ignored anchor: never in the loss
    gt_boxes = np.array([[[0, 0, 10, 10]]], "float32")
    gt_classes = np.array([[2]], "int32")
    rpn = RegionProposalNetwork(min_level=4, max_level=4, batch_size=4, positive_fraction=0.5)
    cls_loss, box_loss = rpn.loss_terms([tf.constant(logits)], [tf.constant(deltas)], [tf.constant(anchors)],
                                        gt_boxes, gt_classes)
    np.testing.assert_allclose(float(cls_loss), (_bce(1, 1.5) + _bce(0, -2.0)) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(box_loss), 0.5 * 0.05 ** 2 * 9.0 / 2, rtol=1e-5)


def test_loss_over_levels_is_rpn_losses_of_the_concatenation():
    rng = np.random.RandomState(0)
    anchors = [rng.uniform(0, 40, (6, 2)).astype("float32"), rng.uniform(0, 40, (3, 2)).astype("float32")]
    anchors = [np.concatenate([a, a + 16.0], axis=1) for a in anchors]
    logits = [rng.normal(size=(2, 6)).astype("float32"), rng.normal(size=(2, 3)).astype("float32")]
    deltas = [rng.normal(size=(2, 6, 4)).astype("float32") * 0.1, rng.normal(size=(2, 3, 4)).astype("float32") * 0.1]
    gt_boxes = np.array([[[2, 2, 20, 20], [0, 0, 0, 0]], [[10, 10, 30, 30], [20, 5, 40, 25]]], "float32")
    gt_classes = np.array([[0, -1], [1, 2]], "int32")
    rpn = RegionProposalNetwork(min_level=3, max_level=4, batch_size=64, positive_threshold=0.5,
                                negative_threshold=0.2, smooth_l1_beta=0.25)
    mine = rpn.loss_terms(logits, deltas, anchors, gt_boxes, gt_classes)
    theirs = rpn_losses(np.concatenate(logits, 1), np.concatenate(deltas, 1), np.concatenate(anchors, 0), gt_boxes,
                        gt_classes, matcher=ArgMaxMatcher(positive_threshold=0.5, negative_threshold=0.2,
                                                          allow_low_quality_matches=True),
                        num_samples=64, smooth_l1_beta=0.25)
    np.testing.assert_allclose([float(v) for v in mine], [float(v) for v in theirs], rtol=1e-6)


def test_config_round_trip():
    rpn = RegionProposalNetwork(min_level=4, max_level=4, anchor_size=2.0, scales=(1.0, 2.0, 4.0),
                                aspect_ratios=(1.0,), channels=16, positive_threshold=0.6, negative_threshold=0.2,
                                batch_size=128, positive_fraction=0.25, pre_nms_topk_train=600,
                                post_nms_topk_train=300, pre_nms_topk_test=500, post_nms_topk_test=100,
                                nms_iou_threshold=0.6, min_size=16.0, smooth_l1_beta=0.5, nms_method="padded",
                                name="rpn")
    config = rpn.get_config()
    clone = RegionProposalNetwork.from_config(config)
    assert clone.get_config() == config
    assert clone.num_anchors == 3 and clone.proposal_generator.nms_method == "padded"
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(rpn))
    assert type(restored) is RegionProposalNetwork and restored.get_config() == config
    with pytest.raises(ValueError, match="nms_method"):
        RegionProposalNetwork(nms_method="auto")  # the models resolve "auto"; the layer takes a backend
