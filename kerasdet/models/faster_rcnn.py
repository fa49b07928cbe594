"""Faster R-CNN with FPN (thesis ch. 4, §4.4) and the single-level C4 Faster R-CNN.

Two architectures share one model class (``architecture=``):

* ``"fpn"`` (default, thesis §4.4): backbone C2..C5 -> FPN P2..P6 (P6 = stride-2
  subsampling of P5, used only by the RPN) -> shared RPN head on P2..P6 with one anchor
  size per level (32²..512², ratios 1:2, 1:1, 2:1) -> proposals -> RoIAlign 7x7 on P2..P5
  with the level of Eq. 4.1 -> 2 x fc1024 (+ReLU) -> (K+1)-way softmax and class-specific
  box regression.
* ``"c4"`` (the original single-map Faster R-CNN, the baseline of SMN, Chen & Gupta 2017 Sec. 3): the
  RPN and the RoI op run on one backbone map (``feature_name``, e.g. VGG16
  ``block5_conv3``, stride 16), RoIs by tf-faster-rcnn's crop-and-resize 14x14 + 2x2
  max-pool (``roi_pooler="crop_pool"``), fc6/fc7-style head (``num_fc=2, fc_dim=4096``,
  optional dropout).

Parts (as TF Model Garden and detectron2 compose their two-stage models): ``backbone``,
``proposal_network`` (a :class:`~kerasdet.layers.region_proposal.RegionProposalNetwork`:
RPN head, anchors, proposals and the RPN loss), ``roi_layer`` and ``box_head``
(:class:`BoxHead`); each defaults to the part the flat keyword arguments describe, which
is what recipes and saved configs use. SMN and the benchmarks read the model through
its public methods (:meth:`FasterRCNN.features`, ``rpn``, ``rpn_features``,
``proposals``, ``box_head_outputs``, ``decode_boxes``, ``filter_detections``).

Training is approximate joint training (one ``model.fit``; proposals and sampled RoIs are
constants for the gradient). Four loss terms, each a local sum divided by a normalizer
summed over replicas (:func:`kerasdet.losses.global_normalizer`, see models/base.py), so
the update is the same on 1 or N replicas:

* ``rpn_cls_loss``: sigmoid cross-entropy over the sampled anchors / #sampled anchors;
* ``rpn_box_loss``: smooth-L1 (beta 1/9, Detectron) on positive anchors / #sampled
  anchors (Detectron2's normalization: both RPN terms per sampled anchor);
* ``cls_loss``: softmax cross-entropy over the sampled RoIs / #sampled RoIs;
* ``box_loss``: smooth-L1 (beta 1, Fast R-CNN) of the ground-truth class's deltas on
  foreground RoIs / #sampled RoIs (Fast R-CNN / Detectron2).

Choices where the thesis is silent (it defers to [92] and Detectron):

* the classifier is (K+1)-way softmax with background at index 0 and the box regressor
  predicts 4 deltas for each of the K+1 classes (Detectron / torchvision layout; the
  background slot is never trained);
* fc layers use Detectron's XavierFill (``lecun_uniform``), the classifier N(0, 0.01) and
  the box regressor N(0, 0.001), zero biases;
* inference: softmax scores, class-specific decoding with weights (10, 10, 5, 5), clip,
  per-class NMS 0.5, score > 0.05, 100 detections per image (Detectron's; the thesis
  states neither). The output dict is RetinaNet's (``boxes/scores/classes/
  num_detections``, classes -1 padding), so evaluation, CLI and export work unchanged.

XLA: ``crop_and_resize`` and ``combined_non_max_suppression`` do not compile with XLA.
When the model is compiled with ``jit_compile=True`` it switches to the gather RoIAlign
backend and ``non_max_suppression_padded`` (``roi_method``/``nms_method`` ``"auto"``).
``roi_pooler="crop_pool"`` has no XLA path.

**Mask R-CNN** (He et al., "Mask R-CNN", ICCV 2017): an optional ``mask_head`` part (a
:class:`~kerasdet.layers.mask_head.MaskHead`, Fig. 4 right) adds the mask branch in
parallel to the box head. The model then has its own RoIAlign of ``mask_head.roi_output_size``
(14, Fig. 4; RoIAlign: §3) on the box RoI layer's levels with the same Eq. 4.1 assignment.

* Training (§3 loss, §3.1 "Training"): the mask branch runs on the foreground
  prefix of the sampled RoIs (``sample_rois`` puts them first, at most
  ``int(num_rois * foreground_fraction)``); targets are the matched instance masks
  (``labels["masks"]`` ``[B, N, H, W]``, ``make_dataset(masks="instances")``) RoIAligned
  to 28x28 (:func:`~kerasdet.layers.mask_head.mask_targets`); ``mask_loss`` is the
  average per-pixel sigmoid cross-entropy of the ground-truth class's mask over the
  positive RoIs (:func:`~kerasdet.layers.mask_head.mask_loss`, normalized over replicas).
* Inference (§3.1 "Inference"): the mask branch runs on the (at most 100) kept detection
  boxes; the predicted class's m x m mask is sigmoid-ed, resized to its box and pasted
  into the image (:func:`~kerasdet.layers.windows.paste_masks`) and binarized at
  ``mask_threshold`` (0.5): ``masks`` ``[B, max_detections, H, W]`` (0/1 float32) in the
  detection dict, the key SharpMask / DecompNet return, so export's ``detection_masks``
  work unchanged.
"""
import copy

import keras
import tensorflow as tf

from kerasdet import losses as loss_ops
from kerasdet.layers.fpn import FeaturePyramid
from kerasdet.layers.mask_head import mask_loss, mask_targets, select_class_masks
from kerasdet.layers.postprocess import decode_roi_boxes, resolve_nms_method, roi_detections, two_stage_detections
from kerasdet.layers.region_proposal import RegionProposalNetwork
from kerasdet.layers.roi_align import RoIAlign, RoICropAndPool
from kerasdet.layers.windows import paste_masks
from kerasdet.models.base import Detector, json_like
from kerasdet.sampling import sample_rois

ARCHITECTURES = ("fpn", "c4")


@keras.saving.register_keras_serializable(package="kerasdet")
class BoxHead(keras.layers.Layer):
    """Fast R-CNN head: flatten -> ``num_fc`` x (Dense(fc_dim) + ReLU [+ dropout]) ->
    ``(class_logits [.., K+1], box_deltas [.., K+1, 4])``. Input ``[B, R, P, P, C]``."""

    def __init__(self, *, num_classes, num_fc=2, fc_dim=1024, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.num_fc = int(num_fc)
        self.fc_dim = int(fc_dim)
        self.dropout = float(dropout)
        self.fcs = [
            keras.layers.Dense(self.fc_dim, activation="relu", kernel_initializer="lecun_uniform",
                               dtype=self.dtype_policy, name=f"fc{i + 1}")
            for i in range(self.num_fc)
        ]
        self.drop = keras.layers.Dropout(self.dropout) if self.dropout else None
        self.cls = keras.layers.Dense(self.num_classes + 1, kernel_initializer=keras.initializers.RandomNormal(
            stddev=0.01), dtype=self.dtype_policy, name="class_logits")
        self.box = keras.layers.Dense(4 * (self.num_classes + 1), kernel_initializer=keras.initializers.RandomNormal(
            stddev=0.001), dtype=self.dtype_policy, name="box_deltas")

    def build(self, input_shape):
        flat = 1
        for d in input_shape[2:]:
            flat *= int(d)
        shape = (None, flat)
        for fc in self.fcs:
            fc.build(shape)
            shape = (None, self.fc_dim)
        self.cls.build(shape)
        self.box.build(shape)
        self.built = True

    def call(self, roi_features, training=False, return_features=False):
        """``(logits [B, R, K+1], deltas [B, R, K+1, 4])`` of ``[B, R, P, P, C]`` RoI
        features; with ``return_features=True`` ``(features [B, R, F], logits, deltas)``,
        ``features`` the last fc layer's output (SMN's "fc7")."""
        shape = tf.shape(roi_features)
        flat = 1
        for d in roi_features.shape[2:]:
            flat *= int(d)
        x = tf.reshape(roi_features, [-1, flat])
        for fc in self.fcs:
            x = fc(x)
            if self.drop is not None:
                x = self.drop(x, training=training)
        logits = tf.reshape(self.cls(x), [shape[0], shape[1], self.num_classes + 1])
        deltas = tf.reshape(self.box(x), [shape[0], shape[1], self.num_classes + 1, 4])
        if return_features:
            return tf.reshape(x, [shape[0], shape[1], x.shape[-1]]), logits, deltas
        return logits, deltas

    def get_config(self):
        config = super().get_config()
        config.update({"num_classes": self.num_classes, "num_fc": self.num_fc, "fc_dim": self.fc_dim,
                       "dropout": self.dropout})
        return config


def _deserialize(part):
    return keras.saving.deserialize_keras_object(part) if isinstance(part, dict) else part


@keras.saving.register_keras_serializable(package="kerasdet")
class FasterRCNN(Detector):
    """Two-stage detector (see the module docstring).

    Input: float images ``[B, H, W, 3]``, RGB 0..255 (the backbone normalizes). Targets:
    ``{"boxes": [B, N, 4] (``bounding_box_format``), "classes": [B, N] int32 (-1 padding), optional
    "is_crowd"}`` (with a ``mask_head`` also ``"masks"`` ``[B, N, H, W]``). ``predict`` returns
    ``{"boxes", "scores", "classes", "num_detections"}`` (with a ``mask_head`` also ``"masks"``).

    The model is composed of parts, each with a default built from the flat arguments
    below (TF Model Garden's and detectron2's composition): ``backbone`` (-> FPN for
    ``"fpn"``) -> ``proposal_network`` -> ``roi_layer`` -> ``box_head``. A part passed in
    replaces the flat arguments it would be built from (they are then not used).

    All arguments are keyword-only:
        backbone: ``keras.Model`` returning a dict of maps (``"C2".."C5"`` for ``fpn``).
        num_classes: K object classes (the classifier has K + 1 outputs).
        proposal_network: a :class:`~kerasdet.layers.region_proposal.RegionProposalNetwork`
            (or its serialized dict) whose levels are those of the RPN maps. Default
            ``None``: built from ``min_level``, ``max_level`` and the ``rpn_*``, anchor
            arguments. Its levels then set ``min_level`` / ``max_level`` (``c4``: both must
            be ``feature_level``).
        roi_layer: the RoI feature layer, called ``roi_layer(maps, rois, xla=...)`` on the
            maps of its levels (a :class:`~kerasdet.layers.roi_align.RoIAlign` or
            :class:`~kerasdet.layers.roi_align.RoICropAndPool`, or a serialized dict).
            Default ``None``: built from ``roi_pooler`` and its arguments. Its
            ``min_level`` / ``max_level`` then set ``roi_min_level`` / ``roi_max_level``.
        box_head: the second-stage head, called ``box_head(pooled, training=...,
            return_features=False)`` -> ``(logits [B, R, K+1], deltas [B, R, K+1, 4])``
            (with ``return_features=True`` also the features first, see :class:`BoxHead`),
            or a serialized dict. Default ``None``: a :class:`BoxHead` of ``num_fc``,
            ``fc_dim``, ``dropout``.
        mask_head: optional Mask R-CNN mask branch (module docstring), called
            ``mask_head(features [B, R, P, P, C])`` -> logits ``[B, R, 2P, 2P, K or 1]``
            with attributes ``num_classes`` (K) and ``roi_output_size`` (P), e.g. a
            :class:`~kerasdet.layers.mask_head.MaskHead`, or its serialized dict. Default
            ``None``: no masks (then no ``mask_head`` / ``mask_threshold`` config keys).
            Training then needs ``labels["masks"]``.
        mask_threshold: binarization of the pasted mask probabilities (Mask R-CNN §3.1
            "Inference": 0.5); only used with ``mask_head``.
        architecture: ``"fpn"`` or ``"c4"``.
        feature_name, feature_level: ``c4`` only: the backbone output used and its level
            (stride ``2**feature_level``). Defaults: ``block5_conv3`` or ``C4``; level 4.
        min_level, max_level: RPN levels (P2..P6). backbone_max_level: 5.
        fpn_channels: d = 256.
        roi_min_level, roi_max_level: RoI levels (P2..P5; P6 is RPN-only, §4.4.1).
        canonical_size, canonical_level: Eq. 4.1 (224, 4).
        rpn_channels: RPN 3x3 conv width. Default 256.
        anchor_size, scales, aspect_ratios: anchors; default 8 x stride (32 px on P2 ..
            512 px on P6), one scale, ratios (0.5, 1, 2).
        rpn_positive_threshold, rpn_negative_threshold: 0.7 / 0.3.
        rpn_batch_size, rpn_positive_fraction: 256 anchors per image, <= 50% positive.
        rpn_pre_nms_topk_train/_test, rpn_post_nms_topk_train/_test: 2000/2000, 1000/1000.
        rpn_nms_iou_threshold: 0.7. rpn_min_size: 0. rpn_smooth_l1_beta: 1/9.
        num_rois, foreground_fraction, foreground_iou, background_iou_high,
            background_iou_low: RoI sampling (512, 0.25, 0.5, 0.5, 0.0).
        roi_pooler: ``"align"`` (RoIAlign) or ``"crop_pool"`` (tf-faster-rcnn).
        roi_output_size, sampling_ratio, aligned, roi_method: RoIAlign (7, 2, True, auto).
        crop_size: crop-pool size before the 2x2 max-pool (14).
        num_fc, fc_dim, dropout: head (2, 1024, 0.0).
        box_weights: second-stage box coder (10, 10, 5, 5). smooth_l1_beta: 1.0.
        score_threshold, nms_iou_threshold, max_detections: 0.05 / 0.5 / 100.
        detections_pre_nms_topk: (RoI, class) candidates before the padded (XLA) NMS.
        nms_method: ``"auto"``, ``"combined"`` or ``"padded"``
            (:func:`~kerasdet.layers.postprocess.resolve_nms_method`).
        weight_decay: coupled L2 on kernels. Default 1e-4.
        bounding_box_format: format of the label boxes given to ``fit``/``evaluate`` and of
            the boxes ``predict`` returns. Default ``"yxyx"`` (network-input pixels); see
            :class:`~kerasdet.models.base.Detector`.
    """

    LOSS_NAMES = ("rpn_cls_loss", "rpn_box_loss", "cls_loss", "box_loss")

    def __init__(
        self,
        *,
        backbone,
        num_classes,
        proposal_network=None,
        roi_layer=None,
        box_head=None,
        mask_head=None,
        mask_threshold=0.5,
        architecture="fpn",
        feature_name=None,
        feature_level=4,
        min_level=2,
        max_level=6,
        backbone_max_level=5,
        fpn_channels=256,
        roi_min_level=2,
        roi_max_level=5,
        canonical_size=224.0,
        canonical_level=4,
        rpn_channels=256,
        anchor_size=8.0,
        scales=(1.0,),
        aspect_ratios=(0.5, 1.0, 2.0),
        rpn_positive_threshold=0.7,
        rpn_negative_threshold=0.3,
        rpn_batch_size=256,
        rpn_positive_fraction=0.5,
        rpn_pre_nms_topk_train=2000,
        rpn_post_nms_topk_train=2000,
        rpn_pre_nms_topk_test=1000,
        rpn_post_nms_topk_test=1000,
        rpn_nms_iou_threshold=0.7,
        rpn_min_size=0.0,
        rpn_smooth_l1_beta=1.0 / 9.0,
        num_rois=512,
        foreground_fraction=0.25,
        foreground_iou=0.5,
        background_iou_high=0.5,
        background_iou_low=0.0,
        roi_pooler="align",
        roi_output_size=7,
        sampling_ratio=2,
        aligned=True,
        roi_method="auto",
        crop_size=14,
        num_fc=2,
        fc_dim=1024,
        dropout=0.0,
        box_weights=(10.0, 10.0, 5.0, 5.0),
        smooth_l1_beta=1.0,
        score_threshold=0.05,
        nms_iou_threshold=0.5,
        max_detections=100,
        detections_pre_nms_topk=1000,
        nms_method="auto",
        weight_decay=1e-4,
        **kwargs,
    ):
        super().__init__(weight_decay=weight_decay, **kwargs)
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}.")
        if roi_pooler not in ("align", "crop_pool"):
            raise ValueError(f"roi_pooler must be 'align' or 'crop_pool', got {roi_pooler!r}.")
        resolve_nms_method(nms_method)  # validates
        backbone = _deserialize(backbone)
        proposal_network, roi_layer, box_head, mask_head = (
            _deserialize(p) for p in (proposal_network, roi_layer, box_head, mask_head))
        #: the parts passed in (serialized by get_config; the defaults are described by the flat arguments)
        self._given_parts = {k: p is not None for k, p in
                             (("proposal_network", proposal_network), ("roi_layer", roi_layer), ("box_head", box_head),
                              ("mask_head", mask_head))}
        if mask_head is not None:
            if int(mask_head.num_classes) != int(num_classes):
                raise ValueError(f"mask_head has {mask_head.num_classes} classes, the model {int(num_classes)}.")
            # one more loss term, tracked like the others (Detector makes a tracker per name)
            self.LOSS_NAMES = FasterRCNN.LOSS_NAMES + ("mask_loss",)
            trackers = list(self._tracker_list)
            trackers.insert(1 + len(FasterRCNN.LOSS_NAMES), keras.metrics.Mean(name="mask_loss"))
            self._tracker_list = trackers
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.architecture = architecture
        if architecture == "c4":
            if feature_name is None:
                names = list(backbone.output.keys()) if isinstance(backbone.output, dict) else []
                feature_name = "block5_conv3" if "block5_conv3" in names else "C4"
            min_level = max_level = roi_min_level = roi_max_level = int(feature_level)
        if proposal_network is not None:
            if architecture == "c4" and not proposal_network.min_level == proposal_network.max_level == min_level:
                raise ValueError(f"A c4 model's proposal_network must have the one level feature_level={min_level}, "
                                 f"got levels {proposal_network.levels}.")
            min_level, max_level = proposal_network.min_level, proposal_network.max_level
        if roi_layer is not None:
            roi_min_level, roi_max_level = roi_layer.min_level, roi_layer.max_level
        if box_head is not None and getattr(box_head, "num_classes", self.num_classes) != self.num_classes:
            raise ValueError(f"box_head has {box_head.num_classes} classes, the model {self.num_classes}.")
        self.feature_name = feature_name
        self.min_level, self.max_level = int(min_level), int(max_level)
        self.roi_min_level, self.roi_max_level = int(roi_min_level), int(roi_max_level)
        if not (self.min_level <= self.roi_min_level <= self.roi_max_level <= self.max_level):
            raise ValueError("RoI levels must lie inside the RPN levels.")
        self.box_weights = tuple(float(w) for w in box_weights)
        self.num_rois = int(num_rois)
        self.foreground_fraction = float(foreground_fraction)
        self.foreground_iou = float(foreground_iou)
        self.background_iou_high = float(background_iou_high)
        self.background_iou_low = float(background_iou_low)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.score_threshold = float(score_threshold)
        self.nms_iou_threshold = float(nms_iou_threshold)
        self.max_detections = int(max_detections)
        self.detections_pre_nms_topk = int(detections_pre_nms_topk)
        self.nms_method = nms_method

        if proposal_network is None:
            proposal_network = RegionProposalNetwork(
                min_level=self.min_level, max_level=self.max_level, anchor_size=anchor_size, scales=scales,
                aspect_ratios=aspect_ratios, channels=rpn_channels, positive_threshold=rpn_positive_threshold,
                negative_threshold=rpn_negative_threshold, batch_size=rpn_batch_size,
                positive_fraction=rpn_positive_fraction, pre_nms_topk_train=rpn_pre_nms_topk_train,
                post_nms_topk_train=rpn_post_nms_topk_train, pre_nms_topk_test=rpn_pre_nms_topk_test,
                post_nms_topk_test=rpn_post_nms_topk_test, nms_iou_threshold=rpn_nms_iou_threshold,
                min_size=rpn_min_size, smooth_l1_beta=rpn_smooth_l1_beta, name="region_proposal_network",
            )
        self.fpn = None
        if architecture == "fpn":
            self.fpn = FeaturePyramid(
                min_level=self.min_level, max_level=self.max_level, backbone_max_level=backbone_max_level,
                num_channels=fpn_channels, extra_levels="subsample_p5", name="fpn",
            )
        # Checkpoint layout: weights files written before RegionProposalNetwork existed hold
        # the RPN head at ``layers/rpn_head`` (Keras names a tracked layer's group after the
        # attribute, or after its class inside ``layers``, and saves a layer once, where it
        # is met first). Tracking the head here, before the proposal network that owns it,
        # keeps that layout, so old ``.weights.h5`` / ``.keras`` files load unchanged
        # (tests/fixtures/two_stage).
        self.rpn_head = proposal_network.head
        self.proposal_network = proposal_network
        if roi_layer is None:
            level_args = dict(min_level=self.roi_min_level, max_level=self.roi_max_level,
                              canonical_size=canonical_size, canonical_level=canonical_level)
            if roi_pooler == "align":
                roi_layer = RoIAlign(output_size=roi_output_size, sampling_ratio=sampling_ratio, aligned=aligned,
                                     method=roi_method, name="roi_align", **level_args)
            else:
                roi_layer = RoICropAndPool(crop_size=crop_size, pool_size=2, name="roi_crop_pool", **level_args)
        self.roi_layer = roi_layer
        if box_head is None:
            box_head = BoxHead(num_classes=self.num_classes, num_fc=num_fc, fc_dim=fc_dim, dropout=dropout,
                               name="box_head")
        self.box_head = box_head
        self.mask_head = mask_head
        self.mask_threshold = float(mask_threshold)
        self.mask_roi_layer = None
        if mask_head is not None:
            self.mask_roi_layer = RoIAlign(
                output_size=int(mask_head.roi_output_size), sampling_ratio=getattr(roi_layer, "sampling_ratio", 2),
                aligned=getattr(roi_layer, "aligned", True), method=getattr(roi_layer, "method", "auto"),
                min_level=roi_layer.min_level, max_level=roi_layer.max_level, canonical_size=roi_layer.canonical_size,
                canonical_level=roi_layer.canonical_level, name="mask_roi_align")
        rpn = proposal_network.get_config()
        self._config = dict(
            num_classes=self.num_classes, architecture=architecture, feature_name=feature_name,
            feature_level=int(feature_level), min_level=self.min_level, max_level=self.max_level,
            backbone_max_level=int(backbone_max_level), fpn_channels=int(fpn_channels),
            roi_min_level=self.roi_min_level, roi_max_level=self.roi_max_level,
            canonical_size=float(canonical_size), canonical_level=int(canonical_level),
            rpn_channels=rpn["channels"], anchor_size=rpn["anchor_size"], scales=rpn["scales"],
            aspect_ratios=rpn["aspect_ratios"], rpn_positive_threshold=rpn["positive_threshold"],
            rpn_negative_threshold=rpn["negative_threshold"], rpn_batch_size=rpn["batch_size"],
            rpn_positive_fraction=rpn["positive_fraction"], rpn_pre_nms_topk_train=rpn["pre_nms_topk_train"],
            rpn_post_nms_topk_train=rpn["post_nms_topk_train"], rpn_pre_nms_topk_test=rpn["pre_nms_topk_test"],
            rpn_post_nms_topk_test=rpn["post_nms_topk_test"], rpn_nms_iou_threshold=rpn["nms_iou_threshold"],
            rpn_min_size=rpn["min_size"], rpn_smooth_l1_beta=rpn["smooth_l1_beta"], num_rois=self.num_rois,
            foreground_fraction=self.foreground_fraction, foreground_iou=self.foreground_iou,
            background_iou_high=self.background_iou_high, background_iou_low=self.background_iou_low,
            roi_pooler=roi_pooler, roi_output_size=int(roi_output_size), sampling_ratio=int(sampling_ratio),
            aligned=bool(aligned), roi_method=roi_method, crop_size=int(crop_size), num_fc=int(num_fc),
            fc_dim=int(fc_dim), dropout=float(dropout), box_weights=list(self.box_weights),
            smooth_l1_beta=self.smooth_l1_beta, score_threshold=self.score_threshold,
            nms_iou_threshold=self.nms_iou_threshold, max_detections=self.max_detections,
            detections_pre_nms_topk=self.detections_pre_nms_topk, nms_method=nms_method,
        )
        if mask_head is not None:
            self._config["mask_threshold"] = self.mask_threshold

    def get_config(self):
        """:class:`~kerasdet.models.base.Detector`'s config (the flat arguments) plus each
        part that was passed in, serialized (``proposal_network``, ``roi_layer``,
        ``box_head``, ``mask_head``; a model of default parts has none of these keys, as before parts)."""
        config = super().get_config()
        for name, given in self._given_parts.items():
            if given:
                config[name] = json_like(keras.saving.serialize_keras_object(getattr(self, name)))
        return config

    @classmethod
    def from_config(cls, config):
        config = copy.deepcopy(config)  # deserialization consumes nested dicts
        for name in ("backbone", "proposal_network", "roi_layer", "box_head", "mask_head"):
            if isinstance(config.get(name), dict):
                config[name] = keras.saving.deserialize_keras_object(config[name])
        return cls(**config)

    # --- forward ------------------------------------------------------------------------
    def build(self, input_shape=None):
        """Creates every weight by running one small forward pass (eagerly)."""
        if self.built:
            return
        size = max(2 ** self.max_level, 32)
        self.detect(tf.zeros((1, size, size, 3), tf.float32))
        self.built = True

    @property
    def nms_backend(self):
        """``"combined"`` or ``"padded"``: :func:`~kerasdet.layers.postprocess.resolve_nms_method`
        of ``nms_method`` and the model's ``jit_compile`` (proposals and detections)."""
        return resolve_nms_method(self.nms_method, self.jit_compile)

    @property
    def num_anchors(self):
        """RPN anchors per location."""
        return self.proposal_network.num_anchors

    @property
    def roi_pool_sizes(self):
        """``(crop_size, pool_size)`` of the RoI features: the crop-and-pool layer's, or
        ``(output_size, 1)`` of a RoIAlign layer (the memory RoI of SMN defaults to them)."""
        if hasattr(self.roi_layer, "pool_size"):
            return int(self.roi_layer.crop_size), int(self.roi_layer.pool_size)
        return int(self.roi_layer.output_size), 1

    def features(self, images, training=False):
        """RPN feature maps (finest first) for levels ``min_level..max_level``."""
        c_feats = self.backbone(images, training=training)
        if self.fpn is None:
            return [c_feats[self.feature_name]]
        p_feats = self.fpn(c_feats, training=training)
        return [p_feats[f"P{lvl}"] for lvl in range(self.min_level, self.max_level + 1)]

    def rpn(self, feats):
        """``(objectness, deltas, anchors)`` per RPN level
        (:meth:`~kerasdet.layers.region_proposal.RegionProposalNetwork.outputs`)."""
        return self.proposal_network.outputs(feats)

    def rpn_features(self, feat):
        """The RPN head's 3x3 conv + ReLU features of one map ``[B, H, W, C]``."""
        return self.proposal_network.conv_features(feat)

    def proposals(self, logits, deltas, anchors, image_shape, training=False):
        """``(boxes [B, K, 4], scores [B, K], valid [B, K])`` of :meth:`rpn`'s outputs; the
        padded NMS when :attr:`nms_backend` is ``"padded"``, else the proposal network's."""
        method = "padded" if self.nms_backend == "padded" else None
        return self.proposal_network.proposals(logits, deltas, anchors, image_shape=image_shape, training=training,
                                               nms_method=method)

    def roi_features(self, feats, rois):
        """``roi_layer``'s ``[B, R, P, P, C]`` features of ``rois`` ``[B, R, 4]`` on the RoI
        levels of the RPN maps ``feats`` (:meth:`features`); the gather backend of an
        ``"auto"`` RoIAlign under ``jit_compile=True``."""
        roi_feats = feats[self.roi_min_level - self.min_level: self.roi_max_level - self.min_level + 1]
        return self.roi_layer(roi_feats, rois, xla=self.jit_compile is True)

    def box_head_outputs(self, feats, rois, training=False):
        """``(features [B, R, F], class logits [B, R, K+1], deltas [B, R, K+1, 4])`` of
        ``rois`` ``[B, R, 4]`` on the RPN maps ``feats`` (:meth:`features`; the RoI levels
        are taken from them): RoI pooling, the box head, its last hidden layer's output
        first. Logits and deltas are float32."""
        hidden, logits, deltas = self.box_head(self.roi_features(feats, rois), training=training,
                                               return_features=True)
        return hidden, tf.cast(logits, tf.float32), tf.cast(deltas, tf.float32)

    def roi_heads(self, feats, rois, training=False):
        """Class logits ``[B, R, K+1]`` and deltas ``[B, R, K+1, 4]`` for ``rois``."""
        logits, deltas = self.box_head(self.roi_features(feats, rois), training=training)
        return tf.cast(logits, tf.float32), tf.cast(deltas, tf.float32)

    def mask_outputs(self, feats, rois, training=False):
        """Mask logits ``[B, R, m, m, K]`` (float32; ``K = 1`` class-agnostic) of ``rois``
        ``[B, R, 4]`` on the RPN maps ``feats``: the mask RoIAlign (Eq. 4.1 levels) and
        ``mask_head``. Only for a model with a ``mask_head``."""
        roi_feats = feats[self.roi_min_level - self.min_level: self.roi_max_level - self.min_level + 1]
        pooled = self.mask_roi_layer(roi_feats, rois, xla=self.jit_compile is True)
        return tf.cast(self.mask_head(pooled, training=training), tf.float32)

    def _mask_resampling(self):
        """The mask targets' and pastes' resampling backend: ``crop_and_resize`` has no XLA
        kernel, so a ``jit_compile=True`` model uses the matrix-product form (the same
        samples, :func:`~kerasdet.layers.windows.crop_windows`)."""
        return "matmul" if self.jit_compile is True else "crop_and_resize"

    def detection_masks(self, feats, boxes, classes, image_shape):
        """Mask R-CNN inference (§3.1 "Inference"): binary masks ``[B, D, H, W]`` (float32 0/1) of the
        detections ``boxes`` ``[B, D, 4]`` (yxyx input pixels) of ``classes`` ``[B, D]``
        (-1 padding: zero masks): each box's predicted-class mask, sigmoid, pasted into
        the ``image_shape`` canvas over its box (:func:`~kerasdet.layers.windows.paste_masks`)
        and binarized at ``mask_threshold``.

        Outside XLA the mask branch runs only on the first ``k`` detection slots, ``k`` the
        last real slot of any image (the rest is padding: zero masks), not on all
        ``max_detections``: on the digits preset (1-4 digits an image) that is most of the
        predict time of a mask model. Under ``jit_compile=True`` every slot runs (static
        shapes), and the pastes are matrix products (:meth:`_mask_resampling`)."""
        num_slots = tf.shape(boxes)[1]
        if self.jit_compile is not True:
            slot = tf.range(1, num_slots + 1)[None, :]
            keep = tf.maximum(tf.reduce_max(tf.where(classes >= 0, slot, 0)), 1)
            boxes, classes = boxes[:, :keep], classes[:, :keep]
        probs = tf.sigmoid(select_class_masks(self.mask_outputs(feats, boxes), classes))  # [B, k, m, m]
        shape = tf.shape(probs)
        flat_boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
        pasted = paste_masks(tf.reshape(probs, tf.stack([-1, shape[2], shape[3]])), flat_boxes,
                             tf.range(tf.shape(flat_boxes)[0]), image_shape, backend=self._mask_resampling())
        real = tf.reshape(tf.cast(classes >= 0, tf.float32), [-1, 1, 1])
        masks = tf.cast(pasted > self.mask_threshold, tf.float32) * real
        masks = tf.reshape(masks, tf.stack([shape[0], shape[1], image_shape[0], image_shape[1]]))
        return tf.pad(masks, [[0, 0], [0, num_slots - shape[1]], [0, 0], [0, 0]])

    def decode_boxes(self, box_deltas, rois, image_shape):
        """Class boxes ``[B, R, K, 4]`` of :meth:`roi_heads`' deltas on ``rois``, clipped
        (:func:`~kerasdet.layers.postprocess.decode_roi_boxes` with ``box_weights``)."""
        return decode_roi_boxes(box_deltas, rois, image_shape, box_weights=self.box_weights)

    def filter_detections(self, probs, boxes, valid, image_shape, *, max_detections=None, nms_method=None):
        """The detection dict of class probabilities ``[B, R, K+1]`` and :meth:`decode_boxes`'
        boxes: :func:`~kerasdet.layers.postprocess.roi_detections` with the model's
        ``nms_iou_threshold``, ``score_threshold`` and ``detections_pre_nms_topk``.
        ``max_detections``: default the model's; ``nms_method``: default :attr:`nms_backend`."""
        return roi_detections(
            probs, boxes, valid, image_shape, nms_method=nms_method or self.nms_backend,
            max_detections=self.max_detections if max_detections is None else int(max_detections),
            iou_threshold=self.nms_iou_threshold, score_threshold=self.score_threshold,
            pre_nms_topk=self.detections_pre_nms_topk,
        )

    def call(self, images, training=False):
        return self.detect(images)

    # --- training -----------------------------------------------------------------------
    def detection_losses(self, images, labels, training):
        images = tf.cast(images, tf.float32)
        shape = tf.shape(images)
        image_shape = (shape[1], shape[2])
        gt_boxes = tf.cast(labels["boxes"], tf.float32)
        gt_classes = tf.cast(labels["classes"], tf.int32)
        gt_crowd = labels.get("is_crowd")

        feats = self.features(images, training=training)
        logits, deltas, anchors = self.rpn(feats)
        rpn_cls, rpn_box = self.proposal_network.loss_terms(logits, deltas, anchors, gt_boxes, gt_classes,
                                                            gt_crowd=gt_crowd, seed=self.sampling_seed)

        proposals, _, valid = self.proposals(logits, deltas, anchors, image_shape, training=training)
        samples = sample_rois(
            proposals, valid, gt_boxes, gt_classes, num_classes=self.num_classes, gt_crowd=gt_crowd,
            num_samples=self.num_rois, foreground_fraction=self.foreground_fraction,
            foreground_iou=self.foreground_iou, background_iou_high=self.background_iou_high,
            background_iou_low=self.background_iou_low, box_weights=self.box_weights,
            seed=self.sampling_seed,
        )
        class_logits, box_deltas = self.roi_heads(feats, samples["rois"], training=training)
        weights = samples["weights"]
        roi_norm = loss_ops.global_normalizer(tf.reduce_sum(weights))
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=samples["labels"], logits=class_logits)
        cls_loss = tf.reduce_sum(ce * weights) / roi_norm
        own = tf.gather(box_deltas, samples["labels"], batch_dims=2)  # [B, R, 4]
        box = tf.reduce_sum(loss_ops.smooth_l1_loss(samples["box_targets"], own, beta=self.smooth_l1_beta), -1)
        box_loss = tf.reduce_sum(box * tf.cast(samples["foreground"], tf.float32)) / roi_norm
        terms = {"rpn_cls_loss": rpn_cls, "rpn_box_loss": rpn_box, "cls_loss": cls_loss, "box_loss": box_loss}
        if self.mask_head is not None:
            terms["mask_loss"] = self.mask_loss_term(feats, samples, labels, training=training)
        return terms

    def mask_loss_term(self, feats, samples, labels, training=False):
        """Mask R-CNN's ``L_mask`` (§3, §3.1 "Training") of :func:`~kerasdet.sampling.sample_rois`' samples:
        the mask branch on the foreground prefix of the sampled RoIs (at most
        ``int(num_rois * foreground_fraction)``), targets from ``labels["masks"]``."""
        if "masks" not in labels:
            raise ValueError("A FasterRCNN with a mask_head trains on instance masks: labels need 'masks' "
                             "[B, N, H, W] (make_dataset(masks='instances')).")
        quota = max(1, int(self.num_rois * self.foreground_fraction))
        rois = samples["rois"][:, :quota]
        logits = self.mask_outputs(feats, rois, training=training)
        targets = mask_targets(labels["masks"], rois, samples["matched"][:, :quota], size=int(logits.shape[2]),
                               backend=self._mask_resampling())
        return mask_loss(logits, targets, samples["labels"][:, :quota] - 1, samples["foreground"][:, :quota])

    # --- inference ----------------------------------------------------------------------
    def detect(self, images):
        """Decoded, per-class-NMS-filtered detections in network-input pixels."""
        images = tf.cast(images, tf.float32)
        shape = tf.shape(images)
        image_shape = (shape[1], shape[2])
        feats = self.features(images, training=False)
        logits, deltas, anchors = self.rpn(feats)
        proposals, _, valid = self.proposals(logits, deltas, anchors, image_shape, training=False)
        class_logits, box_deltas = self.roi_heads(feats, proposals, training=False)
        detections = two_stage_detections(
            class_logits, box_deltas, proposals, valid, image_shape, box_weights=self.box_weights,
            nms_method=self.nms_backend, max_detections=self.max_detections, iou_threshold=self.nms_iou_threshold,
            score_threshold=self.score_threshold, pre_nms_topk=self.detections_pre_nms_topk,
        )
        if self.mask_head is not None:
            detections["masks"] = self.detection_masks(feats, detections["boxes"], detections["classes"], image_shape)
        return detections
