"""ResNet-50/101 v1 built layer by layer: R-FCN's dilated conv5 and Attention CoupleNet's
cascade attention blocks inside the network.

Used by R-FCN / CoupleNet / Attention CoupleNet (issue 8; Zhu et al., "Attention CoupleNet",
TIP 2019, §III-B and §IV-B). The network is the ``keras.applications`` ResNet v1 rebuilt block by block with
EXACTLY its layer names, layer order and weight shapes (``conv1_conv``, ``conv1_bn``,
``pool1_pool``, ``conv2_block1_0_conv`` (projection), ``conv2_block1_1_conv`` ...
``conv5_block3_3_bn``; the stride sits on the first 1x1 conv of a block and on the
projection, as in ``keras.applications``), so ``keras.applications`` ResNet-50/101 weight
files load by layer name (see :func:`kerasdet.backbones.resnet.load_local_weights`). Two
changes to the plain network, both switchable:

* **Dilated conv5** (``dilate_c5=True``, R-FCN / the CoupleNet Caffe release's ``res5``: stride 1,
  dilation 2 and pad 2): ``conv5_block1`` has stride 1 (its ``_1_conv`` and ``_0_conv``)
  and every conv5 3x3 conv (``conv5_block{1,2,3}_2_conv``) has ``dilation_rate=2``, so C5
  has stride 16 like C4. Dilation changes no weight shape: the same files load.
* **Cascade attention** (``attention_levels``, default none; the paper uses ``(2, 3, 4)``):
  a :class:`kerasdet.layers.attention.CascadeAttention` block named ``attention_c{level}``
  after the last block of ``conv{level}``; its attended output ``A * f`` is the input of
  the next stage (the paper's "f_O is used as the input for next stage") and the level's
  ``C{level}`` output. The block's logits are output as ``A{level}`` for the loss
  (:func:`kerasdet.losses.attention_loss`). These layers are new (not in any weight file):
  they keep their N(0, 0.01) init when weights are loaded and are always trainable
  (``freeze_resnet`` freezes only ``conv*`` / ``pool*`` layers).

Preprocessing (:class:`CaffePreprocess`, the keras.applications ImageNet BGR mean), frozen
BatchNorm and Detectron-style ``freeze_at`` are those of :mod:`kerasdet.backbones.resnet`.
The MSRA/Caffe ResNet-101 of the paper puts the stride in the first 1x1 conv too (and has
no conv biases); ours follows keras.applications (with biases) so its weight files load.
"""
from __future__ import annotations

import warnings

import keras
from keras import layers

from kerasdet.backbones.resnet import (
    RESNET_APPLICATIONS,
    CaffePreprocess,
    check_weights_path,
    freeze_resnet,
    load_local_weights,
)
from kerasdet.layers.attention import CascadeAttention

RESNET_DILATED_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
"""Depth -> residual blocks of conv2..conv5 (keras.applications' ResNet50/101)."""

_BN_EPSILON = 1.001e-5  # keras.applications' value


def _bottleneck(x, filters, *, stride=1, dilation=1, projection=False, name):
    """keras.applications' ``residual_block_v1`` with an optional dilation of the 3x3 conv."""
    if projection:
        shortcut = layers.Conv2D(4 * filters, 1, strides=stride, name=f"{name}_0_conv")(x)
        shortcut = layers.BatchNormalization(axis=3, epsilon=_BN_EPSILON, name=f"{name}_0_bn")(shortcut)
    else:
        shortcut = x
    x = layers.Conv2D(filters, 1, strides=stride, name=f"{name}_1_conv")(x)
    x = layers.BatchNormalization(axis=3, epsilon=_BN_EPSILON, name=f"{name}_1_bn")(x)
    x = layers.Activation("relu", name=f"{name}_1_relu")(x)
    x = layers.Conv2D(filters, 3, padding="same", dilation_rate=dilation, name=f"{name}_2_conv")(x)
    x = layers.BatchNormalization(axis=3, epsilon=_BN_EPSILON, name=f"{name}_2_bn")(x)
    x = layers.Activation("relu", name=f"{name}_2_relu")(x)
    x = layers.Conv2D(4 * filters, 1, name=f"{name}_3_conv")(x)
    x = layers.BatchNormalization(axis=3, epsilon=_BN_EPSILON, name=f"{name}_3_bn")(x)
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_out")(x)


def _build(depth, input_shape, dilate_c5, attention_levels, attention_channels, name):
    images = keras.Input(shape=input_shape, dtype="float32", name="images")
    x = CaffePreprocess(name="caffe_preprocess")(images)
    x = layers.ZeroPadding2D(padding=((3, 3), (3, 3)), name="conv1_pad")(x)
    x = layers.Conv2D(64, 7, strides=2, name="conv1_conv")(x)
    x = layers.BatchNormalization(axis=3, epsilon=_BN_EPSILON, name="conv1_bn")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.ZeroPadding2D(padding=((1, 1), (1, 1)), name="pool1_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    outputs = {}
    for level, (filters, num_blocks) in enumerate(zip((64, 128, 256, 512), RESNET_DILATED_BLOCKS[depth]), 2):
        dilated = dilate_c5 and level == 5
        stride = 1 if level == 2 or dilated else 2
        dilation = 2 if dilated else 1
        for b in range(1, num_blocks + 1):
            x = _bottleneck(
                x, filters, stride=stride if b == 1 else 1, dilation=dilation,
                projection=b == 1, name=f"conv{level}_block{b}",
            )
        if level in attention_levels:
            x, logits = CascadeAttention(channels=attention_channels, name=f"attention_c{level}")(x)
            outputs[f"A{level}"] = logits
        outputs[f"C{level}"] = x
    outputs = {key: outputs[key] for key in sorted(outputs, key=lambda k: (k[0] != "C", k))}
    return keras.Model(images, outputs, name=name)


def resnet_dilated_backbone(
    depth=101,
    *,
    weights=None,
    input_shape=(None, None, 3),
    freeze_at=2,
    frozen_batchnorm=True,
    dilate_c5=True,
    attention_levels=(),
    attention_channels=256,
    name=None,
):
    """Builds a (dilated, attention) ResNet-50/101 backbone.

    Args:
        depth: 50 or 101 (default 101, the paper's backbone).
        weights: ``None`` (random init, keras.applications' initializers) or the path of a
            local keras.applications ResNet weight file (legacy ``.h5`` with or without
            top, or a Keras 3 ``.weights.h5``; also a ``.weights.h5`` saved from this
            backbone). ``"imagenet"`` is rejected: nothing is downloaded.
        input_shape: ``(H, W, 3)``; H and W may be ``None`` (default).
        freeze_at: stages frozen Detectron-style (default 2: stem + conv2, as the
            CoupleNet Caffe release freezes conv1/res2 with ``lr_mult 0``), see
            :func:`kerasdet.backbones.resnet.freeze_resnet`.
        frozen_batchnorm: all BatchNormalization layers non-trainable (default ``True``).
        dilate_c5: conv5 with stride 1 and dilation 2 (default ``True``: C5 stride 16).
        attention_levels: levels in 2..5 that get a ``CascadeAttention`` block after the
            last block of their stage (default ``()``; the paper: ``(2, 3, 4)``).
        attention_channels: width of the attention blocks' first conv (default 256).
        name: model name (default ``"resnet{depth}_dilated_backbone"``, or
            ``"resnet{depth}_backbone_v1"`` without dilation).

    Returns:
        A functional ``keras.Model``: float32 RGB 0..255 images ``[B, H, W, 3]`` -> dict of
        ``C2`` (stride 4, 256 ch), ``C3`` (8, 512), ``C4`` (16, 1024), ``C5`` (16 dilated,
        else 32; 2048 ch), the attended maps where attention applies, plus ``A{level}``
        (``[B, H_k, W_k, 1]`` float32 attention logits) per attention level. Spatial sizes
        are ``ceil(H / stride)``.
    """
    if depth not in RESNET_DILATED_BLOCKS:
        raise ValueError(f"ResNet depth must be one of {sorted(RESNET_DILATED_BLOCKS)}, got {depth!r}")
    family = f"ResNet-{depth}"
    shape = tuple(input_shape)
    if len(shape) != 3 or shape[-1] != 3:
        raise ValueError(
            f"{family} backbone: input_shape must be (H, W, 3) RGB (H, W may be None); got {input_shape!r}"
        )
    if not isinstance(freeze_at, int) or isinstance(freeze_at, bool) or not 0 <= freeze_at <= 5:
        raise ValueError(f"{family} backbone: freeze_at must be an int in 0..5, got {freeze_at!r}")
    attention_levels = tuple(sorted(set(int(level) for level in attention_levels)))
    if any(level not in (2, 3, 4, 5) for level in attention_levels):
        raise ValueError(f"{family} backbone: attention_levels must be in 2..5, got {attention_levels}")
    path = check_weights_path(
        weights, family=family,
        imagenet_file=f"resnet{depth}_weights_tf_dim_ordering_tf_kernels_notop.h5",
    )
    default_name = f"resnet{depth}_dilated_backbone" if dilate_c5 else f"resnet{depth}_backbone_v1"
    build = lambda levels: _build(  # noqa: E731
        depth, shape, bool(dilate_c5), levels, int(attention_channels), name or default_name
    )
    model = build(attention_levels)
    if path is not None:
        application = RESNET_APPLICATIONS[depth]

        def reference_builder(include_top):
            return application(
                include_top=include_top, weights=None,
                input_shape=(224, 224, 3) if include_top else (None, None, 3),
            )

        if not attention_levels:
            load_local_weights(model, path, reference_builder=reference_builder, family=family)
        else:
            _load_with_attention(model, path, build, reference_builder, family)
    # Freeze after loading: legacy .h5 loading orders a layer's weights trainable-first.
    freeze_resnet(model, freeze_at=freeze_at, frozen_batchnorm=frozen_batchnorm)
    return model


def _load_with_attention(model, path, build, reference_builder, family):
    """Loads a file saved from this very model, else a plain ResNet file into the ResNet
    layers (the attention blocks keep their init)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.load_weights(path)
        return
    except (ValueError, KeyError, OSError):
        pass
    plain = build(())
    load_local_weights(plain, path, reference_builder=reference_builder, family=family)
    for layer in plain.layers:
        if layer.weights:
            model.get_layer(layer.name).set_weights(layer.get_weights())
