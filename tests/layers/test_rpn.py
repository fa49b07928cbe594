"""RPN head, anchor targets and proposal generation."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.anchors import AnchorGenerator
from kerasdet.layers.rpn import ProposalGenerator, RPNHead, rpn_losses, rpn_targets
from kerasdet.matching import ArgMaxMatcher


def _logit(p):
    return float(np.log(p / (1 - p)))


def test_head_shapes_and_weight_sharing():
    head = RPNHead(num_anchors=3, channels=8)
    feats = [tf.zeros((2, 16, 16, 8)), tf.zeros((2, 8, 8, 8)), tf.zeros((2, 4, 4, 8))]
    logits, deltas = head(feats)
    assert [l.shape for l in logits] == [(2, 768), (2, 192), (2, 48)]
    assert [d.shape for d in deltas] == [(2, 768, 4), (2, 192, 4), (2, 48, 4)]
    # one set of weights for all levels: 3x3 conv + 1x1 (A) + 1x1 (4A)
    assert head.count_params() == (9 * 8 * 8 + 8) + (8 * 3 + 3) + (8 * 12 + 12)
    clone = RPNHead.from_config(head.get_config())
    assert clone.get_config() == head.get_config()


def test_fpn_anchor_sizes_32_to_512():
    gen = AnchorGenerator(min_level=2, max_level=6, anchor_size=8.0, scales=(1.0,))
    for level, size in zip(range(2, 7), (32, 64, 128, 256, 512)):
        hw = gen.base_shapes(level).numpy()
        np.testing.assert_allclose(np.sqrt(hw[:, 0] * hw[:, 1]), size, rtol=1e-5)
    assert gen.num_anchors_per_location == 3


def test_rpn_losses_hand_computed():
    # Image 0: anchors 0, 1 positive (IoU 1 and 0.83), 4, 5 negative; image 1 (no objects):
    # its 6 anchors all negative. num_samples=6 keeps every labelled anchor: 4 + 6 sampled.
    anchors = np.array([[0, 0, 10, 10], [0, 0, 10, 12], [0, 0, 10, 16], [0, 5, 10, 15],
                        [50, 50, 60, 60], [40, 40, 70, 70]], "float32")
    gt = np.array([[[0, 0, 10, 10]], [[0, 0, 0, 0]]], "float32")
    cls = np.array([[1], [-1]], "int32")
    logits = np.array([[2.0, -1.0, 5.0, 5.0, 0.5, -3.0], [0.0, 1.0, -1.0, 2.0, 0.0, 0.0]], "float32")
    deltas = np.zeros((2, 6, 4), "float32")
    deltas[0, 0] = [0.5, 0.0, 0.0, 0.0]  # anchor 0 = the gt: target 0, |d| = 0.5
    matcher = ArgMaxMatcher(positive_threshold=0.7, negative_threshold=0.3)
    cls_loss, box_loss = rpn_losses(logits, deltas, anchors, gt, cls, matcher=matcher, num_samples=6,
                                     positive_fraction=1.0, smooth_l1_beta=1.0)
    bce = lambda x, y: np.log1p(np.exp(-x)) if y else np.log1p(np.exp(x))  # noqa: E731
    expected_cls = (bce(2.0, 1) + bce(-1.0, 1) + bce(0.5, 0) + bce(-3.0, 0)
                    + sum(bce(x, 0) for x in logits[1])) / 10.0
    # anchor 1 [0,0,10,12] vs gt [0,0,10,10]: dx = (5 - 6) / 12, dw = log(10 / 12); smooth L1 beta 1
    dx, dw = -1.0 / 12.0, np.log(10.0 / 12.0)
    expected_box = (0.5 * 0.5**2 + 0.5 * dx**2 + 0.5 * dw**2) / 10.0
    np.testing.assert_allclose(cls_loss.numpy(), expected_cls, rtol=1e-5)
    np.testing.assert_allclose(box_loss.numpy(), expected_box, rtol=1e-5)


def test_rpn_targets_thresholds_and_sampling():
    tf.random.set_seed(0)
    anchors = np.array(
        [[0, 0, 10, 10],     # IoU 1 with gt -> positive
         [0, 0, 10, 12],     # IoU 0.83 -> positive
         [0, 0, 10, 16],     # IoU 0.625 -> ignored (between 0.3 and 0.7)
         [0, 5, 10, 15],     # IoU 0.33 -> ignored
         [50, 50, 60, 60],   # IoU 0 -> negative
         [40, 40, 70, 70]],  # negative
        "float32")
    gt = np.array([[[0, 0, 10, 10], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]], "float32")
    cls = np.array([[1, -1], [-1, -1]], "int32")
    matcher = ArgMaxMatcher(positive_threshold=0.7, negative_threshold=0.3)
    labels, targets = rpn_targets(anchors, gt, cls, matcher=matcher, num_samples=4, positive_fraction=0.5)
    labels = labels.numpy()
    assert labels[0].tolist() == [1, 1, -1, -1, 0, 0]
    np.testing.assert_allclose(targets.numpy()[0, 0], 0.0, atol=1e-6)
    assert np.all(targets.numpy()[0, 2:] == 0)
    # image without objects: only negatives, at most num_samples of them
    assert set(labels[1].tolist()) <= {0, -1} and (labels[1] == 0).sum() == 4
    # quota: 1 positive at most with num_samples=2
    labels, _ = rpn_targets(anchors, gt, cls, matcher=matcher, num_samples=2, positive_fraction=0.5)
    assert (labels.numpy()[0] == 1).sum() == 1 and (labels.numpy()[0] == 0).sum() == 1


@pytest.mark.parametrize("method", ["combined", "padded"])
def test_proposals_topk_nms_clip_and_padding(method):
    # level 0: two overlapping boxes (IoU 0.82) and one separate; level 1: a duplicate of A
    anchors = [np.array([[0, 0, 10, 10], [0, 1, 10, 11], [20, 20, 30, 30]], "float32"),
               np.array([[0, 0, 10, 10], [90, 90, 130, 130]], "float32")]
    logits = [np.array([[_logit(0.9), _logit(0.8), _logit(0.6)]], "float32"),
              np.array([[_logit(0.5), _logit(0.3)]], "float32")]
    deltas = [np.zeros((1, 3, 4), "float32"), np.zeros((1, 2, 4), "float32")]
    gen = ProposalGenerator(pre_nms_topk_test=3, post_nms_topk_test=6, nms_method=method)
    boxes, scores, valid = gen(logits, deltas, anchors, image_shape=(100, 100))
    valid = valid.numpy()[0]
    # the 0.8 box is suppressed by A on its level; the level-1 duplicate is NOT (NMS per level)
    assert valid.tolist() == [True, True, True, True, False, False]
    np.testing.assert_allclose(scores.numpy()[0, :4], [0.9, 0.6, 0.5, 0.3], rtol=1e-5)
    np.testing.assert_allclose(boxes.numpy()[0, 3], [90, 90, 100, 100])  # clipped
    assert np.all(boxes.numpy()[0, 4:] == 0)
    # pre-NMS top-k per level
    gen = ProposalGenerator(pre_nms_topk_test=1, post_nms_topk_test=6, nms_method=method)
    _, _, valid = gen(logits, deltas, anchors, image_shape=(100, 100))
    assert valid.numpy().sum() == 2


@pytest.mark.parametrize("method", ["combined", "padded"])
def test_proposals_entirely_outside_the_image_are_dropped(method):
    anchors = [np.array([[200, 200, 220, 220], [-50, -50, -10, -10]], "float32")]
    logits = [np.zeros((2, 2), "float32")]
    deltas = [np.zeros((2, 2, 4), "float32")]
    gen = ProposalGenerator(post_nms_topk_train=4, nms_method=method)
    boxes, scores, valid = gen(logits, deltas, anchors, image_shape=(100, 100), training=True)
    assert boxes.shape == (2, 4, 4) and valid.numpy().sum() == 0
    assert np.all(np.isfinite(boxes.numpy())) and np.all(scores.numpy() == 0)


def test_proposal_generator_config_round_trip():
    gen = ProposalGenerator(pre_nms_topk_train=10, post_nms_topk_train=5, nms_iou_threshold=0.6, min_size=1.0,
                            nms_method="padded", name="p")
    config = gen.get_config()
    assert ProposalGenerator.from_config(config).get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(gen))
    assert restored.get_config() == config
