"""Spatial Memory Network (Chen & Gupta 2017, "Spatial Memory for Context Reasoning in Object Detection").

An iterative detector on top of a frozen C4 Faster R-CNN (``base``, a
:class:`~kerasdet.models.faster_rcnn.FasterRCNN` with ``architecture="c4"``):

1. The base runs once: backbone map (``conv5_3``), RPN objectness, proposals, the RoI head
   (fc7, class logits, class-specific boxes). Everything from the base is stop-gradient
   (Fig. 5(d): "the gradient to FRCNN stopped"; with ``freeze_base=True`` the base
   weights are also non-trainable, the stage-wise training of Sec. 5.4).
2. The memory ``S_0`` is the learned 20x20xD prior resized to the map
   (:class:`~kerasdet.layers.spatial_memory.MemoryPrior`).
3. Step ``n = 1`` uses the base logits alone (no memory weights in iteration 1). Steps
   ``n > 1`` run the context net on ``S_{n-1}`` (``m-conv5``) and ADD memory logits to the
   stop-gradient base logits: region level ``fc_b(relu(fc_a([fc7, m-fc7])))`` with
   ``m-fc7`` = crop-pool of ``m-conv5`` at the RoI + 2 fc; image level (RPN objectness)
   ``1x1(relu(1x1([rpn_conv, relu(3x3(m-conv5))])))`` (Fig. 4/5(d), Sec. 4.6).
4. Greedy selection: the most confident foreground (RoI, class) pair; its class-specific
   regressed box is written with the step's full softmax (stop-gradient) through the input
   module + ConvGRU + reverse-crop paste (:class:`~kerasdet.layers.spatial_memory.MemoryWrite`).
   ``selection="softmax"`` emits the chosen RoI for every class (its class-specific box
   and probability, the paper's final "S"), ``"hardmax"`` only the argmax class ("H").
   Nothing prevents re-selecting a region (faithful; App. A2: SMN "can learn to revisit the same region").

Training (``detection_losses``, BPTT over the ``num_steps`` unrolled steps; a Python loop
over the fixed N, everything else batched with static shapes):

* RoIs: the base's training proposals plus the ground-truth boxes (the Fast R-CNN
  convention; ground-truth rows are never *selected* for writing). Each step samples its
  own ``num_rois`` (labels change as objects get covered); the memory outputs are computed
  for those only, and the write is the model's own greedy pick AMONG THE SAMPLED RoIs
  (not teacher forcing, our reading of Sec. 5.2; step 1 samples too, with nothing covered
  yet). A ground truth is *covered* once a written box has IoU >= ``cover_iou`` (0.5,
  class-agnostic) with it.
* Flipped-label sampling (Sec. 5.2): at step ``n`` an RoI is positive (its class) if its
  best IoU with an UNCOVERED ground truth is >= 0.5, *flipped* (background) if instead it
  has IoU >= 0.5 with a covered one, negative if its best IoU is < 0.5. ``num_rois`` are
  sampled per image with ratio positive : flipped : negative = 1 : 1 : 2 (missing
  flipped / positives are filled with negatives). Anchors alike at 0.7 / 0.3 with
  2 : 1 : 1 of ``rpn_batch_size`` (no low-quality matches for the memory RPN).
* Losses (averaged over steps 2..N): ``mem_cls_loss`` (softmax CE of the fused logits),
  ``mem_rpn_loss`` (sigmoid CE of the fused objectness), and the reconstruction losses of
  §5.3 (weight ``reconstruction_weight`` = 1): a second, identical set of region / RPN
  branches on ``m-conv5`` whose targets are only the covered objects (their class;
  everything else background), on the same sampled RoIs / anchors.
* ``train_mode="final"`` trains the final inference mode (Sec. 6.1, "bootstrap from a N2=10
  SMN model"): the top N1 base detections are written first (no loss; the ground truths
  they hit are covered), then N2 memory steps with the losses above.

Inference (``inference``):

* ``"final"`` (Sec. 6.1, the default): the base's per-class-NMS detections, top
  ``num_base_writes`` (N1) in confidence order, are written to memory without
  memory-augmented prediction, then ``num_memory_steps`` (N2) SMN steps run on the fused
  scores; no NMS on the memory steps. The output is the N1 base detections plus the N2
  steps' emissions, ranked by score, scores >= ``score_threshold``, top
  ``max_detections``.
* ``"steps"`` (the ablation mode of Tables 1/3/4): ``num_steps`` steps from step 1, all
  emitted, no NMS anywhere.
* ``"base_topn"`` (a control): the top ``num_steps`` RoIs by base foreground score, emitted
  like a step, no NMS, no memory — what the greedy selection outputs without memory.

``context="mlp"`` is the paper's MLP control (Table 2): no spatial memory, no input
module/GRU/prior; the same 5-layer context net runs directly on ``conv5_3`` with the same
output modules (region + RPN residuals), trained in one step with the standard labels and
evaluated with the base's per-class NMS. Its parameter count is smaller than SMN's by the
input module + GRU + prior (the paper matches counts; here the difference is reported by
the benchmark rather than padded with extra layers).

Choices where the paper is silent (ours), besides those in layers/spatial_memory:
fixed RoIs (the base's proposals; the memory RPN output trains the memory and is not used
to re-rank proposals at test time); box regression stays the base's; the
written scores are the step's fused softmax (base softmax for the N1 writes, re-scored by
the base head at the detected box, since per-class NMS keeps only one class score);
default Keras initializers for the memory layers, the residual logits' last layers
N(0, 0.01) so training starts at the base's scores; fc7 and m-fc7 are each scaled to unit
RMS per RoI before the fusion (``fusion_norm="rms"``; Sec. 5.5 hand-tunes the init variances
"to let different inputs contribute comparably" and gives no values: a parameter-free
rescaling keeps that balance whatever the frozen base's scale).
"""
import copy

import keras
import numpy as np
import tensorflow as tf

from kerasdet import boxes as box_ops
from kerasdet import losses as loss_ops
from kerasdet.layers.postprocess import format_detections
from kerasdet.layers.roi_align import RoICropAndPool
from kerasdet.layers.spatial_memory import ContextNet, MemoryPrior, MemoryWrite
from kerasdet.models.base import Detector, json_like
from kerasdet.sampling import kth_largest, random_uniform

CONTEXTS = ("memory", "mlp")
SELECTIONS = ("softmax", "hardmax")
INFERENCE_MODES = ("final", "steps", "base_topn", "base")
TRAIN_MODES = ("steps", "final")
FUSION_NORMS = ("rms", "none")


def sample_groups(groups, quotas, num_samples, seed=None):
    """Random fixed-size sampling from disjoint candidate groups with quotas, batched.

    Args:
        groups: list of ``[B, N]`` bool masks (disjoint), e.g. (positive, flipped, negative).
        quotas: one int per group except the last: at most that many of each; the last
            group fills the rest up to ``num_samples``.
    Returns:
        List of ``[B, N]`` bool sampled masks, one per group.
    """
    rand = random_uniform(tf.shape(groups[0]), 0.0, 1.0, seed=seed)
    taken = tf.zeros(tf.shape(groups[0])[:1], tf.int32)
    out = []
    for i, group in enumerate(groups):
        quota = quotas[i] if i < len(quotas) else None
        count = tf.reduce_sum(tf.cast(group, tf.int32), axis=1)
        room = num_samples - taken
        n = tf.minimum(count, room if quota is None else tf.minimum(quota, room))
        scores = tf.where(group, rand, -1.0)
        sel = group & (scores >= kth_largest(scores, n)[:, None])
        out.append(sel)
        taken = taken + n
    return out


def balance_rms(x, epsilon=1e-6):
    """``x / sqrt(mean(x^2 over the last axis) + epsilon)``: unit root-mean-square rows (the
    parameter-free balance of fc7 and m-fc7 before SMN's fusion, ``fusion_norm="rms"``)."""
    x = tf.cast(x, tf.float32)
    return x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), axis=-1, keepdims=True) + epsilon)


def _best(iou, mask):
    """Max IoU and argmax over the ground truths where ``mask`` ([B, 1, G] or [B, G])."""
    masked = tf.where(mask, iou, -1.0)
    return tf.reduce_max(masked, axis=-1), tf.argmax(masked, axis=-1, output_type=tf.int32)


def _pool_and_fcs(roi_layer, feat, rois, fcs):
    """RoI-pool ``feat`` at ``rois`` ``[B, R, 4]``, flatten each RoI, run the fc stack:
    ``(x [B * R, F], B, R)``."""
    pooled = roi_layer([feat], rois)
    flat = 1
    for dim in pooled.shape[2:]:
        flat *= int(dim)
    x = tf.reshape(pooled, [-1, flat])
    for fc in fcs:
        x = fc(x)
    return x, tf.shape(rois)[0], rois.shape[1]


@keras.saving.register_keras_serializable(package="kerasdet")
class SMN(Detector):
    """Spatial Memory Network on a frozen C4 Faster R-CNN (see the module docstring).

    Args (keyword-only):
        base: the C4 :class:`FasterRCNN` (or its serialized config).
        context: ``"memory"`` (SMN) or ``"mlp"`` (the paper's MLP control).
        num_steps: N, the unrolled steps in training and in ``inference="steps"``. 10.
        num_base_writes, num_memory_steps: N1 / N2 of the final inference mode. 50 / 10.
        inference: ``"final"``, ``"steps"``, ``"base_topn"`` or ``"base"`` (the base's own
            per-class-NMS detections, no memory: the baseline of the context claims).
        train_mode: ``"steps"`` (N unrolled steps from step 1, the curriculum stages) or
            ``"final"`` (the final inference mode trained the paper's way, Sec. 6.1: "we set
            N1=50 and bootstrap from a N2=10 SMN model": the top ``num_base_writes`` base
            per-class-NMS detections are written first, covering what they hit, then
            ``num_memory_steps`` memory steps carry the losses). ``"steps"``.
        fusion_norm: how fc7 and m-fc7 are balanced before ``fuse_a`` (Sec. 5.5: "different
            variances are manually set when initializing weights ... to let different
            inputs contribute comparably (e.g. when concatenating fc7 and m-fc7)"; the
            variances themselves are not given). ``"rms"`` (ours, the default): each side
            divided by its root-mean-square over its channels per RoI (no parameters), so
            both enter ``fuse_a`` at unit RMS whatever the frozen base's scale; ``"none"``:
            the plain concatenation (configs saved before this option load as ``"none"``).
        selection: ``"softmax"`` (S) or ``"hardmax"`` (H).
        memory_channels: D = 256. prior_size: 20. crop_size: 14 (the write's crop).
        gate_channels: ConvGRU gate width (None = D; 1 = iter-reason).
        context_layers: 5. memory_rpn_channels: 512. memory_fc_dim: 2048. fusion_dim: 2048.
        memory_roi_crop, memory_roi_pool: the RoI crop of ``m-conv5`` (default: the base's
            crop pool, 14 -> 7).
        num_rois, roi_fractions: RoIs sampled per image and step (256) with the positive and
            flipped fractions (0.25, 0.25: the paper's 1 : 1 : 2); the memory outputs,
            losses and the training-time greedy pick use only these RoIs.
        rpn_batch_size, rpn_fractions: anchors per image and step (256), (0.5, 0.25): 2 : 1 : 1.
        cover_iou: 0.5. rpn_positive_iou / rpn_negative_iou: 0.7 / 0.3.
        reconstruction_weight: 1.0.
        score_threshold, max_detections: output filter (0.05, 100).
        freeze_base: make the base non-trainable (stage 2 of the stage-wise training). True.
        mlp_channels: width of the MLP control's context net (``context="mlp"`` only; None =
            ``memory_channels``). :func:`matched_mlp_channels` picks the width that gives the
            MLP control SMN's inference-time parameter count, as in the paper's Table 2.
        weight_decay: coupled L2 on the trainable (memory) kernels.
        bounding_box_format: format of the label boxes given to ``fit``/``evaluate`` and of
            the boxes ``predict`` returns. Default ``"yxyx"`` (network-input pixels); see
            :class:`~kerasdet.models.base.Detector`.
    """

    LOSS_NAMES = ("mem_cls_loss", "mem_rpn_loss", "recon_cls_loss", "recon_rpn_loss")

    def __init__(
        self,
        *,
        base,
        context="memory",
        num_steps=10,
        num_base_writes=50,
        num_memory_steps=10,
        inference="final",
        selection="softmax",
        train_mode="steps",
        fusion_norm="rms",
        memory_channels=256,
        prior_size=20,
        crop_size=14,
        gate_channels=None,
        context_layers=5,
        memory_roi_crop=None,
        memory_roi_pool=None,
        memory_rpn_channels=512,
        memory_fc_dim=2048,
        fusion_dim=2048,
        num_rois=256,
        roi_fractions=(0.25, 0.25),
        rpn_batch_size=256,
        rpn_fractions=(0.5, 0.25),
        cover_iou=0.5,
        rpn_positive_iou=0.7,
        rpn_negative_iou=0.3,
        reconstruction_weight=1.0,
        score_threshold=0.05,
        max_detections=100,
        freeze_base=True,
        mlp_channels=None,
        weight_decay=5e-4,
        **kwargs,
    ):
        super().__init__(weight_decay=weight_decay, **kwargs)
        if context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if inference not in INFERENCE_MODES:
            raise ValueError(f"inference must be one of {INFERENCE_MODES}, got {inference!r}")
        if train_mode not in TRAIN_MODES:
            raise ValueError(f"train_mode must be one of {TRAIN_MODES}, got {train_mode!r}")
        if fusion_norm not in FUSION_NORMS:
            raise ValueError(f"fusion_norm must be one of {FUSION_NORMS}, got {fusion_norm!r}")
        if train_mode == "final" and context != "memory":
            raise ValueError("train_mode='final' needs context='memory' (the MLP control has no memory to write)")
        if isinstance(base, dict):
            base = keras.saving.deserialize_keras_object(base)
        if getattr(base, "architecture", None) != "c4":
            raise ValueError("SMN needs a C4 FasterRCNN base (architecture='c4').")
        self.base = base
        self.freeze_base = bool(freeze_base)
        if self.freeze_base:
            self.base.trainable = False
        self.num_classes = base.num_classes
        self.context = context
        self.num_steps = int(num_steps)
        self.num_base_writes = int(num_base_writes)
        self.num_memory_steps = int(num_memory_steps)
        self.inference = inference
        self.selection = selection
        self.train_mode = train_mode
        self.fusion_norm = fusion_norm
        self.level = base.min_level
        self.stride = 2 ** self.level
        self.num_rois = int(num_rois)
        self.roi_fractions = tuple(float(f) for f in roi_fractions)
        self.rpn_batch_size = int(rpn_batch_size)
        self.rpn_fractions = tuple(float(f) for f in rpn_fractions)
        self.cover_iou = float(cover_iou)
        self.rpn_positive_iou = float(rpn_positive_iou)
        self.rpn_negative_iou = float(rpn_negative_iou)
        self.reconstruction_weight = float(reconstruction_weight)
        self.score_threshold = float(score_threshold)
        self.max_detections = int(max_detections)
        d = int(memory_channels)
        k1 = self.num_classes + 1
        num_anchors = base.num_anchors
        small = keras.initializers.RandomNormal(stddev=0.01)

        if context == "memory":
            self.prior = MemoryPrior(channels=d, prior_size=prior_size, name="memory_prior")
            self.writer = MemoryWrite(channels=d, stride=self.stride, crop_size=crop_size,
                                      gate_channels=gate_channels, name="memory_write")
        width = d if (context == "memory" or mlp_channels is None) else int(mlp_channels)
        self.context_net = ContextNet(channels=width, num_layers=context_layers, name="context_net")
        roi_crop = base.roi_pool_sizes[0] if memory_roi_crop is None else int(memory_roi_crop)
        roi_pool = base.roi_pool_sizes[1] if memory_roi_pool is None else int(memory_roi_pool)
        self.mem_roi = RoICropAndPool(crop_size=roi_crop, pool_size=roi_pool, min_level=self.level,
                                      max_level=self.level, name="memory_roi")

        def fc_stack(prefix):
            return [keras.layers.Dense(memory_fc_dim, activation="relu", name=f"{prefix}_fc{i + 6}") for i in range(2)]

        self.mem_fcs = fc_stack("m")
        self.fuse_a = keras.layers.Dense(fusion_dim, activation="relu", name="fuse_a")
        self.fuse_b = keras.layers.Dense(k1, kernel_initializer=small, name="fuse_b")
        self.mem_rpn_conv = keras.layers.Conv2D(memory_rpn_channels, 3, padding="same", activation="relu",
                                                name="m_rpn_conv")
        self.rpn_fuse = keras.layers.Conv2D(memory_rpn_channels, 1, activation="relu", name="rpn_fuse")
        self.rpn_res = keras.layers.Conv2D(num_anchors, 1, kernel_initializer=small, name="rpn_residual")
        if context == "memory":  # reconstruction branches (Sec. 5.3)
            self.rec_fcs = fc_stack("rec")
            self.rec_cls = keras.layers.Dense(k1, kernel_initializer=small, name="rec_cls")
            self.rec_rpn_conv = keras.layers.Conv2D(memory_rpn_channels, 3, padding="same", activation="relu",
                                                    name="rec_rpn_conv")
            self.rec_rpn = keras.layers.Conv2D(num_anchors, 1, kernel_initializer=small, name="rec_rpn")
        self._config = dict(
            context=context, num_steps=self.num_steps, num_base_writes=self.num_base_writes,
            num_memory_steps=self.num_memory_steps, inference=inference, selection=selection,
            train_mode=train_mode, fusion_norm=fusion_norm,
            memory_channels=d, prior_size=int(prior_size), crop_size=int(crop_size),
            gate_channels=None if gate_channels is None else int(gate_channels), context_layers=int(context_layers),
            memory_roi_crop=None if memory_roi_crop is None else int(memory_roi_crop),
            memory_roi_pool=None if memory_roi_pool is None else int(memory_roi_pool),
            memory_rpn_channels=int(memory_rpn_channels), memory_fc_dim=int(memory_fc_dim),
            fusion_dim=int(fusion_dim), num_rois=self.num_rois, roi_fractions=list(self.roi_fractions),
            rpn_batch_size=self.rpn_batch_size, rpn_fractions=list(self.rpn_fractions), cover_iou=self.cover_iou,
            rpn_positive_iou=self.rpn_positive_iou, rpn_negative_iou=self.rpn_negative_iou,
            reconstruction_weight=self.reconstruction_weight, score_threshold=self.score_threshold,
            max_detections=self.max_detections, freeze_base=self.freeze_base,
            mlp_channels=None if mlp_channels is None else int(mlp_channels),
        )

    # --- config -------------------------------------------------------------------------
    def get_config(self):
        """:class:`Detector`'s fields and the base :class:`FasterRCNN`, serialized nested
        (its config, its backbone's and its build config: ``load_model`` rebuilds it)."""
        config = super().get_config()
        config["base"] = json_like(keras.saving.serialize_keras_object(self.base))
        return config

    @classmethod
    def from_config(cls, config):
        config = copy.deepcopy(config)  # deserialization consumes nested dicts
        config.setdefault("fusion_norm", "none")  # saved before the option: the plain concatenation
        if isinstance(config.get("base"), dict):
            config["base"] = keras.saving.deserialize_keras_object(config["base"])
        return cls(**config)

    def build(self, input_shape=None):
        if self.built:
            return
        size = max(4 * self.stride, 32)
        self.base.build((None, size, size, 3))
        images = tf.zeros((1, size, size, 3), tf.float32)
        self.detect(images)
        labels = {"boxes": tf.constant([[[0.0, 0.0, size / 2, size / 2]]]), "classes": tf.constant([[0]])}
        self.detection_losses(images, labels, training=False)  # creates the reconstruction weights
        self.built = True

    def call(self, images, training=False):
        return self.detect(images)

    # --- base (frozen) ------------------------------------------------------------------
    def _base_pass(self, images, training):
        base = self.base
        images = tf.cast(images, tf.float32)
        shape = tf.shape(images)
        image_shape = (shape[1], shape[2])
        feat = tf.stop_gradient(base.features(images, training=False)[0])
        rpn_logits, rpn_deltas, anchors = base.rpn([feat])
        proposals, _, valid = base.proposals(rpn_logits, rpn_deltas, anchors, image_shape, training=training)
        return {
            "feat": feat, "image_shape": image_shape, "proposals": proposals, "valid": valid,
            "rpn_logits": tf.stop_gradient(tf.cast(tf.concat(rpn_logits, axis=1), tf.float32)),
            "rpn_feat": tf.stop_gradient(base.rpn_features(feat)),
            "anchors": tf.concat(anchors, axis=0),
        }

    def _base_heads(self, feat, rois, image_shape):
        """fc7 ``[B, R, F]``, logits ``[B, R, K+1]``, clipped class boxes ``[B, R, K, 4]``."""
        fc7, logits, deltas = self.base.box_head_outputs([feat], rois, training=False)
        boxes = self.base.decode_boxes(deltas, rois, image_shape)
        return tf.stop_gradient(fc7), tf.stop_gradient(logits), tf.stop_gradient(boxes)

    # --- memory outputs -----------------------------------------------------------------
    def _context_map(self, memory_or_feat):
        return self.context_net(memory_or_feat)

    def _region(self, fcs, m, rois):
        return _pool_and_fcs(self.mem_roi, m, rois, fcs)

    def _memory_logits(self, m, base, fc7, rois):
        """Residual class logits ``[B, R, K+1]`` and objectness ``[B, A]`` from ``m-conv5``."""
        x, batch, num = self._region(self.mem_fcs, m, rois)
        fc7 = tf.reshape(fc7, [-1, fc7.shape[-1]])
        if self.fusion_norm == "rms":
            fc7, x = balance_rms(fc7), balance_rms(x)
        fused = self.fuse_b(self.fuse_a(tf.concat([fc7, x], axis=-1)))
        cls = tf.reshape(tf.cast(fused, tf.float32), [batch, num, self.num_classes + 1])
        r = self.rpn_res(self.rpn_fuse(tf.concat([base["rpn_feat"], self.mem_rpn_conv(m)], axis=-1)))
        rpn = tf.reshape(tf.cast(r, tf.float32), [batch, -1])
        return cls, rpn

    def _reconstruction_logits(self, m, rois):
        x, batch, num = self._region(self.rec_fcs, m, rois)
        cls = tf.reshape(tf.cast(self.rec_cls(x), tf.float32), [batch, num, self.num_classes + 1])
        rpn = tf.reshape(tf.cast(self.rec_rpn(self.rec_rpn_conv(m)), tf.float32), [batch, -1])
        return cls, rpn

    # --- selection / writing ------------------------------------------------------------
    def _select(self, probs, boxes, selectable):
        """Greedy pick of the most confident foreground (RoI, class) pair.

        Returns ``(box [B, 4], dist [B, K+1], emit_boxes [B, E, 4], emit_scores [B, E],
        emit_classes [B, E])`` with ``E = K`` (softmax) or 1 (hardmax)."""
        k = self.num_classes
        fg = tf.where(selectable[..., None], probs[..., 1:], -1.0)  # [B, R, K]
        flat = tf.reshape(fg, [tf.shape(fg)[0], -1])
        index = tf.argmax(flat, axis=-1, output_type=tf.int32)
        roi, cls = index // k, index % k
        roi_boxes = tf.gather(boxes, roi, batch_dims=1)  # [B, K, 4]
        dist = tf.gather(probs, roi, batch_dims=1)  # [B, K+1]
        box = tf.gather(roi_boxes, cls, batch_dims=1)  # [B, 4]
        any_valid = tf.reduce_any(selectable, axis=1)
        if self.selection == "softmax":
            emit_boxes, emit_scores = roi_boxes, dist[:, 1:]
            emit_classes = tf.tile(tf.range(k)[None], [tf.shape(dist)[0], 1])
        else:
            emit_boxes = box[:, None]
            emit_scores = tf.gather(dist[:, 1:], cls, batch_dims=1)[:, None]
            emit_classes = cls[:, None]
        emit_scores = tf.where(any_valid[:, None], emit_scores, 0.0)
        return tf.stop_gradient(box), tf.stop_gradient(dist), emit_boxes, tf.stop_gradient(emit_scores), emit_classes

    def _write(self, memory, feat, box, dist, mask=None):
        new = self.writer(memory, feat, box, dist)
        if mask is None:
            return new
        return tf.where(mask[:, None, None, None], new, memory)

    # --- training -----------------------------------------------------------------------
    def _labels(self, iou, gt_classes, gt_valid, covered, fg_iou, bg_iou):
        """Per-candidate (pos, flipped, neg, label, recon_label) under the covered set."""
        unc_max, unc_arg = _best(iou, (gt_valid & ~covered)[:, None, :])
        cov_max, cov_arg = _best(iou, (gt_valid & covered)[:, None, :])
        all_max = tf.maximum(unc_max, cov_max)
        pos = unc_max >= fg_iou
        flipped = ~pos & (cov_max >= fg_iou)
        neg = (all_max < bg_iou) & (all_max >= 0.0)
        label = tf.where(pos, tf.gather(gt_classes, unc_arg, batch_dims=1) + 1, 0)
        recon = tf.where(cov_max >= fg_iou, tf.gather(gt_classes, cov_arg, batch_dims=1) + 1, 0)
        return pos, flipped, neg, label, recon

    def detection_losses(self, images, labels, training):
        gt_boxes = tf.cast(labels["boxes"], tf.float32)
        gt_classes = tf.cast(labels["classes"], tf.int32)
        gt_valid = gt_classes >= 0
        gt_classes = tf.maximum(gt_classes, 0)
        base = self._base_pass(images, training)
        feat, image_shape = base["feat"], base["image_shape"]
        rois = tf.concat([base["proposals"], gt_boxes], axis=1)
        roi_valid = tf.concat([base["valid"], gt_valid], axis=1)
        selectable = tf.concat([base["valid"], tf.zeros_like(gt_valid)], axis=1)
        fc7, base_logits, class_boxes = self._base_heads(feat, rois, image_shape)
        roi_iou = box_ops.iou(rois, gt_boxes)  # [B, R, G]
        anchor_iou = box_ops.iou(base["anchors"][None], gt_boxes)  # [B, A, G]
        covered = tf.zeros_like(gt_valid)
        totals = {name: tf.constant(0.0) for name in self.LOSS_NAMES}
        num_sampled = min(self.num_rois, rois.shape[1])
        q_roi = [int(self.num_rois * f) for f in self.roi_fractions]
        q_rpn = [int(self.rpn_batch_size * f) for f in self.rpn_fractions]

        if self.context == "mlp":
            steps = [0]  # one memory-free pass with the standard labels
        elif self.train_mode == "final":
            # Sec. 6.1 trained: the top N1 base detections (per-class NMS over the training
            # proposals) are written in confidence order, covering what they hit; the N2
            # memory steps that follow carry the losses
            num_proposals = tf.shape(base["proposals"])[1]  # rois = [proposals, ground truth]
            memory, covered = self._write_base_detections(
                feat, base, base_logits[:, :num_proposals], class_boxes[:, :num_proposals], gt_boxes, gt_valid,
                image_shape)
            steps = [2] * self.num_memory_steps
        else:
            steps = range(1, self.num_steps + 1)
            memory = self.prior(feat)
        num_loss_steps = 0
        steps = list(steps)
        for j, n in enumerate(steps):
            # RoIs of this step: positive / flipped / negative under the covered set, 1:1:2
            pos, flip, neg, label, recon = self._labels(roi_iou, gt_classes, gt_valid, covered, 0.5, 0.5)
            s_pos, s_flip, s_neg = sample_groups([pos & roi_valid, flip & roi_valid, neg & roi_valid], q_roi,
                                                 self.num_rois, seed=self.sampling_seed)
            sampled = s_pos | s_flip | s_neg
            _, index = tf.math.top_k(tf.cast(sampled, tf.float32), k=num_sampled)  # sampled first
            take = lambda t: tf.gather(t, index, batch_dims=1)  # noqa: E731
            w = tf.cast(take(sampled), tf.float32)
            s_rois, s_logits, s_boxes = take(rois), take(base_logits), take(class_boxes)
            if n == 1:
                logits = s_logits  # iteration 1: the base alone, no memory weights
            else:
                m = self._context_map(feat if self.context == "mlp" else memory)
                res_cls, res_rpn = self._memory_logits(m, base, take(fc7), s_rois)
                logits = s_logits + res_cls
                norm = loss_ops.global_normalizer(tf.reduce_sum(w))
                ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=take(label), logits=logits)
                step = {"mem_cls_loss": tf.reduce_sum(ce * w) / norm}
                a_pos, a_flip, a_neg, _, a_recon = self._labels(
                    anchor_iou, gt_classes, gt_valid, covered, self.rpn_positive_iou, self.rpn_negative_iou)
                sa = sample_groups([a_pos, a_flip, a_neg], q_rpn, self.rpn_batch_size, seed=self.sampling_seed)
                wa = tf.cast(sa[0] | sa[1] | sa[2], tf.float32)
                norm_a = loss_ops.global_normalizer(tf.reduce_sum(wa))
                bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(sa[0], tf.float32),
                                                              logits=base["rpn_logits"] + res_rpn)
                step["mem_rpn_loss"] = tf.reduce_sum(bce * wa) / norm_a
                if self.context == "memory":
                    rec_cls, rec_rpn = self._reconstruction_logits(m, s_rois)
                    rce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=take(recon), logits=rec_cls)
                    rbce = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(a_recon > 0, tf.float32),
                                                                   logits=rec_rpn)
                    step["recon_cls_loss"] = self.reconstruction_weight * tf.reduce_sum(rce * w) / norm
                    step["recon_rpn_loss"] = self.reconstruction_weight * tf.reduce_sum(rbce * wa) / norm_a
                for name, value in step.items():
                    totals[name] = totals[name] + value
                num_loss_steps += 1
            if self.context == "memory" and j < len(steps) - 1:
                # the model's own greedy pick among this step's sampled (non-ground-truth) RoIs
                probs = tf.stop_gradient(tf.nn.softmax(logits, axis=-1))
                box, dist, _, _, _ = self._select(probs, s_boxes, take(selectable) & (w > 0))
                hit = (box_ops.iou(box[:, None], gt_boxes)[:, 0] >= self.cover_iou) & gt_valid
                covered = covered | hit
                memory = self._write(memory, feat, box, dist)
        return {name: value / float(max(num_loss_steps, 1)) for name, value in totals.items()}

    def _write_base_detections(self, feat, base, logits, class_boxes, gt_boxes, gt_valid, image_shape):
        """Training ``train_mode="final"``: the memory after the top ``num_base_writes`` base
        detections (per-class NMS of the base softmax ``logits`` / ``class_boxes`` over the
        proposals, confidence order, each re-scored by the base head at its box as in the final
        inference mode) and the ground truths they cover (IoU >= ``cover_iou``):
        ``(memory, covered [B, G])``."""
        dets = self._base_nms(tf.nn.softmax(logits, axis=-1), class_boxes, base["valid"], image_shape,
                              self.num_base_writes)
        det_boxes = tf.stop_gradient(dets["boxes"])
        _, det_logits, _ = self._base_heads(feat, det_boxes, image_shape)
        det_probs = tf.nn.softmax(det_logits, axis=-1)
        written = tf.range(self.num_base_writes)[None] < dets["num_detections"][:, None]  # [B, N1]
        hits = (box_ops.iou(det_boxes, gt_boxes) >= self.cover_iou) & written[..., None] & gt_valid[:, None, :]
        covered = tf.reduce_any(hits, axis=1)
        memory = self.prior(feat)
        for i in range(self.num_base_writes):  # N1 fixed: the unrolled writes of the final mode
            memory = self._write(memory, feat, det_boxes[:, i], det_probs[:, i], written[:, i])
        return memory, covered

    # --- inference ----------------------------------------------------------------------
    def _emit_final(self, boxes, scores, classes):
        """Top ``max_detections`` of the concatenated emissions (no NMS)."""
        scores = tf.where(scores >= self.score_threshold, scores, -1.0)
        k = min(self.max_detections, scores.shape[1])
        top, index = tf.math.top_k(scores, k=k)
        out_boxes = tf.gather(boxes, index, batch_dims=1)
        out_classes = tf.gather(classes, index, batch_dims=1)
        valid = tf.reduce_sum(tf.cast(top >= 0.0, tf.int32), axis=1)
        if k < self.max_detections:
            pad = self.max_detections - k
            out_boxes = tf.pad(out_boxes, [[0, 0], [0, pad], [0, 0]])
            top = tf.pad(top, [[0, 0], [0, pad]], constant_values=-1.0)
            out_classes = tf.pad(out_classes, [[0, 0], [0, pad]], constant_values=-1)
        return format_detections(out_boxes, tf.maximum(top, 0.0), out_classes, valid, self.max_detections)

    def _base_nms(self, probs, class_boxes, valid, image_shape, max_detections):
        return self.base.filter_detections(probs, class_boxes, valid, image_shape, max_detections=max_detections,
                                           nms_method="combined")

    def detect(self, images):
        base = self._base_pass(images, training=False)
        feat, image_shape, rois, valid = base["feat"], base["image_shape"], base["proposals"], base["valid"]
        fc7, base_logits, class_boxes = self._base_heads(feat, rois, image_shape)
        base_probs = tf.nn.softmax(base_logits, axis=-1)
        if self.context == "mlp":
            res_cls, _ = self._memory_logits(self._context_map(feat), base, fc7, rois)
            probs = tf.nn.softmax(base_logits + res_cls, axis=-1)
            return self._base_nms(probs, class_boxes, valid, image_shape, self.max_detections)
        if self.inference == "base":
            return self._base_nms(base_probs, class_boxes, valid, image_shape, self.max_detections)
        if self.inference == "base_topn":
            fg = tf.where(valid[..., None], base_probs[..., 1:], -1.0)
            n = min(self.num_steps, rois.shape[1])
            _, top = tf.math.top_k(tf.reduce_max(fg, axis=-1), k=n)
            k = self.num_classes
            boxes = tf.reshape(tf.gather(class_boxes, top, batch_dims=1), [-1, n * k, 4])
            scores = tf.reshape(tf.gather(base_probs[..., 1:], top, batch_dims=1), [-1, n * k])
            scores = scores * tf.reshape(tf.cast(tf.gather(valid, top, batch_dims=1), tf.float32)[..., None]
                                         * tf.ones([1, 1, k]), [-1, n * k])
            classes = tf.tile(tf.range(k)[None], [tf.shape(scores)[0], n])
            return self._emit_final(boxes, scores, classes)

        emissions, _ = self._memory_inference(base, fc7, base_logits, base_probs, class_boxes)
        return self._emit_final(*emissions)

    def _memory_inference(self, base, fc7, base_logits, base_probs, class_boxes):
        """The ``final`` / ``steps`` loops: ``((boxes, scores, classes), memory states)``."""
        feat, image_shape, rois, valid = base["feat"], base["image_shape"], base["proposals"], base["valid"]
        memory = self.prior(feat)
        states = [memory]
        out_boxes, out_scores, out_classes = [], [], []
        if self.inference == "final":
            dets = self._base_nms(base_probs, class_boxes, valid, image_shape, self.num_base_writes)
            out_boxes.append(dets["boxes"])
            out_scores.append(dets["scores"])
            out_classes.append(dets["classes"])
            _, det_logits, _ = self._base_heads(feat, dets["boxes"], image_shape)
            det_probs = tf.nn.softmax(det_logits, axis=-1)
            for i in range(self.num_base_writes):
                memory = self._write(memory, feat, dets["boxes"][:, i], det_probs[:, i], dets["num_detections"] > i)
                states.append(memory)
            steps = [2] * self.num_memory_steps  # every step reads a written memory
        else:
            steps = list(range(1, self.num_steps + 1))
        for j, n in enumerate(steps):
            if n == 1:
                probs = base_probs
            else:
                res_cls, _ = self._memory_logits(self._context_map(memory), base, fc7, rois)
                probs = tf.nn.softmax(base_logits + res_cls, axis=-1)
            box, dist, e_boxes, e_scores, e_classes = self._select(probs, class_boxes, valid)
            out_boxes.append(e_boxes)
            out_scores.append(e_scores)
            out_classes.append(e_classes)
            if j < len(steps) - 1:
                memory = self._write(memory, feat, box, dist)
                states.append(memory)
        emissions = (tf.concat(out_boxes, axis=1), tf.concat(out_scores, axis=1), tf.concat(out_classes, axis=1))
        return emissions, states

    def memory_states(self, images):
        """The memory after each write of the current ``inference`` mode (``S_0`` first):
        a list of ``[B, H', W', D]`` tensors (for tests and visualisation)."""
        if self.context != "memory" or self.inference in ("base_topn", "base"):
            raise ValueError("memory_states needs context='memory' and inference 'final' or 'steps'")
        base = self._base_pass(images, training=False)
        fc7, base_logits, class_boxes = self._base_heads(base["feat"], base["proposals"], base["image_shape"])
        _, states = self._memory_inference(base, fc7, base_logits, tf.nn.softmax(base_logits, -1), class_boxes)
        return states

    def configure(self, **changes):
        """Changes run-time settings (``num_steps``, ``inference``, ``selection``,
        ``num_base_writes``, ``num_memory_steps``, ``score_threshold``, ``max_detections``,
        ``train_mode``)
        and drops the compiled train/test/predict functions so the next call retraces
        (the curriculum N = 2 -> 5 -> 10, switching inference modes)."""
        allowed = {"num_steps", "inference", "selection", "num_base_writes", "num_memory_steps",
                   "score_threshold", "max_detections", "train_mode"}
        for key, value in changes.items():
            if key not in allowed:
                raise ValueError(f"configure: {key!r} is not a run-time setting ({sorted(allowed)})")
            if key == "inference" and value not in INFERENCE_MODES:
                raise ValueError(f"inference must be one of {INFERENCE_MODES}, got {value!r}")
            if key == "train_mode" and (value not in TRAIN_MODES or (value == "final" and self.context != "memory")):
                raise ValueError(f"train_mode must be one of {TRAIN_MODES} ('final' needs context='memory'), "
                                 f"got {value!r}")
            if key == "selection" and value not in SELECTIONS:
                raise ValueError(f"selection must be one of {SELECTIONS}, got {value!r}")
            value = float(value) if key == "score_threshold" else value
            if key in ("num_steps", "num_base_writes", "num_memory_steps", "max_detections"):
                value = int(value)
            setattr(self, key, value)
            self._config[key] = value
        self.train_function = self.test_function = self.predict_function = None
        return self



def inference_parameters(model):
    """Parameters an SMN / MLP control adds to its base at inference: every weight outside
    the base, minus the training-only reconstruction branches (``rec_*``)."""
    base_ids = {id(v) for v in model.base.weights}
    total = 0
    for v in model.weights:
        if id(v) in base_ids or any(part.startswith("rec_") for part in v.path.split("/")):
            continue
        total += int(np.prod(v.shape))
    return total


def matched_mlp_channels(base, input_shape, **smn_args):
    """The MLP control's context-net width whose inference-time parameter count
    (:func:`inference_parameters`) is closest to SMN's for the same arguments (the paper's
    Table 2: "the same number of parameters"). Builds the models; returns
    ``(channels, smn_params, mlp_params)``."""
    smn_args = {k: v for k, v in smn_args.items() if k not in ("context", "mlp_channels")}

    def count(context, channels=None):
        model = SMN(base=base, context=context, mlp_channels=channels, **smn_args)
        model.build(input_shape)
        return inference_parameters(model)

    target = count("memory")
    lo, hi = 1, 4 * int(smn_args.get("memory_channels", 256))
    while lo < hi:  # the count grows with the width: smallest width with count >= target
        mid = (lo + hi) // 2
        if count("mlp", mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    best = min({max(1, lo - 1), lo}, key=lambda c: abs(count("mlp", c) - target))
    return best, target, count("mlp", best)
