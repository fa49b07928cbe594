"""Anchor-to-ground-truth matching.

:class:`ArgMaxMatcher` is the IoU arg-max matcher with an ignore band used by RetinaNet
(0.5 / 0.4), the RPN (0.7 / 0.3) and SSD (0.5 / 0.5); :func:`hungarian_match` is the
optimal one-to-one assignment (scipy) used by set losses. Both are batched: one call
handles a whole ``[B, N]`` padded ground-truth batch.
"""
import numpy as np
import tensorflow as tf

from kerasdet import boxes as box_ops

POSITIVE = 1
NEGATIVE = 0
IGNORE = -1


class ArgMaxMatcher:
    """Assigns every anchor the ground truth of highest IoU, with an ignore band.

    An anchor is positive when its best IoU is ``>= positive_threshold``, negative when it
    is ``< negative_threshold`` and ignored in between (RetinaNet §5.4.2: 0.5 / 0.4).

    Args:
        positive_threshold: IoU at or above which an anchor is positive. Default 0.5.
        negative_threshold: IoU below which an anchor is negative. Default 0.4.
        allow_low_quality_matches: also make positive every anchor whose IoU with some
            ground truth equals that ground truth's best IoU over all anchors, so every
            object gets at least one anchor (Faster R-CNN's rule; our choice: the thesis,
            §5.4.2, only says "the assignment rule from RPN ... with adjusted thresholds"). As in Detectron2 the
            anchor keeps its arg-max ground truth. Default True.
        crowd_ioa_threshold: anchors that would be negative but lie inside an ``iscrowd``
            region by at least this fraction of their own area are ignored instead, so
            the detector is not taught that crowds are background. Default 0.7.
    """

    def __init__(
        self,
        *,
        positive_threshold=0.5,
        negative_threshold=0.4,
        allow_low_quality_matches=True,
        crowd_ioa_threshold=0.7,
    ):
        if negative_threshold > positive_threshold:
            raise ValueError(
                f"negative_threshold ({negative_threshold}) must be <= positive_threshold ({positive_threshold})."
            )
        self.positive_threshold = float(positive_threshold)
        self.negative_threshold = float(negative_threshold)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)
        self.crowd_ioa_threshold = float(crowd_ioa_threshold)

    def get_config(self):
        return {
            "positive_threshold": self.positive_threshold,
            "negative_threshold": self.negative_threshold,
            "allow_low_quality_matches": self.allow_low_quality_matches,
            "crowd_ioa_threshold": self.crowd_ioa_threshold,
        }

    def __call__(self, anchors, gt_boxes, gt_valid, gt_crowd=None):
        """Matches ``anchors [A, 4]`` (or ``[B, A, 4]``) to a padded ground-truth batch.

        Args:
            anchors: yxyx anchors, ``[A, 4]`` shared by the batch or ``[B, A, 4]``.
            gt_boxes: ``[B, N, 4]`` yxyx ground truth.
            gt_valid: ``[B, N]`` bool, True for real (non-padding, non-crowd) objects.
            gt_crowd: optional ``[B, N]`` bool, True for ``iscrowd`` regions.

        Returns:
            ``(matched_index, labels)``: ``[B, A]`` int32 index of the matched ground truth
            (0 where there is none; only meaningful where ``labels == 1``) and ``[B, A]``
            int32 labels in {1 positive, 0 negative, -1 ignored}. A batch element with no
            valid ground truth yields all-negative labels.
        """
        anchors = tf.convert_to_tensor(anchors, tf.float32)
        gt_boxes = tf.convert_to_tensor(gt_boxes, tf.float32)
        gt_valid = tf.convert_to_tensor(gt_valid, tf.bool)
        if anchors.shape.rank == 2:
            anchors = anchors[None]
        overlaps = box_ops.iou(anchors, gt_boxes)  # [B, A, N]
        overlaps = tf.where(gt_valid[:, None, :], overlaps, -1.0)
        if gt_boxes.shape[1] == 0:
            shape = tf.shape(overlaps)[:2]
            return tf.zeros(shape, tf.int32), tf.zeros(shape, tf.int32)

        max_iou = tf.reduce_max(overlaps, axis=2)  # [B, A]
        matched = tf.argmax(overlaps, axis=2, output_type=tf.int32)
        labels = tf.where(
            max_iou >= self.positive_threshold,
            POSITIVE,
            tf.where(max_iou < self.negative_threshold, NEGATIVE, IGNORE),
        )
        if self.allow_low_quality_matches:
            best_per_gt = tf.reduce_max(overlaps, axis=1, keepdims=True)  # [B, 1, N]
            is_best = (overlaps == best_per_gt) & (best_per_gt > 0.0) & gt_valid[:, None, :]
            labels = tf.where(tf.reduce_any(is_best, axis=2), POSITIVE, labels)
        if gt_crowd is not None:
            gt_crowd = tf.convert_to_tensor(gt_crowd, tf.bool)

            def with_crowd():
                crowd_ioa = tf.where(gt_crowd[:, None, :], box_ops.ioa(anchors, gt_boxes), 0.0)
                in_crowd = tf.reduce_max(crowd_ioa, axis=2) >= self.crowd_ioa_threshold
                return tf.where(in_crowd & (labels == NEGATIVE), IGNORE, labels)

            # The [B, A, N] IoA costs as much as the IoU: skip it for batches without crowds.
            labels = tf.cond(tf.reduce_any(gt_crowd), with_crowd, lambda: tf.identity(labels))
        return matched, tf.cast(labels, tf.int32)


def match_labels(matcher, anchors, labels):
    """Runs ``matcher`` on a padded ground-truth ``labels`` dict (the kerasdet convention).

    ``labels``: ``{"boxes" [B, N, 4], "classes" [B, N] (-1 padding), optional "is_crowd"
    [B, N]}``; crowd regions are not matched (they only turn would-be negatives into
    ignored anchors, see :class:`ArgMaxMatcher`).

    Returns:
        ``(matched_boxes [B, A, 4], matched_classes [B, A], match_labels [B, A])``: each
        anchor's arg-max ground truth and its label in {1, 0, -1}.
    """
    gt_boxes = tf.cast(labels["boxes"], tf.float32)
    gt_classes = tf.cast(labels["classes"], tf.int32)
    valid = gt_classes >= 0
    gt_crowd = labels.get("is_crowd")
    if gt_crowd is not None:
        gt_crowd = tf.cast(gt_crowd, tf.bool) & valid
        valid = valid & ~gt_crowd
    matched, match_labels_ = matcher(anchors, gt_boxes, valid, gt_crowd)
    matched_boxes = tf.gather(gt_boxes, matched, batch_dims=1)
    matched_classes = tf.gather(gt_classes, matched, batch_dims=1)
    return matched_boxes, matched_classes, match_labels_


def hungarian_match(cost):
    """Optimal one-to-one assignment for a batch of cost matrices (scipy).

    Args:
        cost: ``[B, N, M]`` float cost (a tensor or array). Use a large finite cost, never
            inf/NaN, for forbidden pairs.

    Returns:
        ``[B, N]`` int32: for each row the assigned column, or -1 when ``N > M`` leaves the
        row unassigned. Runs ``scipy.optimize.linear_sum_assignment`` per batch element
        through ``tf.numpy_function`` (the solver is inherently sequential).
    """

    def _solve(c):
        from scipy.optimize import linear_sum_assignment

        if not np.all(np.isfinite(c)):
            raise ValueError("hungarian_match: the cost matrix holds NaN or inf values.")
        out = np.full(c.shape[:2], -1, np.int32)
        for b in range(c.shape[0]):
            rows, cols = linear_sum_assignment(c[b])
            out[b, rows] = cols
        return out

    cost = tf.convert_to_tensor(cost, tf.float32)
    result = tf.numpy_function(_solve, [cost], tf.int32, stateful=False)
    result.set_shape(cost.shape[:2])
    return result
