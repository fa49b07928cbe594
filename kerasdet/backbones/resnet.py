"""ResNet-50/101/152 feature backbones with the ``keras.applications`` layer layout.

A backbone is a functional ``keras.Model`` mapping float32 RGB images ``[B, H, W, 3]`` with
pixel values in 0..255 to a dict of feature maps::

    {"C2": stride 4, 256 ch, "C3": stride 8, 512 ch, "C4": stride 16, 1024 ch,
     "C5": stride 32, 2048 ch}

Choices made here (all documented defaults, all overridable):

* **Layout.** The network is ``keras.applications.ResNet50/101/152(include_top=False)``
  itself, so every layer keeps its ``keras.applications`` name (``conv1_conv``,
  ``conv2_block1_1_conv``, ...) and the official ImageNet weight files load into it as they
  load into ``keras.applications``. This is the v1 ResNet of Keras (stride in the first 1x1
  conv of each downsampling block, convolutions with biases), *not* the Caffe/MSRA
  "v1.5 with stride in the 3x3" variant; C2..C5 are ``conv2_block3_out``,
  ``conv3_block4_out``, ``conv4_block6_out`` (R101: ``conv4_block23_out``, R152:
  ``conv4_block36_out``) and ``conv5_block3_out``.
* **Preprocessing inside the model.** The first layer is :class:`CaffePreprocess`
  (RGB->BGR, subtract the ImageNet BGR mean ``[103.939, 116.779, 123.68]``, no scaling),
  identical to ``keras.applications.resnet.preprocess_input``. Detectors feed raw 0..255
  pixels, and an exported SavedModel needs no outside preprocessing.
* **Frozen BatchNorm** (``frozen_batchnorm=True``). Detection trains with ~2 images per
  device, where batch statistics are useless noise; following the papers (Detectron,
  FPN/RetinaNet/Faster R-CNN/R-FCN) every BatchNormalization layer is made
  ``trainable=False``. In Keras 3 a non-trainable BN layer runs in inference mode (moving
  statistics) even under ``training=True``, and its gamma/beta are not updated, i.e. it is
  a fixed per-channel affine transform.
* **Frozen early stages** (``freeze_at=2``, Detectron's ``FREEZE_AT``): the stem (``conv1``,
  ``pool1``) and stage 2 (``conv2_*``) are not trainable. ``freeze_at=0`` trains everything,
  ``1`` freezes only the stem, ``k`` in 2..5 freezes the stem and stages 2..k.

Keras' ``trainable`` setter is recursive: ``detector.backbone.trainable = False`` followed
by ``= True`` (e.g. a fine-tuning schedule) un-freezes every sub-layer, BN included; call
:func:`freeze_resnet` again afterwards. (With the TF backend, assigning the value a layer
already has is a no-op, so a plain ``= True`` on a trainable model changes nothing.)

**Weights** are never downloaded: ``weights`` is ``None`` (random init) or the path of a
local ``keras.applications`` ResNet weight file (legacy ``.h5`` such as
``resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5``, with or without the top, or a
Keras 3 ``.weights.h5``), see :func:`load_local_weights`.
"""
from __future__ import annotations

import os
import re
import warnings

import keras
from keras import layers, ops

IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)
"""ImageNet channel means in BGR order, as in ``keras.applications.imagenet_utils`` (caffe)."""

RESNET_APPLICATIONS = {
    50: keras.applications.ResNet50,
    101: keras.applications.ResNet101,
    152: keras.applications.ResNet152,
}

RESNET_LEVEL_LAYERS = {
    50: {"C2": "conv2_block3_out", "C3": "conv3_block4_out", "C4": "conv4_block6_out",
         "C5": "conv5_block3_out"},
    101: {"C2": "conv2_block3_out", "C3": "conv3_block4_out", "C4": "conv4_block23_out",
          "C5": "conv5_block3_out"},
    152: {"C2": "conv2_block3_out", "C3": "conv3_block8_out", "C4": "conv4_block36_out",
          "C5": "conv5_block3_out"},
}
"""Level name -> ``keras.applications`` layer name of that stage's last block output."""

RESNET_LEVELS = {"C2": (4, 256), "C3": (8, 512), "C4": (16, 1024), "C5": (32, 2048)}
"""Level name -> (stride, channels), identical for depths 50/101/152."""

_WEIGHT_SUFFIXES = (".weights.h5", ".h5", ".hdf5", ".keras")


@keras.saving.register_keras_serializable(package="kerasdet")
class CaffePreprocess(layers.Layer):
    """Caffe-style image normalization as a serializable layer.

    Maps RGB pixels in 0..255 to BGR minus the per-channel ``mean`` (given in BGR order),
    exactly what ``keras.applications.resnet.preprocess_input`` (and VGG's) does, but inside
    the graph so it is part of ``get_config``, ``.keras`` files and SavedModels.

    Args:
        mean: per-channel mean to subtract, in the output (BGR) channel order. Default: the
            ImageNet mean ``[103.939, 116.779, 123.68]``.
        reverse_channels: flip RGB->BGR before subtracting (default ``True``).
        scale: ``None`` (default: no scaling, Caffe) or a per-channel multiplier applied
            after the subtraction, in the output channel order. ``reverse_channels=False``
            with ``mean = 255 * (0.485, 0.456, 0.406)`` and ``scale = 1 / (255 * (0.229,
            0.224, 0.225))`` is the torchvision / keras-hub ImageNet normalization.
    """

    def __init__(self, mean=IMAGENET_BGR_MEAN, reverse_channels=True, scale=None, **kwargs):
        super().__init__(**kwargs)
        self.mean = tuple(float(m) for m in mean)
        self.reverse_channels = bool(reverse_channels)
        self.scale = None if scale is None else tuple(float(v) for v in scale)

    def call(self, images):
        x = ops.cast(images, self.compute_dtype)
        if self.reverse_channels:
            x = ops.flip(x, axis=-1)
        x = x - ops.convert_to_tensor(self.mean, dtype=self.compute_dtype)
        if self.scale is not None:
            x = x * ops.convert_to_tensor(self.scale, dtype=self.compute_dtype)
        return x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"mean": list(self.mean), "reverse_channels": self.reverse_channels,
                       "scale": None if self.scale is None else list(self.scale)})
        return config


def check_weights_path(weights, *, family="ResNet-50", imagenet_file=None):
    """Validates a ``weights`` argument: ``None`` or an existing local weight file.

    Args:
        weights: ``None`` or a str / ``os.PathLike`` path.
        family: name used in error messages.
        imagenet_file: file name of the official ``keras.applications`` ImageNet weights,
            quoted in the error raised for ``weights="imagenet"``.

    Returns:
        ``None`` or the path as ``str``.

    Raises:
        ValueError: for ``"imagenet"`` (kerasdet never downloads), a non-path value, or an
            unsupported file suffix.
        FileNotFoundError: the file does not exist.
    """
    if weights is None:
        return None
    if not isinstance(weights, (str, os.PathLike)):
        raise ValueError(
            f"{family} backbone: `weights` must be None or the path of a local weight file; "
            f"got {type(weights).__name__}: {weights!r}"
        )
    path = os.fspath(weights)
    if path.strip().lower() == "imagenet":
        hint = ""
        if imagenet_file:
            hint = (
                f" The official file is {imagenet_file!r}: on a machine with internet, "
                f"`keras.utils.get_file` / `keras.applications` caches it under "
                f"~/.keras/models/{imagenet_file}."
            )
        raise ValueError(
            f"{family} backbone: weights='imagenet' would download weights, and kerasdet "
            f"never downloads at run time. Pass the path of a local keras.applications "
            f"weight file instead (weights='/path/to/file.h5').{hint}"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{family} backbone: weights file not found: {path}")
    if not path.lower().endswith(_WEIGHT_SUFFIXES):
        raise ValueError(
            f"{family} backbone: weights file {path} has an unsupported suffix; expected one "
            f"of {', '.join(_WEIGHT_SUFFIXES)} (a keras.applications weight file)"
        )
    return path


def load_local_weights(model, path, *, reference_builder=None, family="ResNet-50"):
    """Loads a local ``keras.applications`` weight file into a backbone built from it.

    Tries, in order, and stops at the first that succeeds:

    1. ``model.load_weights(path)`` -- works for files of the same architecture without
       the classification top: keras.applications' own ``*_notop.h5`` (topological
       loading, exactly how ``keras.applications`` loads it; weight-less layers such as
       the preprocessing layer do not count) and Keras 3 ``.weights.h5`` files (with or
       without top: extra entries in the file are ignored).
    2. Legacy ``.h5`` files only: ``reference_builder(include_top=False)``, then
       ``reference_builder(include_top=True)``, builds the plain ``keras.applications``
       model, loads the file into it the way ``keras.applications`` would, and copies
       every weighted layer into ``model`` by layer name. This covers legacy files saved
       with the top and backbones that keep only a prefix of the network.

    Args:
        model: the backbone (layers named as in keras.applications).
        path: local file path (str or ``os.PathLike``), see :func:`check_weights_path`.
        reference_builder: ``include_top -> keras.Model`` building the keras.applications
            model, or ``None`` to allow only the direct load.
        family: name used in error messages.

    Never partial: a shape or count mismatch in every attempt raises ``ValueError`` naming
    the file, with each attempt's error.
    """
    path = os.fspath(path)
    errors = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.load_weights(path)
        return model
    except (ValueError, KeyError, OSError) as e:  # mismatching layout
        errors.append(f"direct load: {e}")
    legacy_h5 = path.lower().endswith((".h5", ".hdf5")) and not path.lower().endswith(".weights.h5")
    if reference_builder is not None and legacy_h5:
        for include_top in (False, True):
            try:
                reference = reference_builder(include_top=include_top)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    reference.load_weights(path)
                _copy_weights_by_name(reference, model)
                return model
            except (ValueError, KeyError, OSError) as e:
                errors.append(f"keras.applications model with include_top={include_top}: {e}")
    details = "\n".join(f"  - {_shorten(msg)}" for msg in errors)
    raise ValueError(
        f"{family} backbone: could not load weights file {path} (is it a keras.applications "
        f"{family} weight file?). Attempts:\n{details}"
    )


def _shorten(message, limit=400):
    """First part of a (possibly huge) Keras loading error, on one line."""
    message = " ".join(message.split("List of objects")[0].split())
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _copy_weights_by_name(source, target):
    """Copies the weights of every weighted layer of ``target`` from ``source`` by name."""
    for layer in target.layers:
        if not layer.weights:
            continue
        try:
            source_layer = source.get_layer(layer.name)
        except ValueError as e:
            raise ValueError(f"layer {layer.name!r} not found in the weights file") from e
        layer.set_weights(source_layer.get_weights())


_STAGE_RE = re.compile(r"^(?:conv|pool)(\d)_")


def resnet_stage(layer_name):
    """Stage index of a keras.applications ResNet layer name, or ``None``.

    ``conv1_*`` / ``pool1_*`` -> 1 (the stem), ``convK_*`` -> K; other layers (input,
    preprocessing) -> ``None``.
    """
    match = _STAGE_RE.match(layer_name)
    return int(match.group(1)) if match else None


def freeze_resnet(model, *, freeze_at=2, frozen_batchnorm=True):
    """(Re)applies Detectron-style freezing to a keras.applications-layout ResNet.

    Args:
        model: a model whose layers carry keras.applications ResNet names (e.g. from
            :func:`resnet_backbone`).
        freeze_at: ``0`` trains all stages; ``1`` freezes the stem (``conv1``/``pool1``);
            ``k`` in 2..5 freezes the stem and stages 2..k (Detectron ``FREEZE_AT``;
            default 2).
        frozen_batchnorm: make every ``BatchNormalization`` layer non-trainable, so it
            runs in inference mode with fixed statistics and affine parameters.

    Layers not selected are set trainable again, so this can also undo a previous freeze.
    Returns the model.
    """
    if not isinstance(freeze_at, int) or isinstance(freeze_at, bool) or not 0 <= freeze_at <= 5:
        raise ValueError(f"freeze_at must be an int in 0..5, got {freeze_at!r}")
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        stage = resnet_stage(layer.name)
        frozen = stage is not None and stage <= freeze_at
        if frozen_batchnorm and isinstance(layer, layers.BatchNormalization):
            frozen = True
        layer.trainable = not frozen
    return model


def resnet_backbone(
    depth=50,
    *,
    weights=None,
    input_shape=(None, None, 3),
    freeze_at=2,
    frozen_batchnorm=True,
    stride_in_3x3=False,
    batchnorm_epsilon=1.001e-5,
    normalization=None,
    name=None,
):
    """Builds a ResNet backbone returning ``{"C2", "C3", "C4", "C5"}`` feature maps.

    Args:
        depth: 50, 101 or 152.
        weights: ``None`` (random init, the keras.applications initializers) or the path
            of a local keras.applications ResNet weight file (``.h5`` / ``.weights.h5``,
            with or without top). ``"imagenet"`` is rejected: nothing is downloaded.
        input_shape: ``(H, W, 3)``; H and W may be ``None`` (default).
        freeze_at: stages frozen Detectron-style (default 2: stem + stage 2), see
            :func:`freeze_resnet`.
        frozen_batchnorm: all BatchNormalization layers non-trainable (default ``True``).
        stride_in_3x3: ``False`` (default): keras.applications' v1 blocks, the stride of a
            downsampling block in its first 1x1 conv. ``True``: the "v1.5" blocks of
            torchvision and keras-hub (``ResNetBackbone(block_type="bottleneck_block")``),
            the stride in the 3x3 conv, applied as zero padding 1 + a "valid" conv (as
            keras-hub). Same layer names and weight shapes either way, so either kind of
            weight file loads, but they are different networks: use ``True`` for weights
            trained that way (:mod:`kerasdet.weights` checks it).
        batchnorm_epsilon: BatchNormalization epsilon (keras.applications 1.001e-5, the
            default; keras-hub / torchvision 1e-5).
        normalization: ``None`` (default: Caffe BGR mean subtraction, as keras.applications)
            or a dict of :class:`CaffePreprocess` arguments (``mean``, ``reverse_channels``,
            ``scale``) for weights trained with another image normalization.
        name: model name (default ``"resnet{depth}_backbone"``).

    Returns:
        A functional ``keras.Model``: float32 RGB 0..255 images ``[B, H, W, 3]`` -> dict of
        ``C2`` (stride 4, 256 ch), ``C3`` (8, 512), ``C4`` (16, 1024), ``C5`` (32, 2048).
        Spatial sizes are ``ceil(H / stride)`` (Keras' "same"-style padding of the stem).
    """
    if depth not in RESNET_APPLICATIONS:
        raise ValueError(
            f"ResNet depth must be one of {sorted(RESNET_APPLICATIONS)}, got {depth!r}"
        )
    family = f"ResNet-{depth}"
    input_shape = _check_input_shape(input_shape, family)
    if not isinstance(freeze_at, int) or isinstance(freeze_at, bool) or not 0 <= freeze_at <= 5:
        raise ValueError(f"{family} backbone: freeze_at must be an int in 0..5, got {freeze_at!r}")
    path = check_weights_path(
        weights, family=family,
        imagenet_file=f"resnet{depth}_weights_tf_dim_ordering_tf_kernels_notop.h5",
    )
    application = RESNET_APPLICATIONS[depth]
    norm_args = dict(normalization or {})
    unknown = sorted(set(norm_args) - {"mean", "reverse_channels", "scale"})
    if unknown:
        raise ValueError(f"{family} backbone: unknown normalization keys {unknown}; expected "
                         "mean, reverse_channels, scale")

    images = keras.Input(shape=input_shape, dtype="float32", name="images")
    x = CaffePreprocess(name="caffe_preprocess", **norm_args)(images)
    if stride_in_3x3 or float(batchnorm_epsilon) != 1.001e-5:
        out = resnet_v1_layers(x, depth, stride_in_3x3=stride_in_3x3, batchnorm_epsilon=batchnorm_epsilon)
        outputs = {level: out[layer_name] for level, layer_name in RESNET_LEVEL_LAYERS[depth].items()}
    else:
        base = application(include_top=False, weights=None, input_tensor=x, input_shape=input_shape)
        outputs = {
            level: base.get_layer(layer_name).output
            for level, layer_name in RESNET_LEVEL_LAYERS[depth].items()
        }
    model = keras.Model(images, outputs, name=name or f"resnet{depth}_backbone")
    if path is not None:
        load_local_weights(
            model,
            path,
            reference_builder=lambda include_top: application(
                include_top=include_top, weights=None,
                input_shape=(224, 224, 3) if include_top else (None, None, 3),
            ),
            family=family,
        )
    # Freeze after loading: legacy .h5 loading orders a layer's weights trainable-first.
    freeze_resnet(model, freeze_at=freeze_at, frozen_batchnorm=frozen_batchnorm)
    return model


RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
"""Bottleneck blocks per stage (conv2..conv5) of each depth."""


def resnet_v1_layers(x, depth, *, stride_in_3x3=False, batchnorm_epsilon=1.001e-5):
    """The keras.applications ResNet v1 graph (``include_top=False``) on tensor ``x``,
    layer by layer with keras.applications' names, in its layer order.

    ``stride_in_3x3=False`` is the same network as ``keras.applications.ResNet{depth}``;
    ``True`` moves each downsampling block's stride into its 3x3 conv ("v1.5", zero
    padding 1 + "valid" conv, layer ``conv{k}_block1_2_pad``). Returns ``{block output
    layer name: tensor}`` for every ``conv{k}_block{i}_out``.
    """
    bn_axis = 3
    eps = float(batchnorm_epsilon)
    x = layers.ZeroPadding2D(padding=((3, 3), (3, 3)), name="conv1_pad")(x)
    x = layers.Conv2D(64, 7, strides=2, use_bias=True, name="conv1_conv")(x)
    x = layers.BatchNormalization(axis=bn_axis, epsilon=eps, name="conv1_bn")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.ZeroPadding2D(padding=((1, 1), (1, 1)), name="pool1_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    outputs = {}
    for stage, (filters, blocks) in enumerate(zip((64, 128, 256, 512), RESNET_BLOCKS[depth]), start=2):
        for i in range(1, blocks + 1):
            stride = 2 if (i == 1 and stage > 2) else 1
            name = f"conv{stage}_block{i}"
            if i == 1:
                shortcut = layers.Conv2D(4 * filters, 1, strides=stride, name=name + "_0_conv")(x)
                shortcut = layers.BatchNormalization(axis=bn_axis, epsilon=eps, name=name + "_0_bn")(shortcut)
            else:
                shortcut = x
            first_stride = 1 if stride_in_3x3 else stride
            y = layers.Conv2D(filters, 1, strides=first_stride, name=name + "_1_conv")(x)
            y = layers.BatchNormalization(axis=bn_axis, epsilon=eps, name=name + "_1_bn")(y)
            y = layers.Activation("relu", name=name + "_1_relu")(y)
            if stride_in_3x3 and stride > 1:
                y = layers.ZeroPadding2D(padding=1, name=name + "_2_pad")(y)
                y = layers.Conv2D(filters, 3, strides=stride, padding="valid", name=name + "_2_conv")(y)
            else:
                y = layers.Conv2D(filters, 3, padding="same", name=name + "_2_conv")(y)
            y = layers.BatchNormalization(axis=bn_axis, epsilon=eps, name=name + "_2_bn")(y)
            y = layers.Activation("relu", name=name + "_2_relu")(y)
            y = layers.Conv2D(4 * filters, 1, name=name + "_3_conv")(y)
            y = layers.BatchNormalization(axis=bn_axis, epsilon=eps, name=name + "_3_bn")(y)
            x = layers.Add(name=name + "_add")([shortcut, y])
            x = layers.Activation("relu", name=name + "_out")(x)
            outputs[name + "_out"] = x
    return outputs


def _check_input_shape(input_shape, family):
    shape = tuple(input_shape)
    if len(shape) != 3 or shape[-1] != 3:
        raise ValueError(
            f"{family} backbone: input_shape must be (H, W, 3) RGB (H, W may be None); "
            f"got {input_shape!r}"
        )
    return shape
