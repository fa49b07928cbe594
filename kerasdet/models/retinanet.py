"""RetinaNet: ResNet-FPN backbone, focal loss, shared class/box subnets (thesis ch. 5)."""
import keras
import tensorflow as tf

from kerasdet import losses as loss_ops
from kerasdet.anchors import AnchorGenerator
from kerasdet import boxes as box_ops
from kerasdet.layers.anchor_head import AnchorHead
from kerasdet.layers.fpn import FeaturePyramid
from kerasdet.layers.postprocess import DetectionPostProcessor, resolve_nms_method
from kerasdet.matching import ArgMaxMatcher, match_labels as match_ground_truth
from kerasdet.models.base import Detector


@keras.saving.register_keras_serializable(package="kerasdet")
class RetinaNet(Detector):
    """One-stage detector of thesis §5.4.

    Input: float images ``[B, H, W, 3]``, RGB, 0..255 (the backbone normalizes inside).
    Training targets: ``{"boxes": [B, N, 4] (``bounding_box_format``), "classes": [B, N] int32
    (-1 padding), optional "is_crowd": [B, N] bool}``. ``predict`` returns decoded,
    NMS-filtered detections ``{"boxes", "scores", "classes", "num_detections"}``.

    Loss (§5.4.2): sigmoid focal loss (alpha 0.25, gamma 2) summed over all non-ignored
    anchors and classes, plus smooth-L1 (beta 0.11) on the positives' box deltas, both
    divided by ``max(1, number of positive anchors in the global batch)`` (our choice:
    the thesis normalizes per image, §5.4.2; a batch-global normalizer is what Detectron does and is
    the form that stays exact under ``tf.distribute``).

    All arguments are keyword-only:
        backbone: a ``keras.Model`` mapping images to a dict with ``"C{l}"`` features for
            ``min_level <= l <= min(max_level, backbone_max_level)`` (see
            :mod:`kerasdet.backbones`). Required.
        num_classes: K. Required.
        min_level, max_level: pyramid levels (P3..P7 by default).
        backbone_max_level: coarsest backbone level used by the FPN. Default 5.
        fpn_channels: d. Default 256.
        extra_levels: FPN mode for levels above C5, default ``"conv_c5"`` (RetinaNet).
        head_convs, head_channels: subnet depth/width. Default 4 x 256.
        anchor_size, scales, aspect_ratios: see :class:`~kerasdet.anchors.AnchorGenerator`.
        anchor_center_offset, anchor_round_to_pixels: the generator's ``center_offset``
            (default 0.5) and ``round_to_pixels`` (default False); 0.0 / True is the anchor
            grid of torchvision and keras-hub (see :mod:`kerasdet.weights`).
        box_weights: box coder weights. Default (1, 1, 1, 1).
        positive_threshold, negative_threshold, allow_low_quality_matches: matcher. Default
            0.5 / 0.4 / True.
        focal_alpha, focal_gamma: Default 0.25 / 2.0.
        smooth_l1_beta: Default 0.11 (Detectron; the thesis gives none).
        box_loss_weight: Default 1.0.
        prior_probability: class bias prior. Default 0.01.
        pre_nms_topk, score_threshold, nms_iou_threshold, max_detections: inference
            (1000 / 0.05 / 0.5 / 100).
        nms_method: ``"auto"`` (default: ``"padded"`` when the predict function is
            XLA-compiled, else ``"combined"``), ``"combined"`` or ``"padded"``.
        weight_decay: coupled L2 on kernels. Default 1e-4.
        bounding_box_format: format of the label boxes given to ``fit``/``evaluate`` and of
            the boxes ``predict`` returns. Default ``"yxyx"`` (network-input pixels); see
            :class:`~kerasdet.models.base.Detector`.
    """

    LOSS_NAMES = ("cls_loss", "box_loss")

    def __init__(
        self,
        *,
        backbone,
        num_classes,
        min_level=3,
        max_level=7,
        backbone_max_level=5,
        fpn_channels=256,
        extra_levels="conv_c5",
        head_convs=4,
        head_channels=256,
        anchor_size=4.0,
        scales=(1.0, 2.0 ** (1.0 / 3.0), 2.0 ** (2.0 / 3.0)),
        aspect_ratios=(0.5, 1.0, 2.0),
        anchor_center_offset=0.5,
        anchor_round_to_pixels=False,
        box_weights=(1.0, 1.0, 1.0, 1.0),
        positive_threshold=0.5,
        negative_threshold=0.4,
        allow_low_quality_matches=True,
        focal_alpha=0.25,
        focal_gamma=2.0,
        smooth_l1_beta=0.11,
        box_loss_weight=1.0,
        prior_probability=0.01,
        pre_nms_topk=1000,
        score_threshold=0.05,
        nms_iou_threshold=0.5,
        max_detections=100,
        nms_method="auto",
        weight_decay=1e-4,
        **kwargs,
    ):
        super().__init__(weight_decay=weight_decay, **kwargs)
        if isinstance(backbone, dict):
            backbone = keras.saving.deserialize_keras_object(backbone)
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.min_level = int(min_level)
        self.max_level = int(max_level)
        self.backbone_max_level = int(backbone_max_level)
        self.box_weights = tuple(float(w) for w in box_weights)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.box_loss_weight = float(box_loss_weight)
        resolve_nms_method(nms_method)  # validates
        self.nms_method = nms_method
        self.anchor_generator = AnchorGenerator(
            min_level=min_level,
            max_level=max_level,
            anchor_size=anchor_size,
            scales=scales,
            aspect_ratios=aspect_ratios,
            center_offset=anchor_center_offset,
            round_to_pixels=anchor_round_to_pixels,
        )
        self.matcher = ArgMaxMatcher(
            positive_threshold=positive_threshold,
            negative_threshold=negative_threshold,
            allow_low_quality_matches=allow_low_quality_matches,
        )
        self.fpn = FeaturePyramid(
            min_level=min_level,
            max_level=max_level,
            backbone_max_level=backbone_max_level,
            num_channels=fpn_channels,
            extra_levels=extra_levels,
            name="fpn",
        )
        self.head = AnchorHead(
            num_classes=num_classes,
            num_anchors=self.anchor_generator.num_anchors_per_location,
            num_convs=head_convs,
            filters=head_channels,
            prior_probability=prior_probability,
            name="head",
        )
        postprocess_args = dict(
            pre_nms_topk=pre_nms_topk,
            score_threshold=score_threshold,
            nms_iou_threshold=nms_iou_threshold,
            max_detections=max_detections,
            box_weights=self.box_weights,
        )
        self.postprocess = DetectionPostProcessor(nms_method="combined", name="postprocess", **postprocess_args)
        self.postprocess_xla = DetectionPostProcessor(nms_method="padded", name="postprocess_xla", **postprocess_args)
        self._config = dict(
            num_classes=self.num_classes,
            min_level=min_level,
            max_level=max_level,
            backbone_max_level=backbone_max_level,
            fpn_channels=fpn_channels,
            extra_levels=extra_levels,
            head_convs=head_convs,
            head_channels=head_channels,
            anchor_size=anchor_size,
            scales=list(scales),
            aspect_ratios=list(aspect_ratios),
            anchor_center_offset=float(anchor_center_offset),
            anchor_round_to_pixels=bool(anchor_round_to_pixels),
            box_weights=list(self.box_weights),
            positive_threshold=positive_threshold,
            negative_threshold=negative_threshold,
            allow_low_quality_matches=allow_low_quality_matches,
            focal_alpha=focal_alpha,
            focal_gamma=focal_gamma,
            smooth_l1_beta=smooth_l1_beta,
            box_loss_weight=box_loss_weight,
            prior_probability=prior_probability,
            pre_nms_topk=pre_nms_topk,
            score_threshold=score_threshold,
            nms_iou_threshold=nms_iou_threshold,
            max_detections=max_detections,
            nms_method=nms_method,
        )

    # --- forward ------------------------------------------------------------------------
    def build(self, input_shape=None):
        """Creates every weight by running one small forward pass (eagerly).

        Called by Keras on first use; call it (or the model) once inside the strategy scope
        before ``fit`` under ``MultiWorkerMirroredStrategy``.
        """
        if self.built:
            return
        size = 2**self.max_level
        self.forward(tf.zeros((1, size, size, 3), tf.float32))
        self.built = True

    def features(self, images, training=False):
        """Pyramid features ``[P_min, ..., P_max]`` (finest first)."""
        c_feats = self.backbone(images, training=training)
        p_feats = self.fpn(c_feats, training=training)
        return [p_feats[f"P{lvl}"] for lvl in range(self.min_level, self.max_level + 1)]

    def forward(self, images, training=False):
        """Per-level ``(class_logits, box_deltas, anchors)`` lists for a batch of images."""
        feats = self.features(images, training=training)
        class_logits, box_deltas = self.head(feats, training=training)
        shapes = [(tf.shape(f)[1], tf.shape(f)[2]) for f in feats]
        anchors = [
            self.anchor_generator.level_anchors(lvl, h, w)
            for lvl, (h, w) in zip(self.anchor_generator.levels, shapes)
        ]
        return class_logits, box_deltas, anchors

    def call(self, images, training=False):
        class_logits, box_deltas, _ = self.forward(images, training=training)
        return {
            "class_logits": tf.concat(class_logits, axis=1),
            "box_deltas": tf.concat(box_deltas, axis=1),
        }

    # --- targets and loss ---------------------------------------------------------------
    def compute_targets(self, anchors, labels):
        """Anchor targets for a padded ground-truth batch.

        Returns ``(class_targets [B, A] int32 (-1 ignore, 0..K-1 positive class, K
        background), box_targets [B, A, 4], labels [B, A])``.
        """
        matched_boxes, matched_classes, match_labels = match_ground_truth(self.matcher, anchors, labels)
        box_targets = box_ops.encode(matched_boxes, anchors[None], weights=self.box_weights)
        class_targets = tf.where(
            match_labels == 1, matched_classes, tf.where(match_labels == 0, self.num_classes, -1)
        )
        return class_targets, box_targets, match_labels

    def detection_losses(self, images, labels, training):
        class_logits, box_deltas, anchors = self.forward(images, training=training)
        class_logits = tf.cast(tf.concat(class_logits, axis=1), tf.float32)
        box_deltas = tf.cast(tf.concat(box_deltas, axis=1), tf.float32)
        anchors = tf.concat(anchors, axis=0)
        return self.losses_from_outputs(class_logits, box_deltas, anchors, labels)

    def losses_from_outputs(self, class_logits, box_deltas, anchors, labels):
        """Focal + smooth-L1 losses from concatenated outputs (globally normalized)."""
        class_targets, box_targets, match_labels = self.compute_targets(anchors, labels)
        positive = match_labels == 1
        not_ignored = tf.cast(match_labels >= 0, tf.float32)
        num_pos = loss_ops.global_normalizer(tf.reduce_sum(tf.cast(positive, tf.float32)))
        one_hot = tf.one_hot(class_targets, self.num_classes, dtype=tf.float32)  # K and -1 -> zeros
        focal = loss_ops.sigmoid_focal_loss(one_hot, class_logits, alpha=self.focal_alpha, gamma=self.focal_gamma)
        cls_loss = tf.reduce_sum(focal * not_ignored[..., None]) / num_pos
        box = loss_ops.smooth_l1_loss(box_targets, box_deltas, beta=self.smooth_l1_beta)
        box_loss = tf.reduce_sum(tf.reduce_sum(box, axis=-1) * tf.cast(positive, tf.float32)) / num_pos
        return {"cls_loss": cls_loss, "box_loss": self.box_loss_weight * box_loss}

    # --- inference ----------------------------------------------------------------------
    def _postprocessor(self):
        return self.postprocess_xla if resolve_nms_method(self.nms_method, self.jit_compile) == "padded" else (
            self.postprocess)

    def detect(self, images, postprocessor=None):
        """Decoded, NMS-filtered detections in network-input pixels."""
        images = tf.cast(images, tf.float32)
        class_logits, box_deltas, anchors = self.forward(images, training=False)
        shape = tf.shape(images)
        post = postprocessor or self._postprocessor()
        return post(class_logits, box_deltas, anchors, image_shape=(shape[1], shape[2]))
