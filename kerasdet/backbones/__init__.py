"""kerasdet.backbones: feature extractors returning dicts of multi-scale feature maps.

Every backbone is a function returning a functional ``keras.Model`` whose input is float32
RGB images ``[B, H, W, 3]`` with pixel values 0..255 (H, W may be ``None``) and whose output
is a dict of feature maps keyed by level name: ``"C2"`` (stride 4), ``"C3"`` (8), ``"C4"``
(16), ``"C5"`` (32); VGG-16 uses its keras.applications layer names instead (see
:mod:`kerasdet.backbones.vgg`). Image normalization is the first layer of each backbone,
so detectors feed raw pixels and exported SavedModels need no outside preprocessing.

==============  ==========================================  ================================
name            builder                                     outputs (stride, channels)
==============  ==========================================  ================================
``resnet50``    :func:`resnet_backbone` (depth=50)          C2-C5 (4,256) ... (32,2048)
``resnet101``   :func:`resnet_backbone` (depth=101)         same
``resnet152``   :func:`resnet_backbone` (depth=152)         same
``small``       :func:`small_backbone`                      C3-C5 (8,64) (16,96) (32,128)
``vgg16``       :func:`vgg16_backbone`                      block4_conv3 (8,512),
                                                            block5_conv3 (16,512)
==============  ==========================================  ================================

``resnet50_dilated`` / ``resnet101_dilated`` (:func:`resnet_dilated_backbone`, R-FCN /
Attention CoupleNet): the keras.applications ResNet rebuilt layer by layer, C2-C5 as above
but C5 at stride 16 (dilated conv5; ``dilate_c5=False`` gives 32), plus the ``A{level}``
attention logits (stride of C{level}, 1 channel) of its ``attention_levels``; ``small``
takes the same ``attention_levels`` / ``dilate_c5`` options.

Use :func:`backbone_levels` to query ``{level: (stride, channels)}`` of any built backbone.
"""
from __future__ import annotations

import functools
import math

import keras

from kerasdet.backbones.resnet import (
    CaffePreprocess,
    freeze_resnet,
    load_local_weights,
    resnet_backbone,
)
from kerasdet.backbones.resnet_dilated import resnet_dilated_backbone
from kerasdet.backbones.small import small_backbone
from kerasdet.backbones.vgg import VGG16_LAYERS, vgg16_backbone

BACKBONES = {
    "resnet50": functools.partial(resnet_backbone, 50),
    "resnet101": functools.partial(resnet_backbone, 101),
    "resnet152": functools.partial(resnet_backbone, 152),
    "small": small_backbone,
    "vgg16": vgg16_backbone,
}
"""Registry used by :func:`get_backbone`: name -> builder."""

DILATED_BACKBONES = {
    "resnet50_dilated": functools.partial(resnet_dilated_backbone, 50),
    "resnet101_dilated": functools.partial(resnet_dilated_backbone, 101),
}
"""The layer-by-layer ResNets of R-FCN / (Attention) CoupleNet (dilated conv5, attention
blocks), also served by :func:`get_backbone`. Kept apart from :data:`BACKBONES` only because
``tests/backbones/test_registry.py`` pins that dict's keys."""


def _normalize(name):
    return str(name).lower().replace("-", "").replace("_", "")


def backbone_builder(name):
    """The builder function of a registry name (``resnet50``, ``resnet101``,
    ``resnet152``, ``small``, ``vgg16``, ``resnet50_dilated``, ``resnet101_dilated``).
    Case, ``-`` and ``_`` are ignored (``"ResNet-101_dilated"``).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    registry = {**BACKBONES, **DILATED_BACKBONES}
    builders = {_normalize(key): builder for key, builder in registry.items()}
    key = _normalize(name)
    if key not in builders:
        raise ValueError(f"Unknown backbone {name!r}; known backbones: {sorted(registry)}")
    return builders[key]


def get_backbone(name, **kwargs):
    """Builds a backbone by registry name (see :func:`backbone_builder`), passing
    ``kwargs`` to its builder.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    return backbone_builder(name)(**kwargs)


def backbone_levels(model, *, probe_size=256):
    """``{level: (stride, channels)}`` of a backbone model's dict output.

    Strides are measured by symbolic shape inference (no computation) on a
    ``probe_size`` x ``probe_size`` input (or the model's static input size), rounded to
    the nearest power of two.

    Args:
        model: a backbone from this package (dict output, one image input).
        probe_size: side of the probe input when the model's input size is dynamic; a
            multiple of the largest stride (default 256).
    """
    input_shape = model.input_shape
    if isinstance(input_shape, list):
        input_shape = input_shape[0]
    height = input_shape[1] or probe_size
    width = input_shape[2] or probe_size
    probe = keras.KerasTensor((1, height, width, input_shape[3]), dtype="float32")
    outputs = model.compute_output_spec(probe)
    if not isinstance(outputs, dict):
        raise ValueError(f"backbone_levels: model {model.name!r} does not output a dict")
    levels = {}
    for level, spec in outputs.items():
        stride = 2 ** round(math.log2(height / spec.shape[1]))
        levels[level] = (int(stride), int(spec.shape[-1]))
    return dict(sorted(levels.items(), key=lambda item: item[1][0]))


__all__ = [
    "BACKBONES",
    "CaffePreprocess",
    "DILATED_BACKBONES",
    "VGG16_LAYERS",
    "backbone_builder",
    "backbone_levels",
    "freeze_resnet",
    "get_backbone",
    "load_local_weights",
    "resnet_backbone",
    "resnet_dilated_backbone",
    "small_backbone",
    "vgg16_backbone",
]
