"""DeepMask (head C) and SharpMask, trained on patches (T.-Y. Lin, "Detecting Common Objects
in Context", Cornell 2017 thesis, ch. 3 "SharpMask"; Pinheiro et al., "Learning to Refine
Object Segments", ECCV 2016).

**Trunk** (§3.4.1, §3.5.1, Table 3.1 "W160-P4-D39-F128"): the backbone cut at stride 16
(ResNet-50 through conv4 for the paper configuration; the small CPU backbone through its
C4 for the digits), run on a patch of ``patch_size + context`` pixels (W = 160 plus 32 px
of context, §3.5); every trunk level is then cropped by ``context / 2 / stride`` cells per
side (the released code's 1-cell crop of the 12x12 conv4 map), so the stride-16 map
covers the central ``patch_size`` region (10x10 for W = 160). Every trunk convolution is
mirror-padded (``trunk_padding``; §3.5: ResNet trunks need "reflective-padding instead of
0-padding at every convolutional layer").

**Head C** (§3.4.2, Fig. 3.3d, Table 3.2): 1x1 conv to F = 128 channels + ReLU, one
"low rank" 512-d vector (a linear layer over the whole ``(W/16)^2 x 128`` map, written as
a ``W/16 x W/16`` "valid" conv so the same weights slide over an image), then

* the mask branch: a linear layer to a 56x56 mask (``mask_size``), upsampled bilinearly
  to the target's resolution (DeepMask's mask output, Pinheiro et al., "Learning to Segment
  Object Candidates", NIPS 2015);
* the score branch from the *same* 512-d vector (what makes it head C): dropout 0.5,
  1024 units + ReLU, dropout 0.5, one logit (the released code's score branch; the
  thesis gives only "the score prediction utilize the same low rank 512x1x1 features").

**SharpMask** (``refinement=True``, §3.3, Fig. 3.1d): a linear layer from the same 512-d
vector makes the mask encoding ``M^1`` (``k_m^1`` channels at ``W/16``; it replaces the
DeepMask mask layer, §3.3.3), then one :class:`~kerasdet.layers.refinement.RefinementModule`
per pooling stage on the trunk's pre-pooling features (``skip_levels``, stride 16, 8, 4,
2: ResNet's conv4, conv3, conv2 block outputs and conv1), channel schedule (b) with k =
32 (§3.5.2), and a final 3x3 conv to one channel at the patch resolution W.

**Loss** (DeepMask's, kept by SharpMask, §3.3.3; Pinheiro et al. 2015 Eq. 1): per patch
``k`` with label ``y_k`` = +-1 and mask ``m_k`` = +-1 per pixel,
``(1 + y_k) / 2 * mean_ij log(1 + exp(-m_k^ij f^ij)) + lambda log(1 + exp(-y_k s_k))``
with ``lambda = 1/32`` (the released code's weight of the score term), summed over the
batch and divided by the (global) number of labelled patches (our normalization; it only
scales the learning rate). Patches labelled 0 (no valid negative found) count nowhere.

**Stages** (§3.3.3): ``stage="deepmask"`` trains trunk and head C on mask + score;
``stage="refine"`` freezes everything but ``M^1``'s layer and the refinement modules and
trains on the refined mask alone (the released code trains the refinement on positives
only). Inference returns the refined masks in the refine stage, DeepMask's otherwise.

**Inference**: :meth:`SharpMask.detect_patches` on patches; :meth:`SharpMask.detect` (what
``predict`` and the SavedModel run) on whole images, fully convolutional over an image
pyramid with the top-N windows refined in one batch (thesis §3.3.3, Pinheiro et al. 2015
§3.3), see its doc.

Parameters (paper configuration: ResNet-50 to conv4, W = 160, defaults otherwise): trunk
8,589,184 (ResNet-50 through conv4_block6, keras.applications' convs with biases and BN's
4 values per channel), head C 131,200 (reduce) + 6,554,112 (512-d) + 1,608,768 (56^2
mask) + 526,337 (score): DeepMask 17,409,601 ("~17M", §3.5.1); the refinement adds
1,641,600 (``M^1``) + 1,116,221 (four modules + output conv) = 2,757,821 ("fewer than 3M",
§3.5.3). Counted by hand from
the layer list in ``tests/models/test_sharpmask.py``.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from kerasdet.boxes import boxes_from_masks
from kerasdet.layers.padding import MirrorPadding2D, mirror_padded
from kerasdet.layers.refinement import RefinementModule, refinement_schedule
from kerasdet.layers.windows import paste_masks
from kerasdet.losses import global_normalizer
from kerasdet.models.base import Detector

STAGES = ("deepmask", "refine")

PYRAMID_SCALES = tuple(2.0 ** (e / 2.0) for e in range(-4, 3))
"""The image pyramid of full-image inference: ``2^{-2:0.5:1}`` (DeepMask's full scene
inference, Pinheiro et al. 2015, which SharpMask follows, thesis §3.3.3 and §4.6)."""

RESNET_TRUNK_LAYERS = {"C1": "conv1_relu", "C2": "conv2_block3_out", "C3": "conv3_block4_out",
                       "C4": "conv4_block6_out"}
"""SharpMask's skip features of a keras.applications ResNet-50 (stride 2, 4, 8, 16)."""


def small_trunk_layers(blocks=(1, 1, 2, 1)):
    """Layer names of :func:`~kerasdet.backbones.small_backbone`'s stride 2, 4, 8, 16 outputs."""
    names = {"C1": "stem_relu"}
    for level, count in zip(("C2", "C3", "C4"), blocks):
        stage = level.lower()
        names[level] = f"{stage}_block{count}_out" if count else f"{stage}_down_relu"
    return names


def truncated_backbone(backbone, layers, *, name=None):
    """A functional model from ``backbone``'s input to ``{level: backbone.get_layer(name).output}``
    (the trunk "cut at stride 16": later layers are not part of it, nor counted)."""
    outputs = {level: backbone.get_layer(layer).output for level, layer in layers.items()}
    return keras.Model(backbone.input, outputs, name=name or f"{backbone.name}_trunk")


def _level_stride(level):
    return 2 ** int(level[1:])


@keras.saving.register_keras_serializable(package="kerasdet")
class SharpMask(Detector):
    """DeepMask head C with optional SharpMask refinement (module doc), on patches.

    Args:
        backbone: a functional model, float RGB 0..255 patches -> dict with
            ``trunk_level`` and every ``skip_levels`` entry; level ``C{n}`` has stride
            ``2^n`` (see :func:`truncated_backbone`).
        patch_size: W, the patch region the masks cover (default 160, Table 3.1); a
            multiple of the trunk's stride.
        context: extra pixels in total around it in the input (default 32, §3.5); a
            multiple of ``2 x`` every used level's stride.
        trunk_level: the stride-16 level of head C (default ``"C4"``).
        features: F, the 1x1 conv's channels (default 128).
        embedding: the low-rank vector's size (default 512).
        mask_size: DeepMask's mask side (default 56).
        score_hidden: units of the score branch's hidden layer (default 1024).
        dropout: dropout rate of the score branch (default 0.5).
        score_weight: lambda of the score term (default 1/32).
        refinement: add the SharpMask refinement (default True).
        skip_levels: ``F^i`` of the refinement modules, coarse to fine (default
            ``("C4", "C3", "C2", "C1")``).
        k: the channel schedule's k (default 32); ``schedule`` ``"halving"`` (default,
            (b) of §3.5.2) or ``"constant"``.
        skip_hidden: channels of the skip path's first conv (default 64).
        upsampling: ``"bilinear"`` (default, thesis) or ``"nearest"`` (released code).
        padding: padding of the refinement's 3x3 convs, ``"symmetric"`` (default),
            ``"reflect"`` or ``"zeros"``.
        trunk_padding: the same for the trunk (§3.5: reflective padding "at every
            convolutional layer"): ``"symmetric"`` (default) rebuilds ``backbone`` with
            :func:`~kerasdet.layers.padding.mirror_padded` (weights kept); ``"zeros"``
            leaves it as built.
        stage: ``"deepmask"`` (default) or ``"refine"``, see :meth:`set_stage`.
        mask_threshold: binarization threshold of predicted masks (default 0.2, §3.5).
        scales: the image pyramid of :meth:`detect` (default :data:`PYRAMID_SCALES`).
        num_proposals: N, the top-scoring windows of an image whose masks are computed
            (refined) and returned (default 500, where detection AP saturates, §3.5.2).
        fill_value: pixel value around the scaled images (default 127.5, the grey the
            sampler puts outside images).
        num_classes: must be 1 (class-agnostic proposals: class 0 is "object").
        **kwargs: :class:`~kerasdet.models.base.Detector`'s (``weight_decay``, ...).
    """

    LOSS_NAMES = ("mask_loss", "score_loss")

    def __init__(self, *, backbone, patch_size=160, context=32, trunk_level="C4", features=128, embedding=512,
                 mask_size=56, score_hidden=1024, dropout=0.5, score_weight=1.0 / 32.0, refinement=True,
                 skip_levels=("C4", "C3", "C2", "C1"), k=32, schedule="halving", skip_hidden=64,
                 upsampling="bilinear", padding="symmetric", stage="deepmask", mask_threshold=0.2, scales=PYRAMID_SCALES,
                 num_proposals=500, fill_value=127.5, trunk_padding="symmetric", num_classes=1, **kwargs):
        super().__init__(**kwargs)
        if trunk_padding not in ("symmetric", "reflect", "zeros"):
            raise ValueError(f"trunk_padding must be 'symmetric', 'reflect' or 'zeros', got {trunk_padding!r}")
        if trunk_padding != "zeros":
            backbone = mirror_padded(backbone, mode=trunk_padding)
        if int(num_classes) != 1:
            raise ValueError(f"SharpMask proposals are class-agnostic: num_classes must be 1, got {num_classes}")
        self.num_classes = 1
        self.backbone = backbone
        self.patch_size, self.context = int(patch_size), int(context)
        self.trunk_level = trunk_level
        self.skip_levels = tuple(skip_levels) if refinement else ()
        self.refinement = bool(refinement)
        self.mask_size = int(mask_size)
        self.score_weight = float(score_weight)
        self.mask_threshold = float(mask_threshold)
        self.scales = tuple(float(v) for v in scales)
        self.num_proposals = int(num_proposals)
        self.fill_value = float(fill_value)
        stride = _level_stride(trunk_level)
        self.stride = stride
        for level in (trunk_level, *self.skip_levels):
            if self.context % (2 * _level_stride(level)):
                raise ValueError(f"context {context} must be a multiple of 2 x stride of {level}")
        if self.patch_size % stride:
            raise ValueError(f"patch_size {patch_size} must be a multiple of the trunk stride {stride}")
        self.grid = self.patch_size // stride
        if self.refinement and [_level_stride(lv) for lv in self.skip_levels] != [
                stride // 2 ** i for i in range(len(self.skip_levels))]:
            raise ValueError(f"skip_levels must go from the trunk's stride down by 2 each, got {self.skip_levels}")
        self._config = dict(patch_size=self.patch_size, context=self.context, trunk_level=trunk_level,
                            features=int(features), embedding=int(embedding), mask_size=self.mask_size,
                            score_hidden=int(score_hidden), dropout=float(dropout), score_weight=self.score_weight,
                            refinement=self.refinement, skip_levels=list(skip_levels), k=int(k), schedule=schedule,
                            skip_hidden=int(skip_hidden), upsampling=upsampling, padding=padding, stage=stage,
                            mask_threshold=self.mask_threshold, scales=list(self.scales),
                            num_proposals=self.num_proposals, fill_value=self.fill_value,
                            trunk_padding=trunk_padding, num_classes=1)
        dense = dict(kernel_initializer="glorot_uniform")
        self.reduce = keras.layers.Conv2D(int(features), 1, activation="relu", name="reduce", **dense)
        self.embed = keras.layers.Conv2D(int(embedding), self.grid, padding="valid", name="embed", **dense)
        self.mask_head = keras.layers.Conv2D(self.mask_size ** 2, 1, name="mask_head", **dense)
        self.score_dropout1 = keras.layers.Dropout(float(dropout), name="score_dropout1")
        self.score_fc1 = keras.layers.Conv2D(int(score_hidden), 1, activation="relu", name="score_fc1", **dense)
        self.score_dropout2 = keras.layers.Dropout(float(dropout), name="score_dropout2")
        self.score_fc2 = keras.layers.Conv2D(1, 1, name="score_fc2", **dense)
        self.head_layers = [self.reduce, self.embed, self.mask_head, self.score_fc1, self.score_fc2]
        self.refine_layers = []
        if self.refinement:
            plan = refinement_schedule(int(k), len(self.skip_levels), schedule=schedule)
            self.encoding_channels = plan[0][0]
            self.encode = keras.layers.Conv2D(self.encoding_channels * self.grid ** 2, 1, name="mask_encoding",
                                              **dense)
            self.refiners = [RefinementModule(mask_channels=out, skip_channels=skip, skip_hidden=skip_hidden,
                                              upsampling=upsampling, padding=padding, name=f"refine_{i + 1}")
                             for i, (_, skip, out) in enumerate(plan)]
            self.output_pad = MirrorPadding2D(padding=1, mode=padding, name="refine_output_pad")
            self.output_conv = keras.layers.Conv2D(1, 3, padding="valid", name="refine_output",
                                                   kernel_initializer="he_uniform")
            self.refine_layers = [self.encode, *self.refiners, self.output_conv]
        self._backbone_trainable = [layer.trainable for layer in backbone.layers]
        self.set_stage(stage)

    # --- stages ---------------------------------------------------------------------------
    def set_stage(self, stage):
        """``"deepmask"``: trunk (as built: frozen parts stay frozen) and head C train,
        the refinement is frozen; ``"refine"``: only ``M^1``'s layer, the refinement
        modules and the output conv train (§3.3.3). Call ``compile`` again afterwards."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if stage == "refine" and not self.refinement:
            raise ValueError("stage 'refine' needs refinement=True")
        self.stage = stage
        self._config["stage"] = stage
        refine = stage == "refine"
        if refine:
            self.backbone.trainable = False
        else:  # the trunk as built (Keras' setter is recursive: restore every layer's flag)
            self.backbone.trainable = True
            for layer, flag in zip(self.backbone.layers, self._backbone_trainable):
                layer.trainable = flag
        for layer in self.head_layers:
            layer.trainable = not refine
        for layer in self.refine_layers:
            layer.trainable = refine

    # --- forward --------------------------------------------------------------------------
    @property
    def window_size(self):
        """Side of the input patches: ``patch_size + context``."""
        return self.patch_size + self.context

    def build(self, input_shape=None):
        """Creates every weight with one forward pass on a zero patch (the runner passes
        the detection canvas' shape, which patches do not use)."""
        if self.built:
            return
        self.forward(tf.zeros((1, self.window_size, self.window_size, 3)), refine=self.refinement)
        self.built = True

    def trunk(self, patches, training=False):
        """The cropped trunk levels (module doc): ``{level: [B, W / stride, W / stride, C]}``."""
        feats = self.backbone(patches, training=training)
        out = {}
        for level in (self.trunk_level, *self.skip_levels):
            crop = self.context // 2 // _level_stride(level)
            x = feats[level]
            out[level] = x[:, crop:-crop, crop:-crop, :] if crop else x
        return out

    def forward(self, patches, training=False, refine=None):
        """``{"score_logits": [B], "mask_logits": [B, mask_size, mask_size]}`` (+
        ``"refined_logits"`` ``[B, W, W]`` when ``refine``; default: in the refine stage)."""
        refine = (self.stage == "refine") if refine is None else refine
        feats = self.trunk(patches, training=training)
        vector = self.embed(self.reduce(feats[self.trunk_level]))  # [B, 1, 1, 512]
        s = self.score_dropout1(vector, training=training)
        s = self.score_dropout2(self.score_fc1(s), training=training)
        out = {"score_logits": tf.reshape(self.score_fc2(s), [-1]),
               "mask_logits": tf.reshape(self.mask_head(vector), [-1, self.mask_size, self.mask_size])}
        if refine:
            m = tf.reshape(self.encode(vector), [-1, self.grid, self.grid, self.encoding_channels])
            for level, module in zip(self.skip_levels, self.refiners):
                m = module([m, feats[level]])
            out["refined_logits"] = self.output_conv(self.output_pad(m))[..., 0]
        return out

    def call(self, patches, training=False):
        return self.forward(patches, training=training)

    # --- loss -----------------------------------------------------------------------------
    def mask_logits_at(self, outputs, size):
        """The stage's mask logits resized (bilinearly) to ``size x size``."""
        logits = outputs["refined_logits"] if self.stage == "refine" else outputs["mask_logits"]
        if logits.shape[1] != size:
            logits = tf.image.resize(logits[..., None], [size, size], method="bilinear")[..., 0]
        return logits

    def detection_losses(self, images, labels, training):
        outputs = self.forward(images, training=training)
        score = tf.cast(labels["score"], tf.float32)
        masks = tf.cast(labels["masks"], tf.float32)
        labelled = tf.cast(tf.not_equal(score, 0.0), tf.float32)
        positive = tf.cast(score > 0.0, tf.float32)
        normalizer = global_normalizer(tf.reduce_sum(labelled))
        logits = tf.cast(self.mask_logits_at(outputs, masks.shape[1]), tf.float32)
        per_pixel = tf.nn.softplus(-(2.0 * masks - 1.0) * logits)  # log(1 + exp(-m f))
        mask_loss = tf.reduce_sum(positive * tf.reduce_mean(per_pixel, axis=[1, 2])) / normalizer
        score_logits = tf.cast(outputs["score_logits"], tf.float32)
        score_loss = self.score_weight * tf.reduce_sum(labelled * tf.nn.softplus(-score * score_logits)) / normalizer
        return {"mask_loss": mask_loss, "score_loss": score_loss}

    # --- inference on patches ---------------------------------------------------------------
    def detect_patches(self, patches):
        """Patches -> ``{"masks": [B, W, W] probabilities, "scores": [B]}`` (refined masks
        in the refine stage, DeepMask's upsampled bilinearly otherwise)."""
        outputs = self.forward(patches, training=False)
        logits = self.mask_logits_at(outputs, self.patch_size)
        return {"masks": tf.sigmoid(logits), "scores": tf.sigmoid(outputs["score_logits"])}

    # --- full-image inference -------------------------------------------------------------
    def scale_outputs(self, images, scale):
        """One pyramid level, fully convolutional: ``(vectors [B, G, 512], score_logits [B,
        G], windows [G, 4], cells [G, 2], skip)`` for the ``G`` stride-16 windows of the
        image scaled by ``scale`` and padded by ``W / 2`` (``fill_value``) on every side.

        Window ``(i, j)`` covers pixels ``[16 i, 16 i + W)`` of the padded scaled image
        (its low-rank vector is the ``W/16``-wide "valid" conv at ``(i, j)``, the very
        layer that reads a patch's cropped trunk map), i.e. ``windows`` (yxyx of the
        input images) ``((16 i - W/2) / scale, ...)`` with side ``W / scale``. ``skip``
        holds each refinement module's skip features ``S^i`` on the whole padded image
        (shared by all windows, thesis §3.3.3), empty without refinement."""
        shape = tf.shape(images)
        height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
        hs = tf.maximum(tf.cast(tf.round(height * scale), tf.int32), 1)
        ws = tf.maximum(tf.cast(tf.round(width * scale), tf.int32), 1)
        scaled = tf.image.resize(tf.cast(images, tf.float32), tf.stack([hs, ws]), method="bilinear")
        half, st = self.patch_size // 2, self.stride
        pad_h = (-(hs + 2 * half)) % st + half
        pad_w = (-(ws + 2 * half)) % st + half
        padded = tf.pad(scaled, [[0, 0], [half, pad_h], [half, pad_w], [0, 0]], constant_values=self.fill_value)
        feats = self.backbone(padded, training=False)
        vectors = self.embed(self.reduce(feats[self.trunk_level]))
        scores = self.score_fc2(self.score_fc1(vectors))[..., 0]
        gh, gw = tf.shape(vectors)[1], tf.shape(vectors)[2]
        iy, ix = tf.meshgrid(tf.range(gh), tf.range(gw), indexing="ij")
        cells = tf.reshape(tf.stack([iy, ix], axis=-1), [-1, 2])
        top_left = (tf.cast(cells * st, tf.float32) - half) / scale
        windows = tf.concat([top_left, top_left + self.patch_size / scale], axis=1)
        batch = tf.shape(images)[0]
        skip = [module.skip_features(feats[level]) for level, module in zip(self.skip_levels, self.refiners)] \
            if self.refinement else []
        return (tf.reshape(vectors, [batch, -1, vectors.shape[-1]]), tf.reshape(scores, [batch, -1]), windows,
                cells, skip)

    def detect(self, images):
        """Segment proposals of whole images (thesis §3.3.3 / DeepMask's full-scene
        inference), one graph:

        1. every pyramid scale (:meth:`scale_outputs`) scores all stride-16 windows in
           one pass;
        2. the top ``num_proposals`` windows of each image over all scales (padding with
           score 0 where an image has fewer) get masks in one batch: SharpMask's
           refinement on the shared skip features cropped at each window (refine stage),
           or DeepMask's 56x56 mask;
        3. the masks are pasted into image coordinates
           (:func:`~kerasdet.layers.windows.paste_masks`), binarized at
           ``mask_threshold`` (0.2), and each box is the tight box of its mask (thesis
           §3.5.3: "we extract tight bounding boxes surrounding our segmentation masks";
           an empty mask gets a zero box).

        No NMS (neither the thesis nor the released inference code applies one). Returns
        ``boxes`` ``[B, N, 4]`` (yxyx pixels), ``scores`` (sigmoid), ``classes`` (0, the
        one class-agnostic class; -1 padding), ``num_detections`` and ``masks`` ``[B, N,
        H, W]`` (0/1 float32).
        """
        images = tf.cast(images, tf.float32)
        shape = tf.shape(images)
        batch, height, width = shape[0], shape[1], shape[2]
        n = self.num_proposals
        per_scale = [self.scale_outputs(images, scale) for scale in self.scales]
        vectors = tf.concat([p[0] for p in per_scale], axis=1)
        scores = tf.concat([p[1] for p in per_scale], axis=1)
        windows = tf.concat([p[2] for p in per_scale], axis=0)
        scale_id = tf.concat([tf.fill([tf.shape(p[2])[0]], i) for i, p in enumerate(per_scale)], axis=0)
        # N padding windows (score -inf) so top_k always has N candidates
        scores = tf.pad(scores, [[0, 0], [0, n]], constant_values=-float("inf"))
        total = tf.shape(windows)[0]
        top_scores, top = tf.math.top_k(scores, k=n)  # [B, N]
        real = top < total
        safe = tf.minimum(top, total - 1)
        top_vectors = tf.gather(vectors, safe, batch_dims=1)  # [B, N, 512]
        top_windows = tf.gather(windows, safe)  # [B, N, 4]
        flat_vectors = tf.reshape(top_vectors, [-1, 1, 1, top_vectors.shape[-1]])
        if self.refinement and self.stage == "refine":
            cells = tf.concat([p[3] for p in per_scale], axis=0)
            top_cells = tf.gather(cells, safe)  # [B, N, 2]
            top_scale = tf.gather(scale_id, safe)
            m = tf.reshape(self.encode(flat_vectors), [-1, self.grid, self.grid, self.encoding_channels])
            for index, (level, module) in enumerate(zip(self.skip_levels, self.refiners)):
                st = _level_stride(level)
                side = self.patch_size // st
                crop = 0.0
                for i, p in enumerate(per_scale):
                    skip = p[4][index]  # [B, h, w, k_s]
                    offs = tf.range(side)
                    rows = top_cells[..., 0:1] * (self.stride // st) + offs  # [B, N, side]
                    cols = top_cells[..., 1:2] * (self.stride // st) + offs
                    rows = tf.minimum(rows, tf.shape(skip)[1] - 1)
                    cols = tf.minimum(cols, tf.shape(skip)[2] - 1)
                    idx = tf.stack(tf.meshgrid(tf.range(side), tf.range(side), indexing="ij"), axis=-1)  # [s, s, 2]
                    gather_idx = tf.stack([tf.gather(rows, idx[..., 0], axis=2), tf.gather(cols, idx[..., 1], axis=2)],
                                          axis=-1)  # [B, N, s, s, 2]
                    patch = tf.gather_nd(skip, gather_idx, batch_dims=1)  # [B, N, s, s, k_s]
                    crop = crop + tf.where((top_scale == i)[..., None, None, None], patch, 0.0)
                m = module.merge(m, tf.reshape(crop, [-1, side, side, crop.shape[-1]]))
            logits = self.output_conv(self.output_pad(m))[..., 0]
        else:
            logits = tf.reshape(self.mask_head(flat_vectors), [-1, self.mask_size, self.mask_size])
        flat_windows = tf.reshape(top_windows, [-1, 4])
        probs = paste_masks(tf.sigmoid(logits), flat_windows, tf.range(tf.shape(flat_windows)[0]), (height, width))
        masks = tf.cast(probs > self.mask_threshold, tf.float32) * tf.reshape(tf.cast(real, tf.float32), [-1, 1, 1])
        masks = tf.reshape(masks, [batch, n, height, width])
        return {"boxes": boxes_from_masks(masks), "scores": tf.where(real, tf.sigmoid(top_scores), 0.0),
                "classes": tf.where(real, 0, -1), "num_detections": tf.reduce_sum(tf.cast(real, tf.int32), axis=1),
                "masks": masks}
