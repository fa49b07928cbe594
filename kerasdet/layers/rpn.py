"""Region Proposal Network on an FPN (thesis §4.4.1) or on a single map (Faster R-CNN C4).

* :class:`RPNHead` — a 3x3 conv + ReLU followed by two sibling 1x1 convs (objectness and
  box deltas), the same weights applied to every pyramid level (§4.4.1: "parameters are
  shared across all feature pyramid levels").
* :func:`rpn_targets` — anchor labels (IoU >= 0.7 positive or the best anchor of a ground
  truth, < 0.3 negative; :class:`~kerasdet.matching.ArgMaxMatcher`) and 256 sampled anchors
  per image with at most half positive (:func:`~kerasdet.sampling.sample_balanced`).
* :class:`ProposalGenerator` — per-level top-k of objectness, decode, clip to the image,
  drop empty boxes, NMS at 0.7 per level, keep the best ``post_nms_topk`` per image
  (2000 in training, 1000 at test). Fixed-size padded output.

Choices where the thesis defers to Faster R-CNN [92] without details (§4.4.1, §4.5.1: "as in [92]"; our choices):

* sigmoid objectness (one logit per anchor) rather than a 2-way softmax — equivalent
  for a binary decision with half the outputs (Detectron's FPN RPN);
* head width = ``channels`` (256 on the FPN) with ReLU; init N(0, 0.01), zero bias;
* proposals follow Detectron2: ``pre_nms_topk`` per level, NMS applied per level (levels
  never suppress each other), then the top ``post_nms_topk`` over all levels of the image
  (Detectron 1 took the top over the whole batch, a known quirk). Anchors crossing the
  image border are kept (§4.5.1);
* box deltas use weights (1, 1, 1, 1) and are decoded with Detectron's
  ``log(1000/16)`` clip; boxes whose clipped height or width is ``<= min_size`` (default 0:
  empty boxes, e.g. entirely outside the image) are dropped.

NMS backends (``nms_method``): ``"combined"`` uses ``tf.image.combined_non_max_suppression``
with the level as the "class" (fast C++ kernel; ~15x faster than the padded op for a
batch of 16 on this 2-core CPU; not XLA-compilable), ``"padded"`` uses
``tf.image.non_max_suppression_padded`` on level-offset boxes (batched, XLA-compilable).
"""
import keras
import tensorflow as tf

from kerasdet import boxes as box_ops
from kerasdet import losses as loss_ops
from kerasdet.sampling import sample_balanced

NMS_METHODS = ("combined", "padded")


@keras.saving.register_keras_serializable(package="kerasdet")
class RPNHead(keras.layers.Layer):
    """Shared RPN head: ``3x3 conv(channels) + ReLU -> {1x1 conv(A), 1x1 conv(4A)}``.

    Called on a list of maps (finest first) it returns ``(objectness, deltas)``: lists of
    ``[B, H_l * W_l * A]`` logits and ``[B, H_l * W_l * A, 4]`` deltas in the anchor order
    of :class:`kerasdet.anchors.AnchorGenerator`.

    Args:
        num_anchors: A per location. Default 3 (3 ratios, one size per level).
        channels: width of the 3x3 conv. Default 256.
    """

    def __init__(self, *, num_anchors=3, channels=256, **kwargs):
        super().__init__(**kwargs)
        self.num_anchors = int(num_anchors)
        self.channels = int(channels)
        init = keras.initializers.RandomNormal(stddev=0.01)
        self.conv = keras.layers.Conv2D(
            self.channels, 3, padding="same", activation="relu", kernel_initializer=init,
            dtype=self.dtype_policy, name="conv",
        )
        self.objectness = keras.layers.Conv2D(
            self.num_anchors, 1, kernel_initializer=init, dtype=self.dtype_policy, name="objectness"
        )
        self.deltas = keras.layers.Conv2D(
            4 * self.num_anchors, 1, kernel_initializer=init, dtype=self.dtype_policy, name="deltas"
        )

    def build(self, input_shape):
        shape = tuple(input_shape[0]) if isinstance(input_shape, (list, tuple)) and isinstance(
            input_shape[0], (list, tuple)) else tuple(input_shape)
        self.conv.build(shape)
        inner = shape[:-1] + (self.channels,)
        self.objectness.build(inner)
        self.deltas.build(inner)
        self.built = True

    def call(self, features):
        if not isinstance(features, (list, tuple)):
            features = [features]
        logits, deltas = [], []
        for f in features:
            x = self.conv(f)
            batch = tf.shape(x)[0]
            logits.append(tf.reshape(self.objectness(x), [batch, -1]))
            deltas.append(tf.reshape(self.deltas(x), [batch, -1, 4]))
        return logits, deltas

    def get_config(self):
        config = super().get_config()
        config.update({"num_anchors": self.num_anchors, "channels": self.channels})
        return config


def rpn_targets(
    anchors, gt_boxes, gt_classes, *, matcher, gt_crowd=None, num_samples=256, positive_fraction=0.5,
    box_weights=(1.0, 1.0, 1.0, 1.0), seed=None,
):
    """RPN training targets for all anchors of a padded ground-truth batch.

    Args:
        anchors: ``[A, 4]`` (all levels concatenated).
        gt_boxes, gt_classes: ``[B, N, 4]`` / ``[B, N]`` (-1 padding).
        matcher: an :class:`~kerasdet.matching.ArgMaxMatcher` (0.7 / 0.3, low-quality on).
        gt_crowd: optional ``[B, N]`` bool: crowds are not objects; anchors inside them are
            ignored rather than negatives.
        num_samples, positive_fraction: anchors per image and the positive quota (256, 0.5).

    Returns:
        ``(labels [B, A] int32, box_targets [B, A, 4])``: labels 1 for sampled positives,
        0 for sampled negatives, -1 for anchors not in the mini-batch. Wrapped in
        ``stop_gradient``.
    """
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_classes = tf.cast(gt_classes, tf.int32)
    valid = gt_classes >= 0
    crowd = None
    if gt_crowd is not None:
        crowd = tf.cast(gt_crowd, tf.bool) & valid
        valid = valid & ~crowd
    matched, match_labels = matcher(anchors, gt_boxes, valid, crowd)
    pos, neg = sample_balanced(
        match_labels == 1, match_labels == 0, num_samples=num_samples, positive_fraction=positive_fraction, seed=seed
    )
    labels = tf.where(pos, 1, tf.where(neg, 0, -1))
    matched_boxes = tf.gather(gt_boxes, matched, batch_dims=1) if gt_boxes.shape[1] != 0 else tf.zeros(
        tf.concat([tf.shape(labels), [4]], 0))
    targets = box_ops.encode(matched_boxes, tf.cast(anchors, tf.float32)[None], weights=box_weights)
    targets = tf.where(pos[..., None], targets, 0.0)
    return tf.stop_gradient(labels), tf.stop_gradient(targets)


def rpn_losses(
    logits, deltas, anchors, gt_boxes, gt_classes, *, matcher, gt_crowd=None, num_samples=256,
    positive_fraction=0.5, smooth_l1_beta=1.0 / 9.0, seed=None,
):
    """The two RPN loss terms of every two-stage model (Faster R-CNN, R-FCN, CoupleNet).

    Sigmoid cross-entropy over the sampled anchors and smooth-L1 on the positives' deltas,
    both divided by the number of sampled anchors summed over replicas (Detectron2's
    normalization; :func:`kerasdet.losses.global_normalizer`).

    Args:
        logits: ``[B, A]`` objectness logits; deltas: ``[B, A, 4]`` (all levels concatenated).
        anchors: ``[A, 4]``. gt_boxes, gt_classes, gt_crowd, matcher, num_samples,
            positive_fraction: as in :func:`rpn_targets`.
        smooth_l1_beta: Default 1/9 (Detectron; sigma 3 in the Caffe codes).
        seed: the anchor sampling's seed generator (see :func:`kerasdet.sampling.random_uniform`).

    Returns:
        ``(rpn_cls_loss, rpn_box_loss)`` float32 scalars.
    """
    logits = tf.cast(logits, tf.float32)
    deltas = tf.cast(deltas, tf.float32)
    labels, box_targets = rpn_targets(
        anchors, gt_boxes, gt_classes, matcher=matcher, gt_crowd=gt_crowd, num_samples=num_samples,
        positive_fraction=positive_fraction, seed=seed,
    )
    sampled = tf.cast(labels >= 0, tf.float32)
    positive = tf.cast(labels == 1, tf.float32)
    norm = loss_ops.global_normalizer(tf.reduce_sum(sampled))
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=positive, logits=logits)
    cls_loss = tf.reduce_sum(bce * sampled) / norm
    box = loss_ops.smooth_l1_loss(box_targets, deltas, beta=smooth_l1_beta)
    box_loss = tf.reduce_sum(tf.reduce_sum(box, axis=-1) * positive) / norm
    return cls_loss, box_loss


@keras.saving.register_keras_serializable(package="kerasdet")
class ProposalGenerator(keras.layers.Layer):
    """RPN outputs -> fixed-size padded proposals (see the module docstring).

    Call with ``(objectness, deltas, anchors, image_shape=(h, w), training=...)``: lists
    (finest first) of ``[B, N_l]`` logits, ``[B, N_l, 4]`` deltas and ``[N_l, 4]`` anchors.
    Inputs are wrapped in ``stop_gradient`` (approximate joint training: no gradient
    through the proposal coordinates). Returns ``(boxes [B, K, 4], scores [B, K],
    valid [B, K] bool)`` with ``K = post_nms_topk`` of the mode; padding rows have zero
    boxes, score 0 and ``valid == False``. Scores are objectness probabilities.

    Args:
        pre_nms_topk_train, post_nms_topk_train: Default 2000 / 2000 (FPN §4.4.2).
        pre_nms_topk_test, post_nms_topk_test: Default 1000 / 1000.
        nms_iou_threshold: Default 0.7.
        min_size: drop boxes with height or width ``<= min_size`` px. Default 0.
        box_weights: Default (1, 1, 1, 1).
        nms_method: ``"combined"`` (default) or ``"padded"``.
    """

    def __init__(
        self,
        *,
        pre_nms_topk_train=2000,
        post_nms_topk_train=2000,
        pre_nms_topk_test=1000,
        post_nms_topk_test=1000,
        nms_iou_threshold=0.7,
        min_size=0.0,
        box_weights=(1.0, 1.0, 1.0, 1.0),
        nms_method="combined",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if nms_method not in NMS_METHODS:
            raise ValueError(f"nms_method must be one of {NMS_METHODS}, got {nms_method!r}.")
        self.pre_nms_topk_train = int(pre_nms_topk_train)
        self.post_nms_topk_train = int(post_nms_topk_train)
        self.pre_nms_topk_test = int(pre_nms_topk_test)
        self.post_nms_topk_test = int(post_nms_topk_test)
        self.nms_iou_threshold = float(nms_iou_threshold)
        self.min_size = float(min_size)
        self.box_weights = tuple(float(w) for w in box_weights)
        self.nms_method = nms_method

    def call(self, objectness, deltas, anchors, *, image_shape, training=False, nms_method=None):
        pre = self.pre_nms_topk_train if training else self.pre_nms_topk_test
        post = self.post_nms_topk_train if training else self.post_nms_topk_test
        method = nms_method or self.nms_method
        boxes, scores, level_ids = [], [], []
        for lvl, (logit, delta, anchor) in enumerate(zip(objectness, deltas, anchors)):
            logit = tf.stop_gradient(tf.cast(logit, tf.float32))
            delta = tf.stop_gradient(tf.cast(delta, tf.float32))
            n = logit.shape[1]
            k = min(pre, n) if n is not None else tf.minimum(pre, tf.shape(logit)[1])
            top, index = tf.math.top_k(logit, k=k, sorted=False)
            decoded = box_ops.decode(
                tf.gather(delta, index, batch_dims=1), tf.gather(anchor, index), weights=self.box_weights
            )
            boxes.append(box_ops.clip(decoded, image_shape[0], image_shape[1]))
            scores.append(top)
            level_ids.append(tf.fill(tf.shape(top), lvl))
        boxes = tf.concat(boxes, axis=1)
        logits = tf.concat(scores, axis=1)
        levels = tf.concat(level_ids, axis=1)
        keep = ((boxes[..., 2] - boxes[..., 0]) > self.min_size) & ((boxes[..., 3] - boxes[..., 1]) > self.min_size)
        # probabilities floored at 1e-7 so every kept box stays above the 0 threshold
        probs = tf.where(keep, tf.maximum(tf.sigmoid(logits), 1e-7), 0.0)
        num_levels = len(objectness)
        if method == "combined":
            per_level = tf.one_hot(levels, num_levels, dtype=tf.float32) * probs[..., None]
            out_boxes, out_scores, _, valid = tf.image.combined_non_max_suppression(
                boxes[:, :, None, :], per_level, max_output_size_per_class=post, max_total_size=post,
                iou_threshold=self.nms_iou_threshold, score_threshold=1e-8, clip_boxes=False,
            )
        else:
            extent = tf.cast(tf.maximum(image_shape[0], image_shape[1]), tf.float32) + 1.0
            offset = tf.cast(levels, tf.float32)[..., None] * extent
            index, valid = tf.image.non_max_suppression_padded(
                boxes + offset, probs, max_output_size=post, iou_threshold=self.nms_iou_threshold,
                score_threshold=1e-8, pad_to_max_output_size=True,
            )
            out_boxes = tf.gather(boxes, index, batch_dims=1)
            out_scores = tf.gather(probs, index, batch_dims=1)
        mask = tf.range(post)[None, :] < tf.cast(valid, tf.int32)[:, None]
        out_boxes = tf.where(mask[..., None], out_boxes, 0.0)
        out_scores = tf.where(mask, out_scores, 0.0)
        return tf.stop_gradient(out_boxes), tf.stop_gradient(out_scores), mask

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "pre_nms_topk_train": self.pre_nms_topk_train,
                "post_nms_topk_train": self.post_nms_topk_train,
                "pre_nms_topk_test": self.pre_nms_topk_test,
                "post_nms_topk_test": self.post_nms_topk_test,
                "nms_iou_threshold": self.nms_iou_threshold,
                "min_size": self.min_size,
                "box_weights": list(self.box_weights),
                "nms_method": self.nms_method,
            }
        )
        return config
