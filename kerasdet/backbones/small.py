"""A small, fast CPU backbone for the embedded digits set (~128x128 images, 14-50 px digits).

Architecture (default ``widths=(32, 64, 96, 128)``, ``blocks=(1, 1, 2, 1)``)::

    images 0..255 -> Rescaling to [-1, 1]
    stem   conv3x3/2 (widths[0] // 2 ch) + BN + ReLU                       stride 2
    C2     conv3x3/2 + BN + ReLU, blocks[0] residual blocks, widths[0] ch   stride 4
    C3     conv3x3/2 + BN + ReLU, blocks[1] residual blocks, widths[1] ch   stride 8
    C4     conv3x3/2 + BN + ReLU, blocks[2] residual blocks, widths[2] ch   stride 16
    C5     conv3x3/2 + BN + ReLU, blocks[3] residual blocks, widths[3] ch   stride 32

A residual block is ``x + BN(conv3x3(ReLU(BN(conv3x3(x)))))`` followed by ReLU (the
ResNet "basic block"). Choices made here:

* Plain 3x3 convolutions (no depthwise-separable ones): with oneDNN on a 2-core CPU,
  dense 3x3 convs at these small widths run far closer to peak FLOP/s than depthwise
  convs, so they buy more accuracy per second even if not per FLOP.
* Stride 2 everywhere and only ~10 convs: the receptive field of C5 (> 200 px) covers the
  largest digits; most compute sits at stride 8-16 where small digits are resolved.
* The last BN of each residual block starts with gamma = 0 (``zero_init_residual``,
  Goyal et al. 2017), so every block starts as the identity; helps short CPU schedules.
* BatchNormalization uses ``synchronized=True``: under ``tf.distribute`` (e.g.
  MirroredStrategy) batch statistics are all-reduced across replicas, so training with a
  global batch on N devices computes the same activations as on one device. Momentum
  0.9 (not Keras' 0.99) so moving statistics settle within short CPU schedules.
* Trained from scratch: no frozen layers and no pretrained weights.

Options for R-FCN / Attention CoupleNet digits presets (issue 8; defaults leave the network
above unchanged):

* ``attention_levels``: a :class:`kerasdet.layers.attention.CascadeAttention` block
  (``attention_channels`` wide, default 32) named ``attention_c{level}`` after the last
  block of stage ``C{level}``; the attended map is that level's output and the next
  stage's input, and the block's logits are output as ``A{level}`` (``[B, H, W, 1]``).
* ``dilate_c5``: the C5 stage keeps stride 16 (its downsampling conv has stride 1) and all
  its 3x3 convs use dilation 2, as R-FCN's dilated conv5.
"""
from __future__ import annotations

import keras
from keras import layers

from kerasdet.layers.attention import CascadeAttention
from kerasdet.layers.sync_batch_norm import SyncBatchNormalization

SMALL_LEVELS = ("C2", "C3", "C4", "C5")
_STRIDES = {"C2": 4, "C3": 8, "C4": 16, "C5": 32}


def small_backbone(
    *,
    widths=(32, 64, 96, 128),
    blocks=(1, 1, 2, 1),
    stem_width=None,
    levels=("C3", "C4", "C5"),
    input_shape=(None, None, 3),
    synchronized_bn=True,
    bn_momentum=0.9,
    zero_init_residual=True,
    attention_levels=(),
    attention_channels=32,
    attention_bias_init=0.0,
    attention_residual=False,
    dilate_c5=False,
    name=None,
):
    """Builds the small CPU backbone.

    Args:
        widths: channels of C2, C3, C4, C5 (default ``(32, 64, 96, 128)``).
        blocks: residual blocks per stage C2..C5 (default ``(1, 1, 2, 1)``; 0 allowed).
        stem_width: channels of the stride-2 stem conv (default ``widths[0] // 2``).
        levels: which of ``C2``..``C5`` to output (default ``("C3", "C4", "C5")``; C2 is
            computed anyway, so asking for it costs nothing).
        input_shape: ``(H, W, 3)``; H, W may be ``None``.
        synchronized_bn: cross-replica (synchronized) BatchNormalization (default
            ``True``; ``False`` only for comparison).
        bn_momentum: BatchNormalization moving-average momentum (default 0.9).
        zero_init_residual: zero-initialize the last BN gamma of each residual block.
        attention_levels: levels in 2..5 with a cascade attention block after their stage
            (default ``()``); each adds an ``"A{level}"`` logits output.
        attention_channels: width of the attention blocks' first conv (default 32).
        attention_bias_init, attention_residual: the blocks' ``bias_init`` (default 0: ``A``
            starts near 0.5) and ``residual`` (default False: ``A * f``, the paper's;
            True: ``(1 + A) * f``); see :class:`~kerasdet.layers.attention.CascadeAttention`.
        dilate_c5: C5 with stride 16 (stride-1 downsampling conv, dilation 2) instead of 32.
        name: model name (default ``"small_backbone"``).

    Returns:
        A functional ``keras.Model``: float32 RGB 0..255 images ``[B, H, W, 3]`` -> dict of
        the requested levels (stride 4/8/16/32, C5 16 with ``dilate_c5``; channels
        ``widths``) plus ``A{level}`` per attention level. Spatial sizes are
        ``ceil(H / stride)``.
    """
    widths = tuple(int(w) for w in widths)
    blocks = tuple(int(b) for b in blocks)
    if len(widths) != 4 or min(widths) < 1:
        raise ValueError(f"small backbone: widths must be 4 positive ints (C2..C5), got {widths}")
    if len(blocks) != 4 or min(blocks) < 0:
        raise ValueError(f"small backbone: blocks must be 4 ints >= 0 (C2..C5), got {blocks}")
    levels = tuple(levels)
    if not levels or any(level not in SMALL_LEVELS for level in levels):
        raise ValueError(
            f"small backbone: levels must be a non-empty subset of {SMALL_LEVELS}, got {levels}"
        )
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(f"small backbone: input_shape must be (H, W, 3), got {input_shape}")
    stem_width = int(stem_width or max(widths[0] // 2, 8))
    attention_levels = tuple(sorted(set(int(level) for level in attention_levels)))
    if any(level not in (2, 3, 4, 5) for level in attention_levels):
        raise ValueError(f"small backbone: attention_levels must be in 2..5, got {attention_levels}")
    needed = set(levels) | {f"C{level}" for level in attention_levels}

    def conv_bn(x, filters, *, strides=1, dilation=1, relu=True, gamma_zero=False, prefix):
        x = layers.Conv2D(
            filters, 3, strides=strides, dilation_rate=dilation, padding="same", use_bias=False,
            kernel_initializer="he_normal", name=f"{prefix}_conv",
        )(x)
        x = SyncBatchNormalization(  # two-pass moments: kerasdet.layers.sync_batch_norm
            momentum=bn_momentum, epsilon=1e-3, synchronized=synchronized_bn,
            gamma_initializer="zeros" if gamma_zero else "ones", name=f"{prefix}_bn",
        )(x)
        if relu:
            x = layers.ReLU(name=f"{prefix}_relu")(x)
        return x

    images = keras.Input(shape=input_shape, dtype="float32", name="images")
    x = layers.Rescaling(scale=1.0 / 127.5, offset=-1.0, name="rescale")(images)
    x = conv_bn(x, stem_width, strides=2, prefix="stem")
    features = {}
    attention_logits = {}
    for level, width, num_blocks in zip(SMALL_LEVELS, widths, blocks):
        stage = level.lower()
        dilated = dilate_c5 and level == "C5"
        dilation = 2 if dilated else 1
        x = conv_bn(x, width, strides=1 if dilated else 2, dilation=dilation, prefix=f"{stage}_down")
        for b in range(1, num_blocks + 1):
            prefix = f"{stage}_block{b}"
            y = conv_bn(x, width, dilation=dilation, prefix=f"{prefix}_1")
            y = conv_bn(y, width, dilation=dilation, relu=False, gamma_zero=zero_init_residual,
                        prefix=f"{prefix}_2")
            x = layers.Add(name=f"{prefix}_add")([x, y])
            x = layers.ReLU(name=f"{prefix}_out")(x)
        if int(level[1]) in attention_levels:
            x, attention_logits[f"A{level[1]}"] = CascadeAttention(
                channels=attention_channels, bias_init=attention_bias_init, residual=attention_residual,
                name=f"attention_{stage}"
            )(x)
        features[level] = x
        if all(lv in features for lv in needed):  # build no stage past the last needed
            break
    outputs = {level: features[level] for level in levels}
    outputs.update(attention_logits)
    return keras.Model(images, outputs, name=name or "small_backbone")


def small_backbone_levels(widths=(32, 64, 96, 128), levels=("C3", "C4", "C5"), *, dilate_c5=False):
    """``{level: (stride, channels)}`` of a :func:`small_backbone` config without building it
    (feature levels only, not the ``A{level}`` attention logits)."""
    widths = dict(zip(SMALL_LEVELS, widths))
    strides = dict(_STRIDES, C5=16) if dilate_c5 else _STRIDES
    return {level: (strides[level], widths[level]) for level in levels}
