"""FPN mask proposals: dense DeepMask-style segment proposals on a feature pyramid (T.-Y. Lin,
"Detecting Common Objects in Context", Cornell 2017 thesis, §4.6, Fig. 4.4, Table 4.6; the
same chapter as Lin et al., "Feature Pyramid Networks for Object Detection", CVPR 2017).

**Architecture** (§4.6): the feature pyramid of §4.5.1 (:class:`~kerasdet.layers.fpn.FeaturePyramid`,
P2-P6, P6 a stride-2 subsampling of P5) with ``d = 128``; on every level the same small MLP
(shared across levels) reads a 5x5 window of the level and predicts a 14x14 mask and an
objectness score, fully convolutionally; a second MLP on 7x7 windows (``7 ~ 5 sqrt 2``)
handles the half octaves ("the two MLPs play a similar role as anchors in RPN"). Each MLP is
a ``k x k`` convolution to ``hidden = 512`` channels + ReLU and two sibling fully connected
layers on that vector: the ``m^2`` mask logits and one score logit (``mask_size`` m = 14, or
28 for the "2x mask resolution" row of Table 4.6). The thesis' appendix with the details is
not part of the text; everything below that §4.6 does not state is our choice, written so
that it follows the DeepMask framework §4.6 says it adopts ("following the DeepMask/
SharpMask framework"), and is a keyword argument:

* **Scales.** An object's scale is the larger side of its box (DeepMask's). MLP ``j`` (of
  ``n`` MLPs) on level ``P_k`` handles the canonical scale ``canonical_size x 2^(k -
  min_level) x 2^(j / n)``: 32, 64, ..., 512 px for the 5x5 MLP on P2-P6 (8x the stride, the
  RPN's anchor sizes of §4.4.1) and ``sqrt 2`` times that for the 7x7 MLP. The scale index
  ``t = n (k - min_level) + j`` of a window and ``u = n log2(scale / canonical_size)``
  (clamped to the covered range) of an object place both on one log axis, half an octave a
  step with two MLPs.
* **Windows.** A window at cell ``(i, j)`` of ``P_k`` is centred at ``((i + 0.5) 2^k, (j +
  0.5) 2^k)``; its mask covers a square of ``mask_region x`` its canonical scale around that
  centre (1.25: 25% padding around the canonical object, so objects up to half a step
  larger still fit; the light vs dark orange squares of Fig. 4.4).
* **Targets.** A window is *positive* for an object whose centre (box centre) lies within
  ``center_range`` cells (``center_range x 2^k`` px, each axis) of the window's centre and
  whose ``u`` is within half a step of the window's ``t`` (the nearest scale in log space);
  among several, the object with the nearest centre. It is *ignored* (no loss) when such an
  object is within one step but not half (the gap between DeepMask's positive and negative
  scale ranges, Pinheiro et al. 2015 §3.1), and *negative* otherwise. Crowd objects are
  never matched. The mask target of a positive window is the object's instance mask
  resampled over the window's mask region (:func:`~kerasdet.layers.windows.crop_windows`,
  bilinear, binarized at 0.5): the window seen as a crop of the image, as DeepMask's
  patches.
* **Loss** (DeepMask's, Pinheiro et al. 2015 Eq. 1): ``samples_per_image`` windows per
  image (128) are sampled with at most ``positive_fraction`` (1/4: 1:3 positives to
  negatives) positive (:func:`~kerasdet.sampling.sample_balanced`); score ``log(1 +
  exp(-y s))`` over the sampled windows, mask ``mean_ij log(1 + exp(-m^ij f^ij))`` over the
  sampled positives (negatives train the score branch only, as in DeepMask) weighted by
  ``mask_weight = 10`` relative to the score; both summed and divided by the global number
  of sampled windows. End to end (§4.6: "trained end-to-end"): backbone, pyramid and MLPs in
  one loss.

**Inference** (:meth:`FPNProposals.detect`): scores of every window of every level and MLP
in one pass, the top ``num_proposals`` windows of each image (1000, AR's largest budget,
§4.6.1), their masks from the gathered hidden vectors only, pasted into the image
(:func:`~kerasdet.layers.windows.paste_masks`), binarized at ``mask_threshold`` (0.2, the
threshold of the DeepMask / SharpMask framework, §3.5) and boxed by their tight boxes
(:func:`~kerasdet.boxes.boxes_from_masks`, §3.5.3). No NMS (none in §4.6 or in
the DeepMask framework). The same outputs as
:meth:`~kerasdet.models.sharpmask.SharpMask.detect` (``masks`` ``[B, N, H, W]``), so the
``proposals_segm`` metric and the SavedModel's ``detection_masks`` work unchanged.

Parameters (paper configuration: keras.applications ResNet-50 C2-C5, defaults otherwise):
ResNet-50 23,587,712 + FPN 1,082,368 (four 1x1 laterals and four 3x3 smoothing convs at d =
128; P6 parameter-free) + 5x5 MLP 1,739,973 + 7x7 MLP 3,312,837 = 29,722,890 with 14x14 masks
(30,326,178 with 28x28); counted by hand from the layer list in ``tests/models/test_fpn_proposals.py``.
"""
from __future__ import annotations

import math

import keras
import tensorflow as tf

from kerasdet.layers.fpn import FeaturePyramid
from kerasdet.layers.windows import crop_windows, paste_masks
from kerasdet.losses import global_normalizer
from kerasdet.models.base import Detector
from kerasdet.boxes import boxes_from_masks
from kerasdet.sampling import sample_balanced


@keras.saving.register_keras_serializable(package="kerasdet")
class FPNProposals(Detector):
    """FPN mask proposals (module doc).

    Args:
        backbone: a functional model, float RGB 0..255 images -> ``{"C2": ..., "C5": ...}``
            (the levels ``min_level..backbone_max_level``).
        min_level, max_level: the pyramid levels the MLPs run on (default 2 and 6: P2-P6).
        backbone_max_level: the coarsest backbone level (default 5); levels above it are
            stride-2 subsamplings (``extra_levels="subsample_p5"``, §4.4.1).
        fpn_channels: d (default 128, §4.6).
        window_sizes: the MLPs' window sides, one MLP each, finer scale first (default
            ``(5, 7)``: the dual MLP of Table 4.6; ``(5,)`` / ``(7,)`` are its single-MLP
            rows).
        hidden: channels of each MLP's window convolution (default 512).
        mask_size: the mask side m (default 14; 28 is Table 4.6's "2x mask resolution").
        canonical_size: the canonical object scale of the first MLP on ``min_level`` in
            pixels (default 32, 8x the stride of P2).
        mask_region: side of a window's mask region over its canonical scale (default 1.25).
        center_range: how far (in cells of the window's level, per axis) an object's centre
            may be from a window's to be positive for it (default 1.0: "+-1 cell").
        samples_per_image: windows sampled per image for the loss (default 128).
        positive_fraction: the positives' largest share of them (default 0.25).
        mask_weight: weight of the mask loss relative to the score loss (default 10).
        num_proposals: N, the top-scoring windows returned per image (default 1000).
        mask_threshold: binarization threshold of the pasted masks (default 0.2).
        num_classes: must be 1 (class-agnostic proposals; class 0 is "object").
        **kwargs: :class:`~kerasdet.models.base.Detector`'s (``weight_decay``, ...).
    """

    LOSS_NAMES = ("mask_loss", "score_loss")

    def __init__(self, *, backbone, min_level=2, max_level=6, backbone_max_level=5, fpn_channels=128,
                 window_sizes=(5, 7), hidden=512, mask_size=14, canonical_size=32.0, mask_region=1.25,
                 center_range=1.0, samples_per_image=128, positive_fraction=0.25, mask_weight=10.0,
                 num_proposals=1000, mask_threshold=0.2, num_classes=1, **kwargs):
        super().__init__(**kwargs)
        if int(num_classes) != 1:
            raise ValueError(f"FPN mask proposals are class-agnostic: num_classes must be 1, got {num_classes}")
        window_sizes = tuple(int(w) for w in window_sizes)
        if not window_sizes or any(w < 1 or w % 2 == 0 for w in window_sizes):
            raise ValueError(f"window_sizes must be odd positive sizes, got {window_sizes}")
        self.num_classes = 1
        self.backbone = backbone
        self.min_level, self.max_level = int(min_level), int(max_level)
        self.levels = tuple(range(self.min_level, self.max_level + 1))
        self.window_sizes = window_sizes
        self.mask_size = int(mask_size)
        self.canonical_size = float(canonical_size)
        self.mask_region = float(mask_region)
        self.center_range = float(center_range)
        self.samples_per_image = int(samples_per_image)
        self.positive_fraction = float(positive_fraction)
        self.mask_weight = float(mask_weight)
        self.num_proposals = int(num_proposals)
        self.mask_threshold = float(mask_threshold)
        self._config = dict(min_level=self.min_level, max_level=self.max_level,
                            backbone_max_level=int(backbone_max_level), fpn_channels=int(fpn_channels),
                            window_sizes=list(window_sizes), hidden=int(hidden), mask_size=self.mask_size,
                            canonical_size=self.canonical_size, mask_region=self.mask_region,
                            center_range=self.center_range, samples_per_image=self.samples_per_image,
                            positive_fraction=self.positive_fraction, mask_weight=self.mask_weight,
                            num_proposals=self.num_proposals, mask_threshold=self.mask_threshold, num_classes=1)
        self.fpn = FeaturePyramid(min_level=self.min_level, max_level=self.max_level,
                                  backbone_max_level=int(backbone_max_level), num_channels=int(fpn_channels),
                                  extra_levels="subsample_p5", name="fpn")
        self.window_convs = [keras.layers.Conv2D(int(hidden), w, padding="same", activation="relu",
                                                 name=f"mlp{w}_window") for w in window_sizes]
        self.mask_heads = [keras.layers.Dense(self.mask_size ** 2, name=f"mlp{w}_mask") for w in window_sizes]
        self.score_heads = [keras.layers.Dense(1, name=f"mlp{w}_score") for w in window_sizes]

    # --- geometry -------------------------------------------------------------------------
    @property
    def num_kinds(self):
        """Window kinds: (level, MLP) pairs, level-major."""
        return len(self.levels) * len(self.window_sizes)

    def kind_scales(self):
        """Canonical object scale (px) of each kind, ``[num_kinds]`` (module doc)."""
        n = len(self.window_sizes)
        return [self.canonical_size * 2.0 ** (k - self.min_level) * 2.0 ** (j / n)
                for k in self.levels for j in range(n)]

    def windows(self, level_shapes):
        """Per window of the flattened layout (kind-major, then row-major cells): ``centers``
        ``[W, 2]`` (y, x px), ``strides`` ``[W]``, ``scale_index`` ``[W]`` (t), ``kind``
        ``[W]`` int32 and ``regions`` ``[W, 4]`` (the masks' yxyx pixel squares), for the
        ``(height, width)`` of each level in ``level_shapes``."""
        centers, strides, index, kinds, regions = [], [], [], [], []
        n = len(self.window_sizes)
        scales = self.kind_scales()
        for li, (level, (h, w)) in enumerate(zip(self.levels, level_shapes)):
            stride = float(2 ** level)
            iy, ix = tf.meshgrid(tf.range(h), tf.range(w), indexing="ij")
            c = (tf.cast(tf.reshape(tf.stack([iy, ix], axis=-1), [-1, 2]), tf.float32) + 0.5) * stride
            count = tf.shape(c)[0]
            for j in range(n):
                kind = li * n + j
                half = 0.5 * self.mask_region * scales[kind]
                centers.append(c)
                strides.append(tf.fill([count], stride))
                index.append(tf.fill([count], float(kind)))
                kinds.append(tf.fill([count], kind))
                regions.append(tf.concat([c - half, c + half], axis=1))
        return {"centers": tf.concat(centers, 0), "strides": tf.concat(strides, 0),
                "scale_index": tf.concat(index, 0), "kind": tf.concat(kinds, 0), "regions": tf.concat(regions, 0)}

    def assign(self, windows, gt_boxes, gt_valid):
        """Target assignment (module doc, "Targets"), batched.

        Args:
            windows: :meth:`windows`' dict (``W`` windows).
            gt_boxes: ``[B, N, 4]`` yxyx pixels; gt_valid: ``[B, N]`` bool (real, non-crowd).

        Returns:
            ``(positive [B, W], negative [B, W], matched [B, W] int32)`` (``matched``: the
            object a positive window is positive for; 0 elsewhere).
        """
        gt_boxes = tf.cast(gt_boxes, tf.float32)
        centre = 0.5 * (gt_boxes[..., :2] + gt_boxes[..., 2:])  # [B, N, 2]
        side = tf.reduce_max(gt_boxes[..., 2:] - gt_boxes[..., :2], axis=-1)
        top = float(self.num_kinds - 1)
        u = len(self.window_sizes) * tf.math.log(tf.maximum(side, 1e-6) / self.canonical_size) / math.log(2.0)
        u = tf.clip_by_value(u, 0.0, top)  # [B, N]
        offset = tf.abs(windows["centers"][None, :, None, :] - centre[:, None, :, :])  # [B, W, N, 2]
        near = tf.reduce_all(offset <= self.center_range * windows["strides"][None, :, None, None], axis=-1)
        near &= tf.cast(gt_valid, tf.bool)[:, None, :]
        step = tf.abs(u[:, None, :] - windows["scale_index"][None, :, None])  # [B, W, N]
        pos_pair = near & (step <= 0.5)
        ign_pair = near & (step < 1.0)
        positive = tf.reduce_any(pos_pair, axis=-1)
        negative = ~tf.reduce_any(ign_pair, axis=-1)
        distance = tf.reduce_sum(tf.square(offset), axis=-1)
        matched = tf.argmin(tf.where(pos_pair, distance, float("inf")), axis=-1, output_type=tf.int32)
        return positive, negative, tf.where(positive, matched, 0)

    # --- forward --------------------------------------------------------------------------
    def build(self, input_shape=None):
        """Creates every weight with one forward pass on a small zero image."""
        if self.built:
            return
        size = 2 ** self.max_level
        self.forward(tf.zeros((1, size, size, 3)))
        feats = tf.zeros((1, 1, 1, self.window_convs[0].filters))
        for head in self.mask_heads:
            head(feats)
        self.built = True

    def forward(self, images, training=False):
        """``{"hidden": [B, W, hidden], "score_logits": [B, W], "level_shapes": [(h, w), ...]}``
        over the flattened windows (layout of :meth:`windows`)."""
        c_feats = self.backbone(tf.cast(images, tf.float32), training=training)
        p_feats = self.fpn(c_feats, training=training)
        hidden, scores, shapes = [], [], []
        batch = tf.shape(images)[0]
        for level in self.levels:
            p = p_feats[f"P{level}"]
            shapes.append((tf.shape(p)[1], tf.shape(p)[2]))
            for conv, score in zip(self.window_convs, self.score_heads):
                h = conv(p)
                hidden.append(tf.reshape(h, [batch, -1, h.shape[-1]]))
                scores.append(tf.reshape(score(h), [batch, -1]))
        return {"hidden": tf.concat(hidden, axis=1), "score_logits": tf.concat(scores, axis=1),
                "level_shapes": shapes}

    def call(self, images, training=False):
        return self.detect(images)

    def mask_logits(self, hidden, kind):
        """Mask logits ``[..., m, m]`` of gathered hidden vectors ``[..., hidden]`` whose
        window kinds are ``kind`` (each MLP's mask layer, chosen per window)."""
        mlp = kind % len(self.window_sizes)
        out = 0.0
        for j, head in enumerate(self.mask_heads):
            out = out + tf.where((mlp == j)[..., None], head(hidden), 0.0)
        return tf.reshape(out, tf.concat([tf.shape(hidden)[:-1], [self.mask_size, self.mask_size]], 0))

    # --- training -------------------------------------------------------------------------
    def detection_losses(self, images, labels, training):
        if "masks" not in labels:
            raise ValueError("FPNProposals trains on instance masks: labels need 'masks' [B, N, H, W] "
                             "(input.masks='instances')")
        images = tf.cast(images, tf.float32)
        out = self.forward(images, training=training)
        windows = self.windows(out["level_shapes"])
        gt_boxes = tf.cast(labels["boxes"], tf.float32)
        valid = tf.cast(labels["classes"], tf.int32) >= 0
        if labels.get("is_crowd") is not None:
            valid &= ~tf.cast(labels["is_crowd"], tf.bool)
        positive, negative, matched = self.assign(windows, gt_boxes, valid)
        sampled_pos, sampled_neg = sample_balanced(positive, negative, num_samples=self.samples_per_image,
                                                   positive_fraction=self.positive_fraction, seed=self.sampling_seed)
        sampled = tf.cast(sampled_pos | sampled_neg, tf.float32)
        normalizer = global_normalizer(tf.reduce_sum(sampled))
        y = tf.where(sampled_pos, 1.0, -1.0)
        score_loss = tf.reduce_sum(sampled * tf.nn.softplus(-y * tf.cast(out["score_logits"], tf.float32)))
        # masks of the sampled positives only: at most the positive quota per image
        quota = max(int(self.samples_per_image * self.positive_fraction), 1)
        weight, picked = tf.math.top_k(tf.cast(sampled_pos, tf.float32), k=quota)  # [B, P]
        hidden = tf.gather(out["hidden"], picked, batch_dims=1)
        kind = tf.gather(windows["kind"], picked)
        logits = tf.cast(self.mask_logits(hidden, kind), tf.float32)  # [B, P, m, m]
        obj = tf.gather(matched, picked, batch_dims=1)  # [B, P]
        targets = self.mask_targets(labels["masks"], tf.gather(windows["regions"], picked), obj)
        per_window = tf.reduce_mean(tf.nn.softplus(-(2.0 * targets - 1.0) * logits), axis=[2, 3])
        mask_loss = self.mask_weight * tf.reduce_sum(weight * per_window)
        return {"mask_loss": mask_loss / normalizer, "score_loss": score_loss / normalizer}

    def mask_targets(self, masks, regions, objects):
        """Mask targets ``[B, P, m, m]`` (0/1): instance masks ``masks`` ``[B, N, H, W]``
        of objects ``objects`` ``[B, P]`` resampled over the windows' mask regions
        ``regions`` ``[B, P, 4]`` (yxyx pixel edges; :func:`crop_windows`, bilinear,
        zero outside the image) and binarized at 0.5."""
        shape = tf.shape(masks)
        batch, num = shape[0], shape[1]
        flat_masks = tf.reshape(tf.cast(masks, tf.float32), [-1, shape[2], shape[3], 1])
        box_index = tf.reshape(tf.cast(objects, tf.int32) + num * tf.range(batch)[:, None], [-1])
        crops = crop_windows(flat_masks, tf.reshape(regions, [-1, 4]), box_index, self.mask_size)[..., 0]
        size = tf.shape(objects)
        return tf.reshape(tf.cast(crops >= 0.5, tf.float32), [size[0], size[1], self.mask_size, self.mask_size])

    def training_targets(self, images, labels):
        """The assignment and mask targets of every window (for inspection and tests):
        ``{"positive", "negative", "matched"}`` ``[B, W]`` and ``"windows"`` (:meth:`windows`)."""
        out = self.forward(images)
        windows = self.windows(out["level_shapes"])
        valid = tf.cast(labels["classes"], tf.int32) >= 0
        if labels.get("is_crowd") is not None:
            valid &= ~tf.cast(labels["is_crowd"], tf.bool)
        positive, negative, matched = self.assign(windows, labels["boxes"], valid)
        return {"positive": positive, "negative": negative, "matched": matched, "windows": windows}

    # --- inference ------------------------------------------------------------------------
    def detect(self, images):
        """Segment proposals of whole images (module doc, "Inference"): ``boxes`` ``[B, N,
        4]`` (yxyx pixels, tight boxes of the masks), ``scores`` (sigmoid), ``classes`` (0;
        -1 padding), ``num_detections`` and ``masks`` ``[B, N, H, W]`` (0/1 float32); an
        image with fewer than N windows is padded."""
        images = tf.cast(images, tf.float32)
        shape = tf.shape(images)
        batch, height, width = shape[0], shape[1], shape[2]
        n = self.num_proposals
        out = self.forward(images)
        windows = self.windows(out["level_shapes"])
        total = tf.shape(windows["kind"])[0]
        scores = tf.pad(tf.cast(out["score_logits"], tf.float32), [[0, 0], [0, n]], constant_values=-float("inf"))
        top_scores, top = tf.math.top_k(scores, k=n)  # [B, N]
        real = top < total
        safe = tf.minimum(top, total - 1)
        hidden = tf.gather(out["hidden"], safe, batch_dims=1)
        logits = self.mask_logits(hidden, tf.gather(windows["kind"], safe))
        flat_regions = tf.reshape(tf.gather(windows["regions"], safe), [-1, 4])
        probs = paste_masks(tf.sigmoid(tf.reshape(tf.cast(logits, tf.float32), [-1, self.mask_size, self.mask_size])),
                            flat_regions, tf.range(tf.shape(flat_regions)[0]), (height, width))
        masks = tf.cast(probs > self.mask_threshold, tf.float32) * tf.reshape(tf.cast(real, tf.float32), [-1, 1, 1])
        masks = tf.reshape(masks, [batch, n, height, width])
        return {"boxes": boxes_from_masks(masks), "scores": tf.where(real, tf.sigmoid(top_scores), 0.0),
                "classes": tf.where(real, 0, -1), "num_detections": tf.reduce_sum(tf.cast(real, tf.int32), axis=1),
                "masks": masks}
