"""The Region Proposal Network as one part: head, anchors, proposals and its loss.

Ren et al., "Faster R-CNN: Towards Real-Time Object Detection with Region Proposal
Networks" (NeurIPS 2015), §3.1: a small network slides over a shared feature map (a 3x3
conv, then two sibling 1x1 convs, the box-classification and box-regression layers, for
the ``k`` anchors of each location), anchors of several scales and aspect ratios at each
location (§3.1.1), a binary classification + smooth-L1 regression loss (§3.1.2: positive
at IoU > 0.7 or the best anchor of a ground truth, negative below 0.3 for every ground
truth) over 256 anchors sampled per image with up to half positive (§3.1.3), and NMS at
0.7 on the proposals (§3.3). The classification layer gives ``k`` sigmoid logits instead
of the paper's ``2k`` softmax scores (the same binary decision; see
:mod:`kerasdet.layers.rpn`).

On a feature pyramid (Lin's thesis, the FPN chapter §4.4, "Feature Pyramid Networks for
RPN" §4.4.1) the same head runs on every level P2..P6 ("parameters are shared across all
feature pyramid levels") with one anchor size per level (32² .. 512², 3 ratios), so the
multi-scale anchors of §3.1.1 become one scale per level. A single-map RPN (Faster R-CNN
C4, R-FCN, CoupleNet) is the one-level case ``min_level == max_level``.

:class:`RegionProposalNetwork` composes the pieces of :mod:`kerasdet.layers.rpn`
(:class:`~kerasdet.layers.rpn.RPNHead`, :class:`~kerasdet.layers.rpn.ProposalGenerator`,
:func:`~kerasdet.layers.rpn.rpn_losses`) with a :class:`kerasdet.anchors.AnchorGenerator`
and the anchor :class:`~kerasdet.matching.ArgMaxMatcher`, so a two-stage detector takes it
as one part (as TF Model Garden's and detectron2's two-stage models take their RPN).
Calling the layer gives the proposals; the steps are public methods for the detectors
that need the intermediate outputs (the RPN loss needs the objectness and deltas of every
anchor, SMN reads the head's 3x3 conv features).
"""
import keras
import tensorflow as tf

from kerasdet.anchors import AnchorGenerator
from kerasdet.layers.rpn import NMS_METHODS, ProposalGenerator, RPNHead, rpn_losses
from kerasdet.matching import ArgMaxMatcher


def _as_list(features):
    return list(features) if isinstance(features, (list, tuple)) else [features]


@keras.saving.register_keras_serializable(package="kerasdet")
class RegionProposalNetwork(keras.layers.Layer):
    """RPN head + anchors + proposal generation + RPN loss (see the module docstring).

    Call with ``(features, image_shape=(h, w), training=False, nms_method=None)``:
    ``features`` is a list of maps (finest first) for levels ``min_level..max_level``, or
    one map when ``min_level == max_level``. Returns ``(boxes [B, K, 4], scores [B, K],
    valid [B, K])`` of :class:`~kerasdet.layers.rpn.ProposalGenerator` (yxyx network-input
    pixels, ``K`` the mode's ``post_nms_topk``).

    Args:
        min_level, max_level: levels of the maps (stride ``2**level``). Default 2 / 6 (FPN
            P2..P6); one level for a single map (e.g. 4 / 4 for C4).
        anchor_size, scales, aspect_ratios: anchors of ``anchor_size * stride * scale`` px,
            ratios ``height / width``. Default 8, ``(1,)``, ``(0.5, 1, 2)``: 32 px on P2 ..
            512 px on P6.
        channels: width of the head's 3x3 conv. Default 256.
        positive_threshold, negative_threshold: anchor IoU thresholds. Default 0.7 / 0.3.
        batch_size, positive_fraction: sampled anchors per image and the positive quota.
            Default 256 / 0.5.
        pre_nms_topk_train, post_nms_topk_train: Default 2000 / 2000 (per level / per image).
        pre_nms_topk_test, post_nms_topk_test: Default 1000 / 1000.
        nms_iou_threshold: Default 0.7.
        min_size: proposals with a side ``<= min_size`` px are dropped. Default 0.
        smooth_l1_beta: of the box loss. Default 1/9 (Detectron; sigma 3 in the Caffe codes).
        nms_method: the proposal NMS when the caller passes none: ``"combined"`` (default)
            or ``"padded"`` (XLA-compilable); the detectors pass ``"padded"`` under
            ``jit_compile`` (:func:`kerasdet.layers.postprocess.resolve_nms_method`).
    """

    def __init__(
        self,
        *,
        min_level=2,
        max_level=6,
        anchor_size=8.0,
        scales=(1.0,),
        aspect_ratios=(0.5, 1.0, 2.0),
        channels=256,
        positive_threshold=0.7,
        negative_threshold=0.3,
        batch_size=256,
        positive_fraction=0.5,
        pre_nms_topk_train=2000,
        post_nms_topk_train=2000,
        pre_nms_topk_test=1000,
        post_nms_topk_test=1000,
        nms_iou_threshold=0.7,
        min_size=0.0,
        smooth_l1_beta=1.0 / 9.0,
        nms_method="combined",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if nms_method not in NMS_METHODS:
            raise ValueError(f"nms_method must be one of {NMS_METHODS}, got {nms_method!r}.")
        self.anchor_generator = AnchorGenerator(min_level=min_level, max_level=max_level, anchor_size=anchor_size,
                                                scales=scales, aspect_ratios=aspect_ratios)
        self.positive_threshold = float(positive_threshold)
        self.negative_threshold = float(negative_threshold)
        self.matcher = ArgMaxMatcher(positive_threshold=self.positive_threshold,
                                     negative_threshold=self.negative_threshold, allow_low_quality_matches=True)
        self.batch_size = int(batch_size)
        self.positive_fraction = float(positive_fraction)
        self.smooth_l1_beta = float(smooth_l1_beta)
        # Sub-layer names are those the detectors gave them before this layer existed
        # (variable paths ``<model>/rpn_head/...`` are unchanged).
        self.head = RPNHead(num_anchors=self.anchor_generator.num_anchors_per_location, channels=channels,
                            name="rpn_head")
        self.proposal_generator = ProposalGenerator(
            pre_nms_topk_train=pre_nms_topk_train, post_nms_topk_train=post_nms_topk_train,
            pre_nms_topk_test=pre_nms_topk_test, post_nms_topk_test=post_nms_topk_test,
            nms_iou_threshold=nms_iou_threshold, min_size=min_size, nms_method=nms_method, name="proposals",
        )

    # --- properties ---------------------------------------------------------------------
    @property
    def min_level(self):
        return self.anchor_generator.min_level

    @property
    def max_level(self):
        return self.anchor_generator.max_level

    @property
    def levels(self):
        return self.anchor_generator.levels

    @property
    def num_anchors(self):
        """Anchors per location (``len(scales) * len(aspect_ratios)``)."""
        return self.anchor_generator.num_anchors_per_location

    def build(self, input_shape):
        """Builds the head for maps of ``input_shape`` (one shape or a list of them)."""
        shapes = input_shape if isinstance(input_shape, (list, tuple)) and isinstance(
            input_shape[0], (list, tuple)) else [input_shape]
        if not self.head.built:
            self.head.build(tuple(shapes[0]))
        self.built = True

    # --- steps --------------------------------------------------------------------------
    def outputs(self, features):
        """``(objectness, deltas, anchors)``: lists (one entry per level, finest first) of
        ``[B, H_l * W_l * A]`` logits, ``[B, H_l * W_l * A, 4]`` deltas and ``[H_l * W_l * A, 4]``
        anchors, in the anchor order of :class:`~kerasdet.anchors.AnchorGenerator`."""
        features = _as_list(features)
        if len(features) != len(self.levels):
            raise ValueError(f"RegionProposalNetwork of levels {self.levels} called on {len(features)} maps.")
        logits, deltas = self.head(features)
        self.built = True  # its only weights are the head's, built now (the models call the steps, not the layer)
        anchors = [self.anchor_generator.level_anchors(lvl, tf.shape(f)[1], tf.shape(f)[2])
                   for lvl, f in zip(self.levels, features)]
        return logits, deltas, anchors

    def conv_features(self, feature):
        """The head's shared 3x3 conv + ReLU output on one map ``[B, H, W, C]``
        (``[B, H, W, channels]``; read by SMN's memory RPN residual)."""
        return self.head.conv(feature)

    def proposals(self, objectness, deltas, anchors, *, image_shape, training=False, nms_method=None):
        """:class:`~kerasdet.layers.rpn.ProposalGenerator` of :meth:`outputs`' lists:
        ``(boxes [B, K, 4], scores [B, K], valid [B, K])`` (stop-gradient). ``nms_method``
        ``None``: the layer's own."""
        return self.proposal_generator(_as_list(objectness), _as_list(deltas), _as_list(anchors),
                                       image_shape=image_shape, training=training, nms_method=nms_method)

    def loss_terms(self, objectness, deltas, anchors, gt_boxes, gt_classes, *, gt_crowd=None, seed=None):
        """``(rpn_cls_loss, rpn_box_loss)`` of :meth:`outputs`' lists against a padded
        ground-truth batch (``gt_boxes [B, N, 4]`` yxyx px, ``gt_classes [B, N]`` with -1
        padding, optional ``gt_crowd [B, N]``): :func:`~kerasdet.layers.rpn.rpn_losses` over
        ``batch_size`` sampled anchors per image, normalized by the sampled anchors summed
        over replicas. ``seed``: the sampling's seed generator (the model's
        ``sampling_seed``)."""
        objectness, deltas, anchors = _as_list(objectness), _as_list(deltas), _as_list(anchors)
        return rpn_losses(
            tf.concat(objectness, axis=1), tf.concat(deltas, axis=1), tf.concat(anchors, axis=0), gt_boxes,
            gt_classes, matcher=self.matcher, gt_crowd=gt_crowd, num_samples=self.batch_size,
            positive_fraction=self.positive_fraction, smooth_l1_beta=self.smooth_l1_beta, seed=seed,
        )

    def call(self, features, *, image_shape, training=False, nms_method=None):
        logits, deltas, anchors = self.outputs(features)
        return self.proposals(logits, deltas, anchors, image_shape=image_shape, training=training,
                              nms_method=nms_method)

    def get_config(self):
        config = super().get_config()
        gen, anchors = self.proposal_generator, self.anchor_generator
        config.update({
            "min_level": anchors.min_level, "max_level": anchors.max_level, "anchor_size": anchors.anchor_size,
            "scales": list(anchors.scales), "aspect_ratios": list(anchors.aspect_ratios),
            "channels": self.head.channels, "positive_threshold": self.positive_threshold,
            "negative_threshold": self.negative_threshold, "batch_size": self.batch_size,
            "positive_fraction": self.positive_fraction, "pre_nms_topk_train": gen.pre_nms_topk_train,
            "post_nms_topk_train": gen.post_nms_topk_train, "pre_nms_topk_test": gen.pre_nms_topk_test,
            "post_nms_topk_test": gen.post_nms_topk_test, "nms_iou_threshold": gen.nms_iou_threshold,
            "min_size": gen.min_size, "smooth_l1_beta": self.smooth_l1_beta, "nms_method": gen.nms_method,
        })
        return config
