"""SSD and ASSD (Yi, Wu & Metaxas 2019, "ASSD: Attentive Single Shot Multibox Detector").

One class, :class:`SSD`; ASSD is ``SSD(attention=True, fusion=True)`` (§3, Fig. 2):

* sources: the backbone taps (``C3, C4, C5`` of a ResNet: conv3_x..conv5_x) then the extra
  blocks conv6..conv9 (each ``1x1 conv -> BN -> ReLU -> 3x3 conv (stride 2 or valid) ->
  BN -> ReLU``, with biases, as the authors' code);
* ``fusion=True``: :class:`~kerasdet.layers.fusion.SemanticFusion` of the first source with
  the next two, upsampled (C3 with C4 and C5 on ResNet; conv4_3 with fc7 and conv8_2 on
  VGG), replaces the first *source* (the network keeps running from the raw maps);
* ``attention=True``: one :class:`~kerasdet.layers.attention.SelfAttention` per source
  (weights not shared), between the source and its head;
* heads: per source a 3x3 conv to ``A * (K + 1)`` softmax logits (background at index 0)
  and a 3x3 conv to ``A * 4`` offsets; no BN/ReLU in heads or attention (authors' code);
* default boxes: :class:`~kerasdet.anchors.SSDAnchorGenerator`;
* matching: IoU >= 0.5 positive, everything else background, and each ground truth's best
  box positive (:class:`~kerasdet.matching.ArgMaxMatcher` with ``allow_low_quality_matches``;
  where the SSD code would re-point a box that is some object's best match to that object,
  the shared matcher keeps the box's own arg-max object — they differ only for a box that
  is the best match of one object and overlaps another more, rare and documented);
* box coding: the shared R-CNN coder with SSD's variances (0.1, 0.2) as weights (10, 10, 5, 5);
* loss: :func:`~kerasdet.losses.multibox_loss` (softmax CE on positives and 3:1 mined
  negatives, smooth L1 with beta 1 on positives), both divided by the positives of the
  global batch (strategy-safe);
* inference: softmax, score >= 0.01, per-class NMS 0.45, ``max_detections`` per image
  (200 for VOC, 100 for COCO: the paper gives no cap; our choice), through the
  shared :class:`~kerasdet.layers.postprocess.DetectionPostProcessor` (its per-source
  ``pre_nms_topk`` candidate cut replaces the authors' top-200-per-class pre-NMS cut).

VGG16 variants (ASSD300 / ASSD512, which the paper names in Tables 2 and 4 but never
describes; our choice): SSD300/512's VGG16 layout -- conv4_3 (L2-normalized, scale 20) and fc7
(pool5 3x3/s1, dilated fc6, fc7) as the first two sources, SSD's extras -- plus one
attention unit on every source AND the fusion of conv4_3 with fc7 and conv8_2. Fusion on
VGG is our reading of the paper's parameter counts (Table 2), which settle it: SSD300 + attention is
28.50M and + fusion (920,320) 29.42M = the paper's "ASSD300 29.4M"; likewise ASSD512
29.26M + 0.92M = 30.18M = "30.2M" (pinned by tests). L2Norm is applied to conv4_3 before
it enters the fusion. Use a 304 input for SSD300's 38/19/10/5/3/1 maps (Keras' VGG
pooling floors where Caffe's rounds up).

Where we chose: input images are resized by the kerasdet pipeline (aspect kept, padded),
not squashed to a square as SSD does — identical for square inputs.
"""
import keras
import tensorflow as tf

from kerasdet import boxes as box_ops
from kerasdet import losses as loss_ops
from kerasdet.anchors import SSDAnchorGenerator
from kerasdet.layers.attention import SelfAttention
from kerasdet.layers.fusion import SemanticFusion
from kerasdet.layers.l2norm import L2Normalization
from kerasdet.layers.postprocess import DetectionPostProcessor
from kerasdet.matching import ArgMaxMatcher, match_labels as match_ground_truth
from kerasdet.models.base import Detector

#: ASSD513's extra blocks conv6..conv9: ``(1x1 channels, 3x3 channels, stride, padding)``.
ASSD513_EXTRAS = ((512, 1024, 2, "same"), (256, 512, 2, "same"), (128, 256, 2, "same"), (128, 256, 1, "valid"))
#: ASSD321's: conv9 is a stride-2 'same' conv (a valid 3x3 on conv8's 2x2 map is impossible;
#: our choice, the paper gives no ASSD321 geometry), giving maps 41/21/11/6/3/2/1 and
#: 10,386 boxes (Table 2 prints 10,325, which no layout of 4 or 6 boxes per cell gives).
ASSD321_EXTRAS = ((512, 1024, 2, "same"), (256, 512, 2, "same"), (128, 256, 2, "same"), (128, 256, 2, "same"))
#: SSD300's VGG extras conv8..conv11 after fc7 (19 -> 10 -> 5 -> 3 -> 1 at a 304 input).
SSD300_VGG_EXTRAS = ((256, 512, 2, "same"), (128, 256, 2, "same"), (128, 256, 1, "valid"), (128, 256, 1, "valid"))
#: SSD512's VGG extras conv8..conv12 (32 -> 16 -> 8 -> 4 -> 2 -> 1); conv12 is a 3x3 stride-2
#: conv where Caffe used a 4x4 kernel with padding 1 (same map size).
SSD512_VGG_EXTRAS = ((256, 512, 2, "same"), (128, 256, 2, "same"), (128, 256, 2, "same"), (128, 256, 2, "same"),
                     (128, 256, 2, "same"))
#: Default boxes of SSD300 / SSD512 (Liu et al.; fractions of the image).
SSD300_BOXES = dict(min_sizes=(0.1, 0.2, 0.37, 0.54, 0.71, 0.88), max_sizes=(0.2, 0.37, 0.54, 0.71, 0.88, 1.05),
                    aspect_ratios=((2.0,), (2.0, 3.0), (2.0, 3.0), (2.0, 3.0), (2.0,), (2.0,)))
SSD512_BOXES = dict(min_sizes=(0.07, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9), max_sizes=(0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.05),
                    aspect_ratios=((2.0,), (2.0, 3.0), (2.0, 3.0), (2.0, 3.0), (2.0, 3.0), (2.0,), (2.0,)))


def _conv_bn_relu(filters, kernel, stride, padding, name, dtype):
    return [
        keras.layers.Conv2D(filters, kernel, strides=stride, padding=padding, dtype=dtype, name=f"{name}_conv"),
        keras.layers.BatchNormalization(dtype=dtype, name=f"{name}_bn"),
        keras.layers.ReLU(dtype=dtype, name=f"{name}_relu"),
    ]


@keras.saving.register_keras_serializable(package="kerasdet")
class SSD(Detector):
    """SSD / ASSD single-shot detector.

    Input: float RGB images 0..255 ``[B, H, W, 3]`` (normalization inside the backbone).
    Targets: ``{"boxes" [B, N, 4] (``bounding_box_format``), "classes" [B, N] (-1 padding),
    optional "is_crowd"}``. ``predict`` returns ``{"boxes", "scores", "classes", "num_detections"}``.

    All arguments are keyword-only:
        backbone: ``keras.Model`` returning a dict of feature maps. Required.
        num_classes: K object classes (the softmax has K + 1). Required.
        source_levels: backbone outputs used as sources, finest first. Default
            ``("C3", "C4", "C5")`` (ResNet conv3_x..conv5_x).
        extra_layers: extra blocks after the last source, each ``(mid, out, stride,
            padding)``. Default :data:`ASSD513_EXTRAS`.
        fc7_from: VGG variants (ASSD300/512): the backbone output (``"block5_conv3"``) on
            which SSD's pool5 (3x3, stride 1) + fc6 (3x3, dilation 6, 1024) + fc7 (1x1, 1024),
            with ReLUs, are built; fc7 becomes a source after ``source_levels`` and the
            extras continue from it. Default None (ResNet variants).
        l2norm_scale: L2-normalize the first source with a learned per-channel scale
            initialised to this (SSD's conv4_3: 20). Default None (off).
        attention: one self-attention unit per source (ASSD). Default False (SSD).
        attention_block_size: the unit's ``query_block_size`` on the first (largest) source.
            Default None (dense).
        fusion: fuse the first source with the next two (ASSD). Default False.
        fusion_channels: ``SemanticFusion`` reduction width. Default 256.
        fusion_alignment: grid convention of the fusion's upsampling (see
            :mod:`kerasdet.layers.fusion`): ``"auto"`` (default) takes the backbone's,
            ``"same_padding"`` for kerasdet's small backbone (TF ``"same"`` stride-2 convs)
            and ``"corners"`` (the authors' ``align_corners=True``) for the ResNet / VGG
            backbones; or ``"corners"`` / ``"half_pixel"`` / ``"same_padding"`` explicitly.
        min_sizes, max_sizes, aspect_ratios, legacy_steps: see
            :class:`~kerasdet.anchors.SSDAnchorGenerator` (defaults: ASSD513's).
        positive_threshold: matching IoU. Default 0.5.
        negative_ratio: mined negatives per positive. Default 3.0.
        min_negatives: negatives mined in an image without objects. Default 0 (SSD code).
        box_weights: coder weights, ``1 / variances``. Default (10, 10, 5, 5).
        smooth_l1_beta: Default 1.0.
        pre_nms_topk, score_threshold, nms_iou_threshold, max_detections: inference.
            Default 1000 / 0.01 / 0.45 / 200.
        nms_method: ``"combined"`` (default) or ``"padded"`` (XLA-compilable).
        weight_decay: coupled L2 on kernels. Default 5e-4 (the paper).
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
        source_levels=("C3", "C4", "C5"),
        extra_layers=ASSD513_EXTRAS,
        fc7_from=None,
        l2norm_scale=None,
        attention=False,
        attention_block_size=None,
        fusion=False,
        fusion_channels=256,
        fusion_alignment="auto",
        min_sizes=(0.04, 0.10, 0.26, 0.42, 0.58, 0.74, 0.90),
        max_sizes=None,
        aspect_ratios=((2.0,), (2.0, 3.0), (2.0, 3.0), (2.0, 3.0), (2.0, 3.0), (2.0,), (2.0,)),
        legacy_steps=False,
        positive_threshold=0.5,
        negative_ratio=3.0,
        min_negatives=0,
        box_weights=(10.0, 10.0, 5.0, 5.0),
        smooth_l1_beta=1.0,
        pre_nms_topk=1000,
        score_threshold=0.01,
        nms_iou_threshold=0.45,
        max_detections=200,
        nms_method="combined",
        weight_decay=5e-4,
        **kwargs,
    ):
        super().__init__(weight_decay=weight_decay, **kwargs)
        if isinstance(backbone, dict):
            backbone = keras.saving.deserialize_keras_object(backbone)
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.source_levels = tuple(source_levels)
        self.extra_layers = tuple(tuple(e) for e in extra_layers)
        self.fc7_from = fc7_from
        num_sources = len(self.source_levels) + (1 if fc7_from else 0) + len(self.extra_layers)
        if fusion and num_sources < 3:
            raise ValueError(f"fusion=True fuses the first three sources; this configuration has {num_sources}.")
        self.anchor_generator = SSDAnchorGenerator(
            min_sizes=min_sizes, max_sizes=max_sizes, aspect_ratios=aspect_ratios, legacy_steps=legacy_steps
        )
        if self.anchor_generator.num_levels != num_sources:
            raise ValueError(
                f"{num_sources} sources ({len(self.source_levels)} backbone + {len(self.extra_layers)} extra) "
                f"but the default boxes have {self.anchor_generator.num_levels} levels (min_sizes/aspect_ratios)."
            )
        self.matcher = ArgMaxMatcher(
            positive_threshold=positive_threshold, negative_threshold=positive_threshold, allow_low_quality_matches=True
        )
        self.box_weights = tuple(float(w) for w in box_weights)
        self.negative_ratio = float(negative_ratio)
        self.min_negatives = int(min_negatives)
        self.smooth_l1_beta = float(smooth_l1_beta)
        dtype = self.dtype_policy
        self.fc7 = (
            [
                keras.layers.MaxPooling2D(3, strides=1, padding="same", dtype=dtype, name="pool5"),
                keras.layers.Conv2D(1024, 3, padding="same", dilation_rate=6, activation="relu", dtype=dtype, name="fc6"),
                keras.layers.Conv2D(1024, 1, activation="relu", dtype=dtype, name="fc7"),
            ]
            if fc7_from
            else None
        )
        self.l2norm = L2Normalization(scale=l2norm_scale, dtype=dtype, name="l2norm") if l2norm_scale else None
        self.extras = [
            _conv_bn_relu(mid, 1, 1, "same", f"extra{i}_a", dtype) + _conv_bn_relu(out, 3, stride, padding, f"extra{i}_b", dtype)
            for i, (mid, out, stride, padding) in enumerate(self.extra_layers)
        ]
        self.fusion_alignment = fusion_alignment
        self.fusion = (
            SemanticFusion(reduced_channels=fusion_channels, alignment=self.resolved_fusion_alignment(), dtype=dtype,
                           name="fusion")
            if fusion
            else None
        )
        self.attention = (
            [
                SelfAttention(query_block_size=attention_block_size if i == 0 else None, dtype=dtype, name=f"attention{i}")
                for i in range(num_sources)
            ]
            if attention
            else None
        )
        anchors_per_level = self.anchor_generator.num_anchors_per_location
        self.class_heads = [
            keras.layers.Conv2D(a * (self.num_classes + 1), 3, padding="same", dtype=dtype, name=f"class_head{i}")
            for i, a in enumerate(anchors_per_level)
        ]
        self.box_heads = [
            keras.layers.Conv2D(a * 4, 3, padding="same", dtype=dtype, name=f"box_head{i}")
            for i, a in enumerate(anchors_per_level)
        ]
        post_args = dict(
            pre_nms_topk=pre_nms_topk, score_threshold=score_threshold, nms_iou_threshold=nms_iou_threshold,
            max_detections=max_detections, box_weights=self.box_weights, score_activation="softmax",
        )
        if nms_method not in ("combined", "padded"):
            raise ValueError(f"nms_method must be 'combined' or 'padded', got {nms_method!r}.")
        self.postprocess = DetectionPostProcessor(nms_method=nms_method, name="postprocess", **post_args)
        self._config = dict(
            num_classes=self.num_classes,
            source_levels=list(self.source_levels),
            extra_layers=[list(e) for e in self.extra_layers],
            fc7_from=fc7_from,
            l2norm_scale=l2norm_scale,
            attention=bool(attention),
            attention_block_size=attention_block_size,
            fusion=bool(fusion),
            fusion_channels=fusion_channels,
            fusion_alignment=fusion_alignment,
            **{k: v for k, v in self.anchor_generator.get_config().items()},
            positive_threshold=positive_threshold,
            negative_ratio=self.negative_ratio,
            min_negatives=self.min_negatives,
            box_weights=list(self.box_weights),
            smooth_l1_beta=self.smooth_l1_beta,
            pre_nms_topk=pre_nms_topk,
            score_threshold=score_threshold,
            nms_iou_threshold=nms_iou_threshold,
            max_detections=max_detections,
            nms_method=nms_method,
        )

    # --- forward ------------------------------------------------------------------------
    def resolved_fusion_alignment(self):
        """The fusion's grid convention: ``fusion_alignment``, or for ``"auto"`` the
        backbone's (``"same_padding"`` for the small backbone, else ``"corners"``)."""
        if self.fusion_alignment != "auto":
            return self.fusion_alignment
        return "same_padding" if str(getattr(self.backbone, "name", "")).startswith("small") else "corners"

    def build(self, input_shape=None):
        if self.built:
            return
        size = input_shape[1] if input_shape is not None and input_shape[1] else 128
        self.forward(tf.zeros((1, size, size, 3), tf.float32))
        self.built = True

    def sources(self, images, training=False, attend=True):
        """The detection sources (finest first), after fusion and attention (``attend=False``:
        before the attention units, i.e. their inputs, for inspection)."""
        feats = self.backbone(images, training=training)
        taps = [feats[level] for level in self.source_levels]
        x = taps[-1]
        if self.fc7 is not None:
            x = feats[self.fc7_from]
            for layer in self.fc7:
                x = layer(x)
            taps.append(x)
        extras = []
        for block in self.extras:
            for layer in block:
                x = layer(x, training=training) if isinstance(layer, keras.layers.BatchNormalization) else layer(x)
            extras.append(x)
        sources = list(taps) + extras
        if self.l2norm is not None:
            sources[0] = self.l2norm(sources[0])
        if self.fusion is not None:
            sources[0] = self.fusion(sources[:3], training=training)
        if self.attention is not None and attend:
            sources = [unit(s) for unit, s in zip(self.attention, sources)]
        return sources

    def forward(self, images, training=False):
        """``(class_logits, box_deltas, anchors)`` per source: ``[B, HWA, K+1]``, ``[B, HWA, 4]``, ``[HWA, 4]``."""
        sources = self.sources(images, training=training)
        shape = tf.shape(images)
        class_logits, box_deltas, anchors = [], [], []
        for level, (src, cls_head, box_head) in enumerate(zip(sources, self.class_heads, self.box_heads)):
            b = tf.shape(src)[0]
            class_logits.append(tf.reshape(cls_head(src), [b, -1, self.num_classes + 1]))
            box_deltas.append(tf.reshape(box_head(src), [b, -1, 4]))
            h, w = tf.shape(src)[1], tf.shape(src)[2]
            anchors.append(self.anchor_generator.level_anchors(level, h, w, shape[1], shape[2]))
        return class_logits, box_deltas, anchors

    def call(self, images, training=False):
        class_logits, box_deltas, _ = self.forward(images, training=training)
        return {"class_logits": tf.concat(class_logits, axis=1), "box_deltas": tf.concat(box_deltas, axis=1)}

    # --- loss ---------------------------------------------------------------------------
    def compute_targets(self, anchors, labels):
        """``(class_targets [B, A] (0 background, 1..K, -1 ignored), box_targets [B, A, 4])``."""
        matched_boxes, matched_classes, match_labels = match_ground_truth(self.matcher, anchors, labels)
        class_targets = tf.where(match_labels == 1, matched_classes + 1, tf.where(match_labels == 0, 0, -1))
        box_targets = box_ops.encode(matched_boxes, anchors[None], weights=self.box_weights)
        return class_targets, box_targets

    def detection_losses(self, images, labels, training):
        class_logits, box_deltas, anchors = self.forward(images, training=training)
        class_logits = tf.cast(tf.concat(class_logits, axis=1), tf.float32)
        box_deltas = tf.cast(tf.concat(box_deltas, axis=1), tf.float32)
        class_targets, box_targets = self.compute_targets(tf.concat(anchors, axis=0), labels)
        conf, loc, num_pos = loss_ops.multibox_loss(
            class_targets, class_logits, box_targets, box_deltas, negative_ratio=self.negative_ratio,
            min_negatives=self.min_negatives, smooth_l1_beta=self.smooth_l1_beta,
        )
        normalizer = loss_ops.global_normalizer(num_pos)
        return {"cls_loss": conf / normalizer, "box_loss": loc / normalizer}

    # --- inference ----------------------------------------------------------------------
    def detect(self, images, postprocessor=None):
        images = tf.cast(images, tf.float32)
        class_logits, box_deltas, anchors = self.forward(images, training=False)
        shape = tf.shape(images)
        return (postprocessor or self.postprocess)(class_logits, box_deltas, anchors, image_shape=(shape[1], shape[2]))
