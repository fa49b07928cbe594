"""R-FCN, CoupleNet and Attention CoupleNet (Zhu et al., "Attention CoupleNet", IEEE TIP 2019).

One model class, :class:`RFCN`, covers the three detectors; the variant is chosen by the
constructor and by the backbone:

==========================  =========================  =====================================
detector                    ``global_branch``          backbone
==========================  =========================  =====================================
R-FCN (Dai et al. 2016)     ``False``                  dilated ResNet, no attention levels
CoupleNet (ICCV 2017)       ``True`` (+ ``context``)   dilated ResNet, no attention levels
Attention CoupleNet         ``True``                   ``attention_levels=(2, 3, 4)``
==========================  =========================  =====================================

The backbone is any kerasdet backbone whose dict output has the RPN map
(``rpn_feature``, default ``"C4"``) and the head map (``head_feature``, default ``"C5"``),
both of stride ``2**feature_level`` (16: conv5 is dilated, §IV-B). Attention logits
``"A{level}"`` in the backbone output (``resnet_dilated_backbone(attention_levels=...)``,
``small_backbone(attention_levels=...)``) switch the attention loss on; the RPN then reads
the attended C4 (§III-B, our reading of Fig. 2) because the backbone's C4 already is the
attended map. :func:`couplenet` and :func:`acouplenet` are no classes of their own, only
the documented argument sets (``RFCN(global_branch=True, ...)``).

Architecture (§III-A to §III-E and the released CoupleNet Caffe code; paper defaults in brackets):

* RPN on C4: a one-level :class:`~kerasdet.layers.region_proposal.RegionProposalNetwork`
  (the ``proposal_network`` part; 3x3 conv ``rpn_channels`` [512] + ReLU, 9 anchors
  128/256/512 px x 1:2/1:1/2:1, pre-NMS 6000, NMS 0.7, post-NMS 300 in training and at
  test, min size 16 px).
  Objectness is one sigmoid logit per anchor (Caffe: a 2-way softmax, 18 outputs; the
  same decision with half the outputs, as :mod:`kerasdet.layers.rpn` documents).
* ``conv_new_1``: 1x1 conv ``conv_new_channels`` [1024] + ReLU on C5, read by both
  branches (the released code).
* Local FCN (R-FCN): a 1x1 conv to ``k*k*(C+1)`` position-sensitive score maps and a 1x1
  conv to ``k*k*4`` class-agnostic box maps, :class:`~kerasdet.layers.psroi.PSRoIPooling`
  (k = ``group_size`` [7], spatial scale ``1/16``, Caffe class-major channel layout,
  ``psroi_method`` "pool" = exact R-FCN bins or "align" = bilinear) with average voting.
  **Box maps: 4k², not Caffe's 8k².** Caffe's class-agnostic regressor predicts
  ``2 x 4`` deltas per bin (background and foreground) and only the foreground 4 are ever
  trained or used (``rfcn_bbox`` 392 channels, the bg half has zero targets/weights); the
  4k² maps here are exactly the used half, which saves ``4k^2 (D + 1)`` dead parameters
  (200,900 instead of 401,800 at k = 7, D = 1024).
* Global FCN (CoupleNet, ``global_branch=True``): RoI max pooling ``global_pool_size``
  [7] x same on ``conv_new_1`` (:class:`~kerasdet.layers.roi_align.RoICropAndPool`:
  crop_and_resize to 2P then 2x2 max-pool, the usual TF approximation of Caffe RoIPool,
  our choice); with ``context`` [True] the same pooling of the context box (the RoI
  with 2x its height and width about its centre, clipped to the image; :func:`context_boxes`)
  is concatenated channel-wise (7x7x2048); then a PxP valid conv ``global_channels`` [1024]
  + ReLU, a 1x1 conv 1024 + ReLU, a 1x1 conv to C+1 logits and a 1x1 conv to 4
  class-agnostic deltas (Caffe's 8 = bg/fg x 4 again reduced to the used 4).
* Coupling (:class:`Coupling`): ``coupling_norm`` in ``"conv"`` (default: a 1x1 conv
  C+1 -> C+1 with bias on the local voted logits, the released code's
  ``conv/local_cls_score``; initialized to the identity so training starts from the
  plain sum), ``"none"``, ``"l2"`` (per-RoI L2 normalization of both branches' logits,
  then a learnable per-channel scale initialized to 10, Bell et al.'s ION) x
  ``coupling_op`` in ``"sum"`` (default), ``"product"``, ``"max"``. Coupling acts on the
  logits (pre-softmax). Box deltas of the two branches are always summed (the code).

Training (approximate joint, one ``model.fit``; §III-F and the released code): RPN 256 anchors at 0.7/0.3, up
to half positive, smooth-L1 with sigma 3 (``rpn_smooth_l1_beta = 1/sigma^2 = 1/9``), both
RPN terms normalized by the number of sampled anchors; the second stage uses ALL post-NMS
proposals plus the ground truth (``BATCH_SIZE: -1``), foreground at IoU >= 0.5, background
[0, 0.5); targets encoded with weights (10, 10, 5, 5) (= stds 0.1/0.2); per-RoI loss
(softmax cross-entropy on the coupled logits + smooth-L1 sigma 1 on foreground deltas);
OHEM keeps the ``ohem_rois`` [128] highest-loss RoIs per image
(``top_k`` on the losses of a read-only forward pass over all RoIs, then a second,
back-propagated pass over only the kept ones, as R-FCN's Caffe OHEM;
:func:`kerasdet.sampling.ohem_indices`, same selection as ``ohem_select``) and both head
terms are divided by the FIXED ``ohem_rois x images`` (Eq. 4, §III-F: "N is the number of
training RoIs (128)"), summed over replicas. Only the coupled output is supervised (no per-branch
losses). The attention term (Eq. 4, weight ``attention_weight`` [1]) is
:func:`kerasdet.losses.attention_loss` of the backbone's attention logits against
``labels["foreground"]`` (uint8 [B, H, W]: 1 object, 0 background, 255 ignore; the
pipeline supplies it with ``input.masks = "union"``), divided by the global image count.

Inference: 300 proposals, coupled logits, softmax, class-agnostic decoding of the summed
deltas (weights 10, 10, 5, 5) on the proposals, clip, per-class NMS 0.3, score > 0.05, 100
detections (py-R-FCN defaults; the paper does not state them), the FasterRCNN output dict
(:func:`~kerasdet.layers.postprocess.per_class_nms`). With ``jit_compile=True`` (or
``nms_method="padded"``) NMS uses ``non_max_suppression_padded``; the global branch's
crop-and-resize pooling itself has no XLA kernel.

Not reproduced: bias ``lr_mult 2`` of Caffe (biases learn at the base rate here), the
stds-folding of the snapshot code (targets are scaled by the coder weights instead, which
is the training-time equivalent).
"""
import copy

import keras
import tensorflow as tf

from kerasdet import boxes as box_ops
from kerasdet import losses as loss_ops
from kerasdet.layers.postprocess import resolve_nms_method, two_stage_detections
from kerasdet.layers.psroi import PSRoIPooling
from kerasdet.layers.region_proposal import RegionProposalNetwork
from kerasdet.layers.roi_align import RoICropAndPool
from kerasdet.models.base import Detector, json_like
from kerasdet.sampling import ohem_indices, sample_rois

COUPLING_NORMS = ("conv", "none", "l2")
COUPLING_OPS = ("sum", "product", "max")
PSROI_METHODS = ("pool", "align")


def _init(stddev=0.01):
    return keras.initializers.RandomNormal(stddev=stddev)


def context_boxes(boxes, image_shape, *, scale=2.0):
    """The CoupleNet context region: ``boxes`` (yxyx ``[..., 4]``) with height and width
    multiplied by ``scale`` about their centre (area x ``scale**2``; our reading of §III-D's
    "2 times larger" as 2x each side), clipped to ``[0, H] x [0, W]`` of
    ``image_shape = (H, W)``."""
    boxes = tf.cast(boxes, tf.float32)
    ymin, xmin, ymax, xmax = tf.unstack(boxes, 4, axis=-1)
    yc, xc = 0.5 * (ymin + ymax), 0.5 * (xmin + xmax)
    hh, hw = 0.5 * scale * (ymax - ymin), 0.5 * scale * (xmax - xmin)
    out = tf.stack([yc - hh, xc - hw, yc + hh, xc + hw], axis=-1)
    return box_ops.clip(out, tf.cast(image_shape[0], tf.float32), tf.cast(image_shape[1], tf.float32))


@keras.saving.register_keras_serializable(package="kerasdet")
class GlobalHead(keras.layers.Layer):
    """CoupleNet's RoI-wise global subnetwork (§III-D, released code ``conv_pool5``/``conv_pool5_1``).

    Input ``[B, R, P, P, C_in]`` (RoI-pooled proposal [+ context] features); output
    ``(logits [B, R, C+1], deltas [B, R, 4])``: PxP valid conv ``channels`` + ReLU ->
    1x1 conv ``channels`` + ReLU -> 1x1 conv C+1 (``global_cls_score``) and 1x1 conv 4
    (class-agnostic ``global_bbox_pred``). Init N(0, 0.01), zero bias.
    """

    def __init__(self, *, num_classes, pool_size=7, channels=1024, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.pool_size = int(pool_size)
        self.channels = int(channels)
        p = dict(kernel_initializer=_init(), dtype=self.dtype_policy)
        self.conv1 = keras.layers.Conv2D(self.channels, self.pool_size, padding="valid", activation="relu",
                                         name="conv_pool5", **p)
        self.conv2 = keras.layers.Conv2D(self.channels, 1, activation="relu", name="conv_pool5_1", **p)
        self.cls = keras.layers.Conv2D(self.num_classes + 1, 1, name="global_cls_score", **p)
        self.box = keras.layers.Conv2D(4, 1, name="global_bbox_pred", **p)

    def build(self, input_shape):
        p, c = self.pool_size, input_shape[-1]
        self.conv1.build((None, p, p, c))
        self.conv2.build((None, 1, 1, self.channels))
        self.cls.build((None, 1, 1, self.channels))
        self.box.build((None, 1, 1, self.channels))
        self.built = True

    def call(self, pooled):
        shape = tf.shape(pooled)
        x = tf.reshape(pooled, [-1, self.pool_size, self.pool_size, pooled.shape[-1]])
        x = self.conv2(self.conv1(x))
        logits = tf.reshape(self.cls(x), [shape[0], shape[1], self.num_classes + 1])
        deltas = tf.reshape(self.box(x), [shape[0], shape[1], 4])
        return logits, deltas

    def get_config(self):
        config = super().get_config()
        config.update({"num_classes": self.num_classes, "pool_size": self.pool_size, "channels": self.channels})
        return config


@keras.saving.register_keras_serializable(package="kerasdet")
class Coupling(keras.layers.Layer):
    """Couples the local and global ``[B, R, N]`` logits (§III-E, Table I options).

    Args:
        num_outputs: N = C + 1.
        norm: ``"conv"`` (1x1 conv N -> N with bias on the LOCAL logits, identity-initialized;
            the global classifier already is a learned 1x1 conv, so the released code puts
            no second one there), ``"none"`` or ``"l2"`` (each branch L2-normalized per RoI,
            then multiplied by its own learnable per-channel scale, initialized to
            ``l2_scale`` = 10).
        op: ``"sum"``, ``"product"`` or ``"max"`` (element-wise).
        l2_scale: initial scale of the ``"l2"`` norm. Default 10.
    """

    def __init__(self, *, num_outputs, norm="conv", op="sum", l2_scale=10.0, **kwargs):
        super().__init__(**kwargs)
        if norm not in COUPLING_NORMS:
            raise ValueError(f"coupling_norm must be one of {COUPLING_NORMS}, got {norm!r}.")
        if op not in COUPLING_OPS:
            raise ValueError(f"coupling_op must be one of {COUPLING_OPS}, got {op!r}.")
        self.num_outputs = int(num_outputs)
        self.norm = norm
        self.op = op
        self.l2_scale = float(l2_scale)
        self.local_conv = None
        if norm == "conv":
            self.local_conv = keras.layers.Dense(self.num_outputs, kernel_initializer="identity",
                                                 dtype=self.dtype_policy, name="local_cls_score")

    def build(self, input_shape=None):
        if self.local_conv is not None:
            self.local_conv.build((None, self.num_outputs))
        if self.norm == "l2":
            init = keras.initializers.Constant(self.l2_scale)
            self.local_scale = self.add_weight(name="local_scale", shape=(self.num_outputs,), initializer=init)
            self.global_scale = self.add_weight(name="global_scale", shape=(self.num_outputs,), initializer=init)
        self.built = True

    def call(self, local, global_):
        if self.norm == "conv":
            local = self.local_conv(local)
        elif self.norm == "l2":
            local = tf.math.l2_normalize(local, axis=-1, epsilon=1e-12) * tf.cast(self.local_scale, local.dtype)
            global_ = tf.math.l2_normalize(global_, axis=-1, epsilon=1e-12) * tf.cast(self.global_scale, global_.dtype)
        if self.op == "sum":
            return local + global_
        if self.op == "product":
            return local * global_
        return tf.maximum(local, global_)

    def get_config(self):
        config = super().get_config()
        config.update({"num_outputs": self.num_outputs, "norm": self.norm, "op": self.op,
                       "l2_scale": self.l2_scale})
        return config


@keras.saving.register_keras_serializable(package="kerasdet")
class RFCN(Detector):
    """R-FCN / CoupleNet / Attention CoupleNet (see the module docstring).

    Args (paper values are the defaults unless noted):
        backbone: a backbone model (dict output with ``rpn_feature``, ``head_feature`` and
            optionally ``"A{level}"`` attention logits) or its serialized dict.
        num_classes: C object classes (VOC: 20; background is added).
        proposal_network: a one-level
            :class:`~kerasdet.layers.region_proposal.RegionProposalNetwork` (or its
            serialized dict) at ``feature_level``. Default ``None``: built from the
            ``rpn_*`` and anchor arguments (which a network passed in replaces).
        rpn_feature, head_feature: backbone keys of the RPN map and of the map under
            ``conv_new_1``. Default ``"C4"`` / ``"C5"``.
        feature_level: both maps have stride ``2**feature_level``. Default 4 (16).
        conv_new_channels: ``conv_new_1`` width D. Default 1024.
        group_size: k of the k x k position-sensitive bins. Default 7.
        psroi_method: ``"pool"`` (exact R-FCN average bins, default) or ``"align"``.
        psroi_sampling_ratio: samples per bin side of ``"align"``. Default 2.
        global_branch: add CoupleNet's global FCN and the coupling. Default False (R-FCN).
        context: pool the 2x context box too (CoupleNet). Default True.
        context_scale: side multiplier of the context box. Default 2.0.
        global_pool_size: P of the global RoI pooling (and of its PxP conv). Default 7.
        global_channels: width of the two global convs. Default 1024.
        coupling_norm, coupling_op: see :class:`Coupling`. Default ``"conv"``, ``"sum"``.
        l2_scale: initial scale of ``coupling_norm="l2"``. Default 10.
        attention_weight: weight of the attention loss (Eq. 4: 1). Default 1.0.
        attention_target_threshold: object fraction of a cell that makes its attention target
            1 (:func:`kerasdet.losses.attention_targets`). Default 0.5; the digits preset
            uses 0.25 (thin ink masks, see there).
        rpn_channels: RPN 3x3 conv width. Default 512.
        anchor_size, scales, aspect_ratios: anchors ``anchor_size * stride * scale`` px.
            Default 8, (1, 2, 4), (0.5, 1, 2): 128/256/512 px at stride 16.
        rpn_positive_threshold, rpn_negative_threshold: Default 0.7 / 0.3.
        rpn_batch_size, rpn_positive_fraction: Default 256 / 0.5.
        rpn_pre_nms_topk_train, rpn_post_nms_topk_train: Default 6000 / 300.
        rpn_pre_nms_topk_test, rpn_post_nms_topk_test: Default 6000 / 300.
        rpn_nms_iou_threshold: Default 0.7.
        rpn_min_size: proposals with a side ``<= rpn_min_size`` px are dropped. Default 16.
        rpn_smooth_l1_beta: ``1 / sigma^2`` with sigma 3. Default 1/9.
        foreground_iou: Default 0.5 (background below it, down to 0).
        ohem_rois: hardest RoIs kept per image (and the fixed per-image normalizer).
            Default 128. ``0`` turns OHEM off: every sampled RoI is used and the head
            terms are divided by the number of sampled RoIs.
        box_weights: box coder weights. Default (10, 10, 5, 5).
        smooth_l1_beta: head smooth-L1 beta (sigma 1). Default 1.0.
        score_threshold, nms_iou_threshold, max_detections: Default 0.05 / 0.3 / 100.
        detections_pre_nms_topk: candidates of the padded NMS. Default 1000.
        nms_method: ``"auto"`` (padded under ``jit_compile``), ``"combined"`` or ``"padded"``
            (:func:`~kerasdet.layers.postprocess.resolve_nms_method`).
        weight_decay: coupled L2 decay. Default 5e-4 (the paper's, §IV-A and §IV-D).
        bounding_box_format: format of the label boxes given to ``fit``/``evaluate`` and of
            the boxes ``predict`` returns. Default ``"yxyx"`` (network-input pixels); see
            :class:`~kerasdet.models.base.Detector`.
    """

    LOSS_NAMES = ("rpn_cls_loss", "rpn_box_loss", "cls_loss", "box_loss", "attention_loss")

    def __init__(
        self,
        *,
        backbone,
        num_classes,
        proposal_network=None,
        rpn_feature="C4",
        head_feature="C5",
        feature_level=4,
        conv_new_channels=1024,
        group_size=7,
        psroi_method="pool",
        psroi_sampling_ratio=2,
        global_branch=False,
        context=True,
        context_scale=2.0,
        global_pool_size=7,
        global_channels=1024,
        coupling_norm="conv",
        coupling_op="sum",
        l2_scale=10.0,
        attention_weight=1.0,
        attention_target_threshold=0.5,
        rpn_channels=512,
        anchor_size=8.0,
        scales=(1.0, 2.0, 4.0),
        aspect_ratios=(0.5, 1.0, 2.0),
        rpn_positive_threshold=0.7,
        rpn_negative_threshold=0.3,
        rpn_batch_size=256,
        rpn_positive_fraction=0.5,
        rpn_pre_nms_topk_train=6000,
        rpn_post_nms_topk_train=300,
        rpn_pre_nms_topk_test=6000,
        rpn_post_nms_topk_test=300,
        rpn_nms_iou_threshold=0.7,
        rpn_min_size=16.0,
        rpn_smooth_l1_beta=1.0 / 9.0,
        foreground_iou=0.5,
        ohem_rois=128,
        box_weights=(10.0, 10.0, 5.0, 5.0),
        smooth_l1_beta=1.0,
        score_threshold=0.05,
        nms_iou_threshold=0.3,
        max_detections=100,
        detections_pre_nms_topk=1000,
        nms_method="auto",
        weight_decay=5e-4,
        **kwargs,
    ):
        super().__init__(weight_decay=weight_decay, **kwargs)
        if psroi_method not in PSROI_METHODS:
            raise ValueError(f"psroi_method must be one of {PSROI_METHODS}, got {psroi_method!r}.")
        resolve_nms_method(nms_method)  # validates
        if coupling_norm not in COUPLING_NORMS:
            raise ValueError(f"coupling_norm must be one of {COUPLING_NORMS}, got {coupling_norm!r}.")
        if coupling_op not in COUPLING_OPS:
            raise ValueError(f"coupling_op must be one of {COUPLING_OPS}, got {coupling_op!r}.")
        if isinstance(backbone, dict):
            backbone = keras.saving.deserialize_keras_object(backbone)
        if isinstance(proposal_network, dict):
            proposal_network = keras.saving.deserialize_keras_object(proposal_network)
        #: whether the proposal network was passed in (get_config then serializes it)
        self._given_proposal_network = proposal_network is not None
        self.backbone = backbone
        outputs = backbone.output if isinstance(backbone.output, dict) else {}
        for key in (rpn_feature, head_feature):
            if key not in outputs:
                raise ValueError(f"The backbone has no output {key!r} (it has {sorted(outputs)}).")
        #: attention logits of the backbone ("A2", "A3", ...), finest first
        self.attention_keys = sorted((k for k in outputs if k[:1] == "A" and k[1:].isdigit()), key=lambda k: int(k[1:]))
        self.num_classes = int(num_classes)
        self.rpn_feature, self.head_feature = rpn_feature, head_feature
        self.feature_level = int(feature_level)
        self.stride = 2.0**self.feature_level
        self.group_size = int(group_size)
        self.global_branch = bool(global_branch)
        self.context = bool(context)
        self.context_scale = float(context_scale)
        self.attention_weight = float(attention_weight)
        self.attention_target_threshold = float(attention_target_threshold)
        if not 0.0 < self.attention_target_threshold <= 1.0:
            raise ValueError(f"attention_target_threshold must be in (0, 1], got {attention_target_threshold}.")
        self.box_weights = tuple(float(w) for w in box_weights)
        self.foreground_iou = float(foreground_iou)
        self.ohem_rois = int(ohem_rois or 0)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.score_threshold = float(score_threshold)
        self.nms_iou_threshold = float(nms_iou_threshold)
        self.max_detections = int(max_detections)
        self.detections_pre_nms_topk = int(detections_pre_nms_topk)
        self.nms_method = nms_method

        if proposal_network is None:
            proposal_network = RegionProposalNetwork(
                min_level=self.feature_level, max_level=self.feature_level, anchor_size=anchor_size, scales=scales,
                aspect_ratios=aspect_ratios, channels=rpn_channels, positive_threshold=rpn_positive_threshold,
                negative_threshold=rpn_negative_threshold, batch_size=rpn_batch_size,
                positive_fraction=rpn_positive_fraction, pre_nms_topk_train=rpn_pre_nms_topk_train,
                post_nms_topk_train=rpn_post_nms_topk_train, pre_nms_topk_test=rpn_pre_nms_topk_test,
                post_nms_topk_test=rpn_post_nms_topk_test, nms_iou_threshold=rpn_nms_iou_threshold,
                min_size=rpn_min_size, smooth_l1_beta=rpn_smooth_l1_beta, name="region_proposal_network",
            )
        elif not proposal_network.min_level == proposal_network.max_level == self.feature_level:
            raise ValueError(f"proposal_network must have the one level feature_level={self.feature_level}, "
                             f"got levels {proposal_network.levels}.")
        # Tracked before the network that owns it: the checkpoint layout of the weights
        # files written before RegionProposalNetwork (see FasterRCNN).
        self.rpn_head = proposal_network.head
        self.proposal_network = proposal_network
        rpn = proposal_network.get_config()
        k, n = self.group_size, self.num_classes + 1
        self.conv_new = keras.layers.Conv2D(int(conv_new_channels), 1, activation="relu", kernel_initializer=_init(),
                                            name="conv_new_1")
        self.cls_maps = keras.layers.Conv2D(k * k * n, 1, kernel_initializer=_init(), name="rfcn_cls")
        self.box_maps = keras.layers.Conv2D(k * k * 4, 1, kernel_initializer=_init(), name="rfcn_bbox")
        psroi = dict(group_size=k, spatial_scale=1.0 / self.stride, method=psroi_method,
                     sampling_ratio=int(psroi_sampling_ratio), vote=True)
        self.psroi_cls = PSRoIPooling(output_dim=n, name="psroi_cls", **psroi)
        self.psroi_box = PSRoIPooling(output_dim=4, name="psroi_box", **psroi)
        self.roi_pool = self.global_head = self.coupling = None
        if self.global_branch:
            self.roi_pool = RoICropAndPool(crop_size=2 * int(global_pool_size), pool_size=2,
                                           min_level=self.feature_level, max_level=self.feature_level, name="roi_pool")
            self.global_head = GlobalHead(num_classes=self.num_classes, pool_size=global_pool_size,
                                          channels=global_channels, name="global_head")
            self.coupling = Coupling(num_outputs=n, norm=coupling_norm, op=coupling_op, l2_scale=l2_scale,
                                     name="coupling")
        self._config = dict(
            num_classes=self.num_classes, rpn_feature=rpn_feature, head_feature=head_feature,
            feature_level=self.feature_level, conv_new_channels=int(conv_new_channels), group_size=k,
            psroi_method=psroi_method, psroi_sampling_ratio=int(psroi_sampling_ratio),
            global_branch=self.global_branch, context=self.context, context_scale=self.context_scale,
            global_pool_size=int(global_pool_size), global_channels=int(global_channels),
            coupling_norm=coupling_norm, coupling_op=coupling_op, l2_scale=float(l2_scale),
            attention_weight=self.attention_weight, attention_target_threshold=self.attention_target_threshold,
            rpn_channels=rpn["channels"], anchor_size=rpn["anchor_size"], scales=rpn["scales"],
            aspect_ratios=rpn["aspect_ratios"], rpn_positive_threshold=rpn["positive_threshold"],
            rpn_negative_threshold=rpn["negative_threshold"], rpn_batch_size=rpn["batch_size"],
            rpn_positive_fraction=rpn["positive_fraction"], rpn_pre_nms_topk_train=rpn["pre_nms_topk_train"],
            rpn_post_nms_topk_train=rpn["post_nms_topk_train"], rpn_pre_nms_topk_test=rpn["pre_nms_topk_test"],
            rpn_post_nms_topk_test=rpn["post_nms_topk_test"], rpn_nms_iou_threshold=rpn["nms_iou_threshold"],
            rpn_min_size=rpn["min_size"], rpn_smooth_l1_beta=rpn["smooth_l1_beta"], foreground_iou=self.foreground_iou,
            ohem_rois=self.ohem_rois, box_weights=list(self.box_weights), smooth_l1_beta=self.smooth_l1_beta,
            score_threshold=self.score_threshold, nms_iou_threshold=self.nms_iou_threshold,
            max_detections=self.max_detections, detections_pre_nms_topk=self.detections_pre_nms_topk,
            nms_method=nms_method,
        )

    def get_config(self):
        """:class:`~kerasdet.models.base.Detector`'s config (the flat arguments), plus the
        serialized ``proposal_network`` when one was passed in."""
        config = super().get_config()
        if self._given_proposal_network:
            config["proposal_network"] = json_like(keras.saving.serialize_keras_object(self.proposal_network))
        return config

    @classmethod
    def from_config(cls, config):
        config = copy.deepcopy(config)  # deserialization consumes nested dicts
        for name in ("backbone", "proposal_network"):
            if isinstance(config.get(name), dict):
                config[name] = keras.saving.deserialize_keras_object(config[name])
        return cls(**config)

    # --- build --------------------------------------------------------------------------
    def build(self, input_shape=None):
        """Creates every weight from the backbone's channel counts, without a forward pass
        (so the paper configuration can be counted at no compute cost)."""
        if self.built:
            return
        outputs = self.backbone.output
        c_rpn = outputs[self.rpn_feature].shape[-1]
        c_head = outputs[self.head_feature].shape[-1]
        d = self.conv_new.filters
        shapes = [(self.rpn_head, (None, None, None, c_rpn)), (self.conv_new, (None, None, None, c_head)),
                  (self.cls_maps, (None, None, None, d)), (self.box_maps, (None, None, None, d))]
        if self.global_branch:
            p = self.global_head.pool_size
            shapes += [(self.global_head, (None, None, p, p, d * (2 if self.context else 1))),
                       (self.coupling, (None, None, self.num_classes + 1))]
        for layer, shape in shapes:  # layers already built by a forward pass keep their weights
            if not layer.built:
                layer.build(shape)
        self.built = True

    @property
    def is_attention(self):
        """True when the backbone outputs attention maps (Attention CoupleNet)."""
        return bool(self.attention_keys)

    @property
    def nms_backend(self):
        """``"combined"`` or ``"padded"``: :func:`~kerasdet.layers.postprocess.resolve_nms_method`
        of ``nms_method`` and the model's ``jit_compile`` (proposals and detections)."""
        return resolve_nms_method(self.nms_method, self.jit_compile)

    # --- forward ------------------------------------------------------------------------
    def rpn(self, feature):
        """``(objectness [B, A], deltas [B, A, 4], anchors [A, 4])`` on the RPN map."""
        logits, deltas, anchors = self.proposal_network.outputs([feature])
        return logits[0], deltas[0], anchors[0]

    def proposals(self, logits, deltas, anchors, image_shape, training=False):
        """``(boxes [B, K, 4], scores [B, K], valid [B, K])`` of :meth:`rpn`'s outputs; the
        padded NMS when :attr:`nms_backend` is ``"padded"``, else the proposal network's."""
        method = "padded" if self.nms_backend == "padded" else None
        return self.proposal_network.proposals(logits, deltas, anchors, image_shape=image_shape, training=training,
                                               nms_method=method)

    def head_maps(self, feature):
        """``(conv_new_1, class score maps, box maps)`` of the head feature map."""
        x = self.conv_new(feature)
        return x, self.cls_maps(x), self.box_maps(x)

    def roi_heads(self, maps, rois, image_shape):
        """Coupled class logits ``[B, R, C+1]`` and class-agnostic deltas ``[B, R, 4]`` of
        ``rois`` from :meth:`head_maps`' output."""
        x, cls_maps, box_maps = maps
        rois = tf.stop_gradient(tf.cast(rois, tf.float32))
        local_cls = tf.cast(self.psroi_cls(cls_maps, rois), tf.float32)
        local_box = tf.cast(self.psroi_box(box_maps, rois), tf.float32)
        if not self.global_branch:
            return local_cls, local_box
        pooled = self.roi_pool(x, rois)
        if self.context:
            pooled = tf.concat([pooled, self.roi_pool(x, context_boxes(rois, image_shape, scale=self.context_scale))],
                               axis=-1)
        global_cls, global_box = self.global_head(pooled)
        cls = self.coupling(local_cls, tf.cast(global_cls, tf.float32))
        return tf.cast(cls, tf.float32), local_box + tf.cast(global_box, tf.float32)

    def heads(self, feature, rois, image_shape, training=False):
        """Coupled class logits ``[B, R, C+1]`` and class-agnostic deltas ``[B, R, 4]``."""
        return self.roi_heads(self.head_maps(feature), rois, image_shape)

    def _roi_losses(self, logits, deltas, samples):
        """Per-RoI softmax CE and foreground smooth-L1 (summed over the 4 deltas), ``[B, R]``."""
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=samples["labels"], logits=logits)
        box = tf.reduce_sum(loss_ops.smooth_l1_loss(samples["box_targets"], deltas, beta=self.smooth_l1_beta), -1)
        return ce, box * tf.cast(samples["foreground"], tf.float32)

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

        feats = self.backbone(images, training=training)
        logits, deltas, anchors = self.rpn(feats[self.rpn_feature])
        logits, deltas = tf.cast(logits, tf.float32), tf.cast(deltas, tf.float32)
        rpn_cls, rpn_box = self.proposal_network.loss_terms(logits, deltas, anchors, gt_boxes, gt_classes,
                                                            gt_crowd=gt_crowd, seed=self.sampling_seed)

        proposals, _, valid = self.proposals(logits, deltas, anchors, image_shape, training=training)
        # Every proposal plus every ground truth (Caffe BATCH_SIZE -1): the quota covers them all.
        num_candidates = proposals.shape[1] + (gt_boxes.shape[1] or 0)
        samples = sample_rois(
            proposals, valid, gt_boxes, gt_classes, num_classes=self.num_classes, gt_crowd=gt_crowd,
            num_samples=num_candidates, foreground_fraction=1.0, foreground_iou=self.foreground_iou,
            background_iou_high=self.foreground_iou, background_iou_low=0.0, box_weights=self.box_weights,
            seed=self.sampling_seed,
        )
        maps = self.head_maps(feats[self.head_feature])
        sampled_rois = samples["weights"] > 0
        num_rois = samples["rois"].shape[1]
        if self.ohem_rois and self.ohem_rois < num_rois:
            # R-FCN's OHEM: a read-only pass scores every RoI (no gradient path: only the
            # top-k indices leave it), then the hardest are re-run and back-propagated.
            readonly = self._roi_losses(*self.roi_heads([tf.stop_gradient(m) for m in maps], samples["rois"],
                                                        image_shape), samples)
            index, kept = ohem_indices(readonly[0] + readonly[1], sampled_rois, num_keep=self.ohem_rois)
            samples = {k: tf.gather(v, index, batch_dims=1) for k, v in samples.items()}
            keep = tf.cast(kept, tf.float32)
        else:
            keep = tf.cast(sampled_rois, tf.float32)
        ce, box = self._roi_losses(*self.roi_heads(maps, samples["rois"], image_shape), samples)
        if self.ohem_rois:  # fixed normalizer: ohem_rois per image (Eq. 4: N = 128)
            roi_norm = loss_ops.global_normalizer(tf.cast(tf.shape(images)[0] * self.ohem_rois, tf.float32))
        else:
            roi_norm = loss_ops.global_normalizer(tf.reduce_sum(keep))
        terms = {
            "rpn_cls_loss": rpn_cls,
            "rpn_box_loss": rpn_box,
            "cls_loss": tf.reduce_sum(ce * keep) / roi_norm,
            "box_loss": tf.reduce_sum(box * keep) / roi_norm,
        }
        if self.is_attention:
            if "foreground" not in labels:
                raise ValueError(
                    "The backbone has attention maps but the labels carry no 'foreground' mask: build the data "
                    "with make_dataset(masks='union') (config input.masks = 'union')."
                )
            attention = loss_ops.attention_loss([feats[k] for k in self.attention_keys], labels["foreground"],
                                                threshold=self.attention_target_threshold)
            image_norm = loss_ops.global_normalizer(tf.cast(tf.shape(images)[0], tf.float32))
            terms["attention_loss"] = self.attention_weight * tf.cast(attention, tf.float32) / image_norm
        return terms

    # --- inference ----------------------------------------------------------------------
    def detect(self, images):
        """Decoded, per-class-NMS-filtered detections in network-input pixels."""
        images = tf.cast(images, tf.float32)
        shape = tf.shape(images)
        image_shape = (shape[1], shape[2])
        feats = self.backbone(images, training=False)
        logits, deltas, anchors = self.rpn(feats[self.rpn_feature])
        proposals, _, valid = self.proposals(logits, deltas, anchors, image_shape, training=False)
        class_logits, box_deltas = self.heads(feats[self.head_feature], proposals, image_shape, training=False)
        return two_stage_detections(  # class-agnostic deltas [B, R, 4]
            class_logits, box_deltas, proposals, valid, image_shape, box_weights=self.box_weights,
            nms_method=self.nms_backend, max_detections=self.max_detections, iou_threshold=self.nms_iou_threshold,
            score_threshold=self.score_threshold, pre_nms_topk=self.detections_pre_nms_topk,
        )


def couplenet(**kwargs):
    """``RFCN(global_branch=True, context=True, coupling_norm="conv", coupling_op="sum", ...)``:
    CoupleNet with the paper's best coupling (1x1 conv + sum, §IV-A, Table I; Attention CoupleNet: pass a backbone with
    ``attention_levels=(2, 3, 4)``)."""
    kwargs.setdefault("global_branch", True)
    return RFCN(**kwargs)


acouplenet = couplenet
