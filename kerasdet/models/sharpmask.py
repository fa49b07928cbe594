"""DeepMask (head C) and SharpMask, trained on patches (Lin's thesis, ch. 3 "SharpMask").

**Trunk** (§3.4.1, §3.5.1, Table 3.1 "W160-P4-D39-F128"): the backbone cut at stride 16
(ResNet-50 through conv4 for the paper configuration; the small CPU backbone through its
C4 for the digits), run on a patch of ``patch_size + context`` pixels (W = 160 plus 32 px
of context, §3.5); every trunk level is then cropped by ``context / 2 / stride`` cells per
side (the released code's 1-cell crop of the 12x12 conv4 map), so the stride-16 map
covers the central ``patch_size`` region (10x10 for W = 160).

**Head C** (§3.4.2, Fig. 3.3d, Table 3.2): 1x1 conv to F = 128 channels + ReLU, one
"low rank" 512-d vector (a linear layer over the whole ``(W/16)^2 x 128`` map, written as
a ``W/16 x W/16`` "valid" conv so the same weights slide over an image), then

* the mask branch: a linear layer to a 56x56 mask (``mask_size``), upsampled bilinearly
  to the target's resolution (DeepMask, Pinheiro et al. 2015, §3.1);
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
only). ``predict`` on patches returns the refined masks in the refine stage, DeepMask's
otherwise.

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

from kerasdet.layers.padding import MirrorPadding2D
from kerasdet.layers.refinement import RefinementModule, refinement_schedule
from kerasdet.losses import global_normalizer
from kerasdet.models.base import Detector

STAGES = ("deepmask", "refine")

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
            ``"reflect"`` or ``"zeros"`` (the trunk keeps its own zero padding: not done).
        stage: ``"deepmask"`` (default) or ``"refine"``, see :meth:`set_stage`.
        mask_threshold: binarization threshold of predicted masks (default 0.2, §3.5).
        **kwargs: :class:`~kerasdet.models.base.Detector`'s (``weight_decay``, ...).
    """

    LOSS_NAMES = ("mask_loss", "score_loss")

    def __init__(self, *, backbone, patch_size=160, context=32, trunk_level="C4", features=128, embedding=512,
                 mask_size=56, score_hidden=1024, dropout=0.5, score_weight=1.0 / 32.0, refinement=True,
                 skip_levels=("C4", "C3", "C2", "C1"), k=32, schedule="halving", skip_hidden=64,
                 upsampling="bilinear", padding="symmetric", stage="deepmask", mask_threshold=0.2, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.patch_size, self.context = int(patch_size), int(context)
        self.trunk_level = trunk_level
        self.skip_levels = tuple(skip_levels) if refinement else ()
        self.refinement = bool(refinement)
        self.mask_size = int(mask_size)
        self.score_weight = float(score_weight)
        self.mask_threshold = float(mask_threshold)
        stride = _level_stride(trunk_level)
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
                            mask_threshold=self.mask_threshold)
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
        else:
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
    def detect(self, images):
        """Patches -> ``{"masks": [B, W, W] probabilities, "scores": [B]}`` (refined masks
        in the refine stage, DeepMask's upsampled bilinearly otherwise)."""
        outputs = self.forward(images, training=False)
        logits = self.mask_logits_at(outputs, self.patch_size)
        return {"masks": tf.sigmoid(logits), "scores": tf.sigmoid(outputs["score_logits"])}
