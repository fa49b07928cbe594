"""Start from weights a user already has on disk: keras-hub presets and kerasdet runs.

Nothing is downloaded, and keras-hub is never imported: a keras-hub preset folder is read
as files (``config.json``, ``task.json``, ``preprocessor.json`` are JSON; the
``*.weights.h5`` files are Keras 3 weight files read with ``h5py``).

Entry points:

* :func:`retinanet_from_keras_hub`: a kerasdet :class:`~kerasdet.models.retinanet.RetinaNet`
  built to the preset's configuration with every weight of a keras-hub
  ``RetinaNetObjectDetector`` preset (ResNet, FPN, both subnets); ``num_classes`` other
  than the preset's fine-tunes to a new class list (see below).
* :func:`load_keras_hub_retinanet`: the same into an existing RetinaNet, whose configuration
  is checked against the preset first.
* :func:`resnet_from_keras_hub` / :func:`load_keras_hub_resnet`: a ResNet-50/101 backbone
  (the ``C2``-``C5`` dict of :func:`kerasdet.backbones.resnet_backbone`, so it serves every
  family that takes a ResNet) from a keras-hub ``ResNetBackbone`` preset (ImageNet presets)
  or from the image encoder of a RetinaNet preset.
* :func:`load_detector_weights`: what ``--set model.weights=PATH`` does: a keras-hub preset
  folder, a kerasdet run folder (``run.json`` + ``model.weights.h5``) or a kerasdet
  ``.weights.h5`` file into a built kerasdet detector, a different class count included.
* :func:`transfer_detector_weights`: every weight of one kerasdet detector into another of
  the same architecture and maybe another class list.
* :func:`freeze_detector`: ``"backbone"`` or ``"backbone_fpn"`` made non-trainable.

**How keras-hub's RetinaNet maps** (keras-hub 0.32, a port of torchvision's): its
``ResNetBackbone(block_type="bottleneck_block", use_pre_activation=False)`` is the "v1.5"
ResNet (stride in the 3x3 conv, BN epsilon 1e-5, convs without biases): kerasdet builds
``resnet_backbone(depth, stride_in_3x3=True, batchnorm_epsilon=1e-5)`` and sets the conv
biases keras-hub lacks to zero. Its image converter (``x * scale + offset`` on RGB 0..255,
ImageNet mean/std for the COCO preset) becomes the backbone's first layer
(``normalization``). ``use_p5=True`` (P6 from C5, the paper) is ``extra_levels="conv_c5"``,
``use_p5=False`` is ``"conv_p5"``. Its anchors are torchvision's grid: centres at
``i * stride`` and sizes rounded to pixels (``anchor_center_offset=0.0,
anchor_round_to_pixels=True``), anchor index ratio-major (kerasdet: scale-major) and box
deltas ordered ``(dx, dy, dw, dh)`` (kerasdet: ``(dy, dx, dh, dw)``): the output convs'
channels are permuted so that kerasdet's raw outputs equal keras-hub's.
Not mappable, each a :class:`WeightsError` naming the first mismatching piece: another
architecture (pre-activation or "vd" ResNets, other depths, other stems), FPN batch norm,
group-normalized heads, a non-sigmoid class activation, box variances other than 1, a
preset without an image converter (unless ``normalization`` is given).

**Post-processing differs** (so detections agree only where both rules pick the same
boxes): keras-hub takes, per anchor, the best class's sigmoid score, keeps scores >= 0.5
(``confidence_threshold``) and runs one class-agnostic NMS (IoU 0.5, 100 boxes) on unclipped
boxes without a delta clip; kerasdet keeps the top 1000 anchors per level with score > 0.05,
decodes with ``th, tw`` clipped at ``log(1000/16)``, clips boxes to the image and runs
per-class NMS (IoU 0.5, 100 boxes). Set ``score_threshold=0.5`` and a large
``pre_nms_topk`` to approach keras-hub's.

**Fine-tuning to a new class list** (``num_classes`` other than the source's): every weight
but the classification output conv is kept; that conv is re-initialized as for a new model
(kernel N(0, 0.01), bias ``-log((1 - pi) / pi)`` with ``pi = prior_probability``, Lin et
al., "Focal Loss for Dense Object Detection", Sec. 4). With ``class_names`` and
``source_class_names``, the output rows of every class in both lists (by name) are kept.
keras-hub presets store no class names: pass ``source_class_names`` (for the COCO preset,
torchvision's 91-entry list whose index is the COCO category id).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from kerasdet.errors import DataFileNotFoundError, UserInputError

#: keras-hub ``ResNetBackbone`` ``stackwise_num_blocks`` of the depths that map.
KERAS_HUB_RESNET_BLOCKS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101}

#: Parts of a detector :func:`freeze_detector` can freeze.
FREEZE_CHOICES = ("none", "backbone", "backbone_fpn")


class WeightsError(UserInputError):
    """A weights file or preset folder that is missing, malformed or does not map onto the
    kerasdet model; the message names the file or the first mismatching piece."""


@dataclasses.dataclass
class LoadReport:
    """What a load did.

    Attributes:
      source: the file or folder read.
      loaded: kerasdet variable paths set from the source.
      zero_filled: kerasdet variables the source has no counterpart for, set to zero (the
        conv biases of keras.applications' ResNet that keras-hub's lacks).
      reinitialized: variables re-initialized for a new class list.
      kept_classes: ``{target class index: source class index}`` whose output rows were kept.
      notes: other facts (mapped options, what differs).
    """

    source: str
    loaded: list = dataclasses.field(default_factory=list)
    zero_filled: list = dataclasses.field(default_factory=list)
    reinitialized: list = dataclasses.field(default_factory=list)
    kept_classes: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        lines = [f"weights from {self.source}: {len(self.loaded)} variables loaded, "
                 f"{len(self.zero_filled)} zero-filled (no counterpart), "
                 f"{len(self.reinitialized)} re-initialized, {len(self.kept_classes)} class rows kept"]
        lines += [f"  - {n}" for n in self.notes]
        return "\n".join(lines)


# --- reading a keras-hub preset -----------------------------------------------------------
def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not a readable JSON file ({e})") from None


def read_keras_hub_preset(preset_dir) -> dict:
    """The JSON parts of a local keras-hub preset folder.

    Returns ``{"dir", "backbone" (config.json), "task" (task.json or None), "converter"
    (the image converter config or None), "metadata"}``.

    Raises:
      WeightsError: no such folder, no ``config.json`` / ``model.weights.h5``.
    """
    path = os.fspath(preset_dir)
    if not os.path.isdir(path):
        raise DataFileNotFoundError(f"keras-hub preset folder not found: {path}")
    for name in ("config.json", "model.weights.h5"):
        if not os.path.isfile(os.path.join(path, name)):
            raise WeightsError(f"{path} is not a keras-hub preset folder: it has no {name}")
    out = {"dir": path, "backbone": _read_json(os.path.join(path, "config.json")), "task": None,
           "converter": None, "metadata": {}}
    if os.path.isfile(os.path.join(path, "metadata.json")):
        out["metadata"] = _read_json(os.path.join(path, "metadata.json"))
    if os.path.isfile(os.path.join(path, "task.json")):
        out["task"] = _read_json(os.path.join(path, "task.json"))
    for name in ("image_converter.json", "preprocessor.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            cfg = _read_json(file)
            if "ImageConverter" in cfg.get("class_name", ""):
                out["converter"] = cfg["config"]
                break
            conv = cfg.get("config", {}).get("image_converter")
            if isinstance(conv, dict):
                out["converter"] = conv["config"]
                break
    return out


def _cls(cfg):
    return cfg.get("class_name", "") if isinstance(cfg, dict) else ""


def _resnet_config(backbone_cfg, where):
    """The ``ResNetBackbone`` config of a preset's backbone (itself or its image encoder)."""
    if _cls(backbone_cfg) == "ResNetBackbone":
        return backbone_cfg["config"]
    if _cls(backbone_cfg) == "RetinaNetBackbone":
        enc = backbone_cfg["config"]["image_encoder"]
        if _cls(enc) != "ResNetBackbone":
            raise WeightsError(f"{where}: image encoder is a {_cls(enc)!r}, not a ResNetBackbone: only keras-hub "
                               "ResNets map onto kerasdet's ResNet backbones")
        return enc["config"]
    raise WeightsError(f"{where}: backbone is a {_cls(backbone_cfg)!r}; expected a keras-hub ResNetBackbone or "
                       "RetinaNetBackbone")


def _resnet_depth(cfg, where):
    """Checks a keras-hub ResNetBackbone config maps onto kerasdet's; returns its depth."""
    expected = {"input_conv_filters": [64], "input_conv_kernel_sizes": [7],
                "stackwise_num_filters": [64, 128, 256, 512], "stackwise_num_strides": [1, 2, 2, 2],
                "block_type": "bottleneck_block", "use_pre_activation": False}
    for key, value in expected.items():
        if cfg.get(key) != value:
            raise WeightsError(f"{where}: ResNet {key}={cfg.get(key)!r} does not map onto kerasdet's ResNet "
                               f"(needs {value!r}: the v1 bottleneck ResNet with a 7x7 stem)")
    blocks = tuple(cfg.get("stackwise_num_blocks") or ())
    if blocks not in KERAS_HUB_RESNET_BLOCKS:
        raise WeightsError(f"{where}: ResNet stackwise_num_blocks={list(blocks)} is not ResNet-50 or -101")
    return KERAS_HUB_RESNET_BLOCKS[blocks]


def keras_hub_normalization(converter, where="preset"):
    """kerasdet ``normalization`` (:class:`~kerasdet.backbones.CaffePreprocess` arguments)
    equal to a keras-hub image converter's ``x * scale + offset`` on RGB 0..255 pixels."""
    if converter is None:
        raise WeightsError(f"{where}: the preset has no image converter (preprocessor.json), so its image "
                           "normalization is unknown; pass normalization={'mean': [...], 'scale': [...], "
                           "'reverse_channels': False}")
    scale = converter.get("scale")
    offset = converter.get("offset")
    scale = np.broadcast_to(np.asarray(1.0 if scale is None else scale, np.float64), (3,))
    offset = np.broadcast_to(np.asarray(0.0 if offset is None else offset, np.float64), (3,))
    if np.any(scale == 0):
        raise WeightsError(f"{where}: image converter scale {list(scale)} has a zero")
    return {"mean": [float(v) for v in -offset / scale], "scale": [float(v) for v in scale],
            "reverse_channels": False}


def _h5_arrays(path):
    """``{dataset path: array}`` of a Keras 3 ``.weights.h5`` file."""
    import h5py

    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    out = {}
    try:
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: out.__setitem__(name, np.asarray(obj)) if isinstance(obj, h5py.Dataset)
                         else None)
    except OSError as e:
        raise WeightsError(f"{path}: not a readable .weights.h5 file ({e})") from None
    return out


def _vars(arrays, prefix, file):
    """The ``vars/0..n`` arrays under ``prefix`` in order."""
    out = []
    while f"{prefix}/vars/{len(out)}" in arrays:
        out.append(arrays[f"{prefix}/vars/{len(out)}"])
    if not out:
        raise WeightsError(f"{file}: no weights at {prefix!r} (is this a keras-hub preset of the expected model?)")
    return out


def _hub_resnet_names(depth):
    """keras-hub's saved names (``conv2d_7``, ``batch_normalization_3``) of each weighted
    ResNet layer, keyed by the keras.applications name of kerasdet's equivalent layer.

    Keras 3 names a functional model's layers in a weights file by class name and position
    in ``model.layers``; keras-hub's ResNet is built in the order and topology of
    :func:`kerasdet.backbones.resnet.resnet_v1_layers` with ``stride_in_3x3=True``, so a
    symbolic copy of that graph gives the positions."""
    import keras

    from kerasdet.backbones.resnet import resnet_v1_layers

    images = keras.Input((None, None, 3))
    outs = resnet_v1_layers(images, depth, stride_in_3x3=True, batchnorm_epsilon=1e-5)
    last = list(outs)[-1]
    model = keras.Model(images, outs[last])
    counters, names = {}, {}
    for layer in model.layers:
        kind = {"Conv2D": "conv2d", "BatchNormalization": "batch_normalization"}.get(type(layer).__name__)
        if kind is None:
            continue
        i = counters.get(kind, 0)
        counters[kind] = i + 1
        names[layer.name] = kind if i == 0 else f"{kind}_{i}"
    return names


# --- backbones ------------------------------------------------------------------------------
def _set(layer, values, report, path_of):
    current = layer.get_weights()
    if len(values) != len(current) or any(tuple(v.shape) != tuple(c.shape) for v, c in zip(values, current)):
        raise WeightsError(f"{report.source}: weights of {path_of} have shapes {[tuple(v.shape) for v in values]}, "
                           f"kerasdet layer {layer.name!r} needs {[tuple(c.shape) for c in current]}")
    layer.set_weights(values)
    report.loaded += [v.path for v in layer.weights]


def _check_resnet_backbone(backbone, depth, normalization, where):
    """Errors naming the first piece of a kerasdet backbone that differs from the preset."""
    from kerasdet.backbones.resnet import RESNET_LEVEL_LAYERS

    names = {layer.name for layer in backbone.layers}
    if RESNET_LEVEL_LAYERS[depth]["C4"] not in names or (depth == 50 and "conv4_block7_out" in names):
        raise WeightsError(f"{where}: the preset is a ResNet-{depth}; the kerasdet backbone "
                           f"{backbone.name!r} is not (set backbone.name=resnet{depth})")
    conv = backbone.get_layer("conv3_block1_2_conv")
    if tuple(conv.strides) != (2, 2):
        raise WeightsError(f"{where}: the preset's ResNet has the stride in the 3x3 conv (keras-hub / torchvision "
                           "v1.5); this backbone has it in the 1x1 (set backbone.stride_in_3x3=true)")
    eps = backbone.get_layer("conv1_bn").epsilon
    if not math.isclose(eps, 1e-5, rel_tol=1e-6):
        raise WeightsError(f"{where}: BatchNormalization epsilon {eps} differs from keras-hub's 1e-5 "
                           "(set backbone.batchnorm_epsilon=1e-5)")
    pre = backbone.get_layer("caffe_preprocess")
    have = {"mean": list(pre.mean), "scale": list(pre.scale or (1.0, 1.0, 1.0)),
            "reverse_channels": pre.reverse_channels}
    if have["reverse_channels"] != normalization["reverse_channels"] or not (
            np.allclose(have["mean"], normalization["mean"], rtol=1e-5, atol=1e-4)
            and np.allclose(have["scale"], normalization["scale"], rtol=1e-5)):
        raise WeightsError(f"{where}: image normalization differs: the preset's converter is {normalization}, the "
                           f"backbone's {have} (set backbone.normalization to the preset's)")


def _load_resnet_arrays(backbone, arrays, prefix, depth, report):
    names = _hub_resnet_names(depth)
    for layer in backbone.layers:
        if not layer.weights:
            continue
        if layer.name not in names:
            raise WeightsError(f"{report.source}: kerasdet backbone layer {layer.name!r} has no keras-hub counterpart")
        hub_path = f"{prefix}{names[layer.name]}"
        values = _vars(arrays, hub_path, report.source)
        if type(layer).__name__ == "Conv2D" and layer.use_bias and len(values) == 1:
            values = [values[0], np.zeros(layer.bias.shape, values[0].dtype)]
            report.zero_filled.append(layer.bias.path)
            _set(layer, values, report, hub_path)
            report.loaded.remove(layer.bias.path)
        else:
            _set(layer, values, report, hub_path)


def resnet_from_keras_hub(preset_dir, *, freeze_at=2, frozen_batchnorm=True, normalization=None,
                          input_shape=(None, None, 3)):
    """A kerasdet ResNet backbone (``C2``-``C5``) with the weights of a keras-hub preset.

    Args:
      preset_dir: a ``ResNetBackbone`` preset folder (ImageNet ResNet-50/101) or a
        RetinaNet preset folder (its image encoder).
      freeze_at, frozen_batchnorm, input_shape: as :func:`kerasdet.backbones.resnet_backbone`.
      normalization: override of the image normalization (default: the preset's image
        converter; an error if it has none).

    Returns:
      ``(backbone, report)``.
    """
    from kerasdet.backbones.resnet import resnet_backbone

    preset = read_keras_hub_preset(preset_dir)
    depth = _resnet_depth(_resnet_config(preset["backbone"], preset["dir"]), preset["dir"])
    norm = normalization or keras_hub_normalization(preset["converter"], preset["dir"])
    backbone = resnet_backbone(depth, stride_in_3x3=True, batchnorm_epsilon=1e-5, normalization=norm,
                               freeze_at=freeze_at, frozen_batchnorm=frozen_batchnorm, input_shape=input_shape)
    report = load_keras_hub_resnet(backbone, preset_dir, normalization=norm)
    return backbone, report


def load_keras_hub_resnet(backbone, preset_dir, *, normalization=None):
    """Loads a keras-hub ResNet preset (or a RetinaNet preset's encoder) into a kerasdet
    ResNet backbone built with ``stride_in_3x3=True, batchnorm_epsilon=1e-5`` and the
    preset's normalization (checked: a mismatch is a :class:`WeightsError`)."""
    preset = read_keras_hub_preset(preset_dir)
    where = preset["dir"]
    depth = _resnet_depth(_resnet_config(preset["backbone"], where), where)
    norm = normalization or keras_hub_normalization(preset["converter"], where)
    _check_resnet_backbone(backbone, depth, norm, where)
    file = os.path.join(where, "model.weights.h5")
    arrays = _h5_arrays(file)
    prefix = "layers/functional/layers/" if _cls(preset["backbone"]) == "RetinaNetBackbone" else "layers/"
    report = LoadReport(source=file)
    trainable = {layer.name: layer.trainable for layer in backbone.layers}
    for layer in backbone.layers:  # set_weights needs every weight in a fixed order
        layer.trainable = True
    try:
        _load_resnet_arrays(backbone, arrays, prefix, depth, report)
    finally:
        for layer in backbone.layers:
            layer.trainable = trainable[layer.name]
    report.notes.append(f"ResNet-{depth} v1.5 (stride in 3x3), image normalization {norm}")
    return report


# --- RetinaNet ------------------------------------------------------------------------------
def keras_hub_retinanet_config(preset_dir) -> dict:
    """``{"depth", "normalization", "num_classes", "model": RetinaNet keyword arguments}``
    equal to a keras-hub RetinaNet preset, or a :class:`WeightsError` naming what does not
    map."""
    preset = read_keras_hub_preset(preset_dir)
    where = preset["dir"]
    task = preset["task"]
    if task is None or _cls(task) != "RetinaNetObjectDetector":
        raise WeightsError(f"{where}: no RetinaNetObjectDetector task.json (the folder holds only a "
                           f"{_cls(preset['backbone']) or 'unknown'} backbone; load it with backbone weights)")
    if not os.path.isfile(os.path.join(where, "task.weights.h5")):
        raise WeightsError(f"{where}: no task.weights.h5 (the detector heads' weights)")
    tcfg = task["config"]
    bcfg = preset["backbone"]
    if _cls(bcfg) != "RetinaNetBackbone":
        raise WeightsError(f"{where}: backbone is a {_cls(bcfg)!r}, not a RetinaNetBackbone")
    bcfg = bcfg["config"]
    depth = _resnet_depth(_resnet_config(preset["backbone"], where), where)
    checks = [("use_fpn_batch_norm", bcfg.get("use_fpn_batch_norm", False), False),
              ("use_prediction_head_norm", tcfg.get("use_prediction_head_norm", False), False),
              ("activation", tcfg.get("activation"), None)]
    for key, value, want in checks:
        if value != want:
            raise WeightsError(f"{where}: {key}={value!r} has no kerasdet equivalent (needs {want!r})")
    anchors = (tcfg.get("anchor_generator") or {}).get("config", {})
    num_scales = int(anchors.get("num_scales", 3))
    encoder = (tcfg.get("label_encoder") or {}).get("config", {})
    variance = encoder.get("box_variance", [1.0, 1.0, 1.0, 1.0])
    if [float(v) for v in variance] != [1.0, 1.0, 1.0, 1.0]:
        raise WeightsError(f"{where}: box coder variance {variance} (keras-hub decodes without it); needs 1s")
    if encoder.get("encoding_format", "center_xywh") != "center_xywh":
        raise WeightsError(f"{where}: box encoding {encoder.get('encoding_format')!r}; needs 'center_xywh'")
    if int(anchors.get("min_level", bcfg["min_level"])) != bcfg["min_level"] or \
            int(anchors.get("max_level", bcfg["max_level"])) != bcfg["max_level"]:
        raise WeightsError(f"{where}: anchor levels differ from the FPN levels")
    model = dict(
        min_level=int(bcfg["min_level"]), max_level=int(bcfg["max_level"]), backbone_max_level=5,
        fpn_channels=256, extra_levels="conv_c5" if bcfg.get("use_p5") else "conv_p5",
        head_convs=int(tcfg.get("pre_logits_num_conv_layers", 4)), head_channels=256,
        anchor_size=float(anchors.get("anchor_size", 4)),
        scales=[2.0 ** (i / num_scales) for i in range(num_scales)],
        aspect_ratios=[float(r) for r in anchors.get("aspect_ratios", [0.5, 1.0, 2.0])],
        anchor_center_offset=0.0, anchor_round_to_pixels=True, box_weights=[1.0, 1.0, 1.0, 1.0],
        prior_probability=float(tcfg.get("classification_head_prior_probability", 0.01)),
    )
    return {"depth": depth, "normalization": keras_hub_normalization(preset["converter"], where),
            "num_classes": int(tcfg["num_classes"]), "model": model}


def retinanet_from_keras_hub(preset_dir, *, num_classes=None, class_names=None, source_class_names=None,
                             normalization=None, freeze_at=2, freeze="none", **retinanet_kwargs):
    """A kerasdet RetinaNet equal to a keras-hub ``RetinaNetObjectDetector`` preset.

    Args:
      preset_dir: the local preset folder (``config.json``, ``model.weights.h5``,
        ``task.json``, ``task.weights.h5``, ``preprocessor.json``).
      num_classes: default the preset's; another value fine-tunes (classification output
        re-initialized; see ``class_names``).
      class_names, source_class_names: the new and the preset's class names; the output
        rows of the classes in both are kept. Default ``None``: none kept.
      normalization: override of the preset's image normalization.
      freeze_at: ResNet stages frozen (default 2, as the recipes).
      freeze: ``"none"`` (default), ``"backbone"`` or ``"backbone_fpn"``.
      **retinanet_kwargs: other RetinaNet arguments (post-processing, loss); the ones the
        preset fixes (levels, anchors, widths) are an error if they differ.

    Returns:
      ``(model, report)``.
    """
    from kerasdet.backbones.resnet import resnet_backbone
    from kerasdet.models.retinanet import RetinaNet

    cfg = keras_hub_retinanet_config(preset_dir)
    for key, value in retinanet_kwargs.items():
        if key in cfg["model"] and value != cfg["model"][key]:
            raise WeightsError(f"{preset_dir}: {key}={value!r} differs from the preset's {cfg['model'][key]!r}")
    norm = normalization or cfg["normalization"]
    backbone = resnet_backbone(cfg["depth"], stride_in_3x3=True, batchnorm_epsilon=1e-5, normalization=norm,
                               freeze_at=freeze_at)
    model = RetinaNet(backbone=backbone, num_classes=num_classes or cfg["num_classes"],
                      **{**retinanet_kwargs, **cfg["model"]})
    model.build()
    report = load_keras_hub_retinanet(model, preset_dir, class_names=class_names,
                                      source_class_names=source_class_names, normalization=norm)
    freeze_detector(model, freeze)
    return model, report


def _check_model_config(model, want, where):
    have = model.get_config()
    for key, value in want.items():
        mine = have.get(key)
        same = (np.allclose(np.asarray(mine, float), np.asarray(value, float), rtol=1e-6)
                if isinstance(value, (list, tuple, float)) and not isinstance(value, bool) else mine == value)
        if not same:
            raise WeightsError(f"{where}: model.{key}={mine!r} differs from the preset's {value!r} "
                               f"(set model.{key}={json.dumps(value)})")


def _hub_out_permutation(num_scales, num_ratios, depth_per_anchor, coord_perm=None):
    """Index array: kerasdet output channel -> keras-hub output channel."""
    index = []
    for s in range(num_scales):
        for r in range(num_ratios):
            hub_anchor = r * num_scales + s
            for j in range(depth_per_anchor):
                index.append(hub_anchor * depth_per_anchor + (coord_perm[j] if coord_perm else j))
    return np.asarray(index)


def load_keras_hub_retinanet(model, preset_dir, *, class_names=None, source_class_names=None,
                             normalization=None):
    """Loads a keras-hub RetinaNet preset into a kerasdet RetinaNet (built, or built here).

    The model's backbone, FPN, head and anchor configuration are checked against the
    preset (first mismatch: :class:`WeightsError`). A model with another class count gets
    a fresh classification output (rows of ``class_names`` found in
    ``source_class_names`` kept). Returns a :class:`LoadReport`.
    """
    cfg = keras_hub_retinanet_config(preset_dir)
    where = os.fspath(preset_dir)
    if not model.built:
        model.build()
    norm = normalization or cfg["normalization"]
    _check_model_config(model, cfg["model"], where)
    report = load_keras_hub_resnet(model.backbone, preset_dir, normalization=norm)
    report.source = where
    arrays = _h5_arrays(os.path.join(where, "model.weights.h5"))
    fpn = model.fpn
    levels = list(range(cfg["model"]["min_level"], cfg["model"]["max_level"] + 1))
    for i, lvl in enumerate(levels):
        suffix = "" if i == 0 else f"_{i}"
        if f"p{lvl}" in fpn.lateral:
            path = f"layers/feature_pyramid/lateral_conv_layers/conv2d{suffix}"
            _set(fpn.lateral[f"p{lvl}"], _vars(arrays, path, where), report, path)
        target = fpn.smooth.get(f"p{lvl}") or fpn.extra[f"p{lvl}"]
        path = f"layers/feature_pyramid/output_conv_layers/conv2d{suffix}"
        _set(target, _vars(arrays, path, where), report, path)
    task = _h5_arrays(os.path.join(where, "task.weights.h5"))
    head = model.head
    num_scales, num_ratios = len(cfg["model"]["scales"]), len(cfg["model"]["aspect_ratios"])
    # box_head is built (and saved) before classification_head in keras-hub's detector.
    for prefix, tower in (("layers/prediction_head", head.box_tower), ("layers/prediction_head_1", head.class_tower)):
        for i, layer in enumerate(tower):
            path = f"{prefix}/conv_layers/conv2d{'' if i == 0 else f'_{i}'}"
            _set(layer, _vars(arrays=task, prefix=path, file=where), report, path)
    if f"layers/prediction_head/conv_layers/conv2d_{len(head.box_tower)}/vars/0" in task:
        raise WeightsError(f"{where}: the preset's subnets have more than {len(head.box_tower)} convs")
    kernel, bias = _vars(task, "layers/prediction_head/prediction_layer", where)
    if kernel.shape[-1] != 4 * num_scales * num_ratios:
        raise WeightsError(f"{where}: box output has {kernel.shape[-1]} channels, expected "
                           f"{4 * num_scales * num_ratios}")
    perm = _hub_out_permutation(num_scales, num_ratios, 4, coord_perm=(1, 0, 3, 2))  # (x,y,w,h) -> (y,x,h,w)
    _set(head.box_out, [kernel[..., perm], bias[perm]], report, "box_head/prediction_layer")
    kernel, bias = _vars(task, "layers/prediction_head_1/prediction_layer", where)
    source_k = cfg["num_classes"]
    if kernel.shape[-1] != source_k * num_scales * num_ratios:
        raise WeightsError(f"{where}: class output has {kernel.shape[-1]} channels, expected "
                           f"{source_k} classes x {num_scales * num_ratios} anchors")
    perm = _hub_out_permutation(num_scales, num_ratios, source_k)
    _set_class_output(head, kernel[..., perm], bias[perm], source_k, class_names, source_class_names, report)
    report.notes.append("anchors: torchvision grid (centres at i * stride, sizes rounded to pixels); output "
                        "channels permuted from keras-hub's ratio-major (x, y, w, h) order")
    return report


def _class_rows(num_anchors, k_total, k):
    return np.arange(num_anchors) * k_total + k


def _set_class_output(head, kernel, bias, source_k, class_names, source_class_names, report):
    """The classification output conv from a source's ``[3, 3, C, A * source_k]`` kernel:
    copied when the class count is the same (and no renaming), else re-initialized with
    the rows of shared class names kept."""
    target_k = head.num_classes
    a = head.num_anchors
    if class_names is not None and len(class_names) != target_k:
        raise WeightsError(f"class_names has {len(class_names)} names for a model of {target_k} classes")
    if source_class_names is not None and len(source_class_names) != source_k:
        raise WeightsError(f"source_class_names has {len(source_class_names)} names; the source model has "
                           f"{source_k} classes")
    same = target_k == source_k and (class_names is None or source_class_names is None
                                     or list(class_names) == list(source_class_names))
    if same:
        _set(head.class_out, [kernel, bias], report, "class output")
        return
    new_kernel = np.random.default_rng(0).normal(0.0, 0.01, head.class_out.kernel.shape).astype(kernel.dtype)
    prior = -math.log((1.0 - head.prior_probability) / head.prior_probability)
    new_bias = np.full(head.class_out.bias.shape, prior, bias.dtype)
    if class_names is not None and source_class_names is not None:
        source_index = {name: i for i, name in enumerate(source_class_names)}
        for k, name in enumerate(class_names):
            if name in source_index:
                j = source_index[name]
                new_kernel[..., _class_rows(a, target_k, k)] = kernel[..., _class_rows(a, source_k, j)]
                new_bias[_class_rows(a, target_k, k)] = bias[_class_rows(a, source_k, j)]
                report.kept_classes[k] = j
    head.class_out.set_weights([new_kernel, new_bias])
    report.reinitialized += [head.class_out.kernel.path, head.class_out.bias.path]
    report.notes.append(f"class output re-initialized for {target_k} classes (source {source_k}; prior "
                        f"{head.prior_probability}); rows kept for {len(report.kept_classes)} classes by name")


# --- kerasdet sources -----------------------------------------------------------------------
def transfer_detector_weights(source, target, *, class_names=None, source_class_names=None, source_name="model"):
    """Copies every weight of kerasdet detector ``source`` into ``target`` (same class and
    architecture, maybe another class count). Only RetinaNet-style heads (``head.class_out``)
    can change class count. Returns a :class:`LoadReport`."""
    for m in (source, target):
        if not m.built:
            m.build()
    report = LoadReport(source=source_name)
    if type(source) is not type(target):
        raise WeightsError(f"{source_name}: a {type(source).__name__}, the model is a {type(target).__name__}")
    head_t, head_s = getattr(target, "head", None), getattr(source, "head", None)
    skip = set()
    if head_t is not None and hasattr(head_t, "class_out"):
        skip = {id(head_t.class_out.kernel), id(head_t.class_out.bias)}
    src_skip = set()
    if head_s is not None and hasattr(head_s, "class_out"):
        src_skip = {id(head_s.class_out.kernel), id(head_s.class_out.bias)}
    src = [v for v in source.weights if id(v) not in src_skip]
    dst = [v for v in target.weights if id(v) not in skip]
    if len(src) != len(dst):
        raise WeightsError(f"{source_name}: {len(src)} variables, the model has {len(dst)}: not the same architecture")
    for s, d in zip(src, dst):
        if tuple(s.shape) != tuple(d.shape):
            raise WeightsError(f"{source_name}: {s.path} has shape {tuple(s.shape)}, the model's {d.path} "
                               f"{tuple(d.shape)}: not the same architecture (first mismatch)")
    for s, d in zip(src, dst):
        d.assign(s)
        report.loaded.append(d.path)
    if skip:
        _set_class_output(head_t, np.asarray(head_s.class_out.kernel), np.asarray(head_s.class_out.bias),
                          head_s.num_classes, class_names, source_class_names, report)
    return report


def _kerasdet_num_classes(path, model):
    """Class count of a kerasdet RetinaNet-style weights file (from its class output bias)."""
    arrays = _h5_arrays(path)
    biases = [a for name, a in arrays.items() if "class_out" in name and name.endswith("vars/1")]
    if len(biases) != 1:
        raise WeightsError(f"{path}: not a kerasdet RetinaNet weights file (no single class output)")
    a = model.head.num_anchors
    if biases[0].shape[0] % a:
        raise WeightsError(f"{path}: class output of {biases[0].shape[0]} channels is not a multiple of "
                           f"{a} anchors")
    return biases[0].shape[0] // a


def load_detector_weights(model, path, *, class_names=None, source_class_names=None, freeze="none"):
    """``model.weights=PATH``: loads weights into a kerasdet detector (built here if needed).

    ``path`` is one of:

    * a keras-hub RetinaNet preset folder (``config.json`` + ``task.json``): see
      :func:`load_keras_hub_retinanet`;
    * a kerasdet run folder (``run.json``; its ``model.weights.h5`` and label map, whose
      class names serve as ``source_class_names``);
    * a kerasdet ``.weights.h5`` file of the same architecture.

    A different class count re-initializes the classification output (RetinaNet), keeping
    the rows of the classes named in both lists. ``freeze``: see :func:`freeze_detector`.

    Raises:
      WeightsError: missing path, unknown folder layout, or an architecture mismatch
        (naming the first mismatching piece).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataFileNotFoundError(f"model.weights: no such file or folder: {path}")
    if not model.built:
        model.build()
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            report = load_keras_hub_retinanet(model, path, class_names=class_names,
                                              source_class_names=source_class_names)
            freeze_detector(model, freeze)
            return report
        if os.path.isfile(os.path.join(path, "run.json")):
            record = _read_json(os.path.join(path, "run.json"))
            names = record.get("label_map", {}).get("category_names")
            file = record.get("paths", {}).get("weights") or os.path.join(path, "model.weights.h5")
            if not os.path.isfile(file):
                file = os.path.join(path, "model.weights.h5")
            report = load_detector_weights(model, file, class_names=class_names,
                                           source_class_names=source_class_names or names)
            freeze_detector(model, freeze)
            return report
        raise WeightsError(f"model.weights: {path} is neither a keras-hub preset folder (config.json) nor a "
                           "kerasdet run folder (run.json)")
    if not path.endswith(".weights.h5"):
        raise WeightsError(f"model.weights: {path} is not a .weights.h5 file, a run folder or a keras-hub preset")
    head = getattr(model, "head", None)
    if head is not None and hasattr(head, "class_out"):
        source_k = _kerasdet_num_classes(path, model)
        if source_k != model.num_classes or (class_names is not None and source_class_names is not None):
            config = model.get_config()
            config["num_classes"] = source_k
            source = type(model).from_config(config)
            try:
                source.build()
                source.load_weights(path)
            except (ValueError, KeyError) as e:
                raise WeightsError(f"model.weights: {path} does not fit the model's architecture: "
                                   f"{str(e).splitlines()[0][:300]}") from None
            report = transfer_detector_weights(source, model, class_names=class_names,
                                               source_class_names=source_class_names, source_name=path)
            freeze_detector(model, freeze)
            return report
    try:
        model.load_weights(path)
    except (ValueError, KeyError) as e:
        raise WeightsError(f"model.weights: {path} does not fit the model's architecture: "
                           f"{str(e).splitlines()[0][:300]}") from None
    report = LoadReport(source=path, loaded=[v.path for v in model.weights])
    freeze_detector(model, freeze)
    return report


def freeze_detector(model, freeze="none"):
    """Freezes parts of a detector for fine-tuning: ``"none"`` (default), ``"backbone"`` or
    ``"backbone_fpn"``. BatchNorm stays frozen as the backbones build it; unfreezing is
    not done here (see :func:`kerasdet.backbones.freeze_resnet`). Returns the model."""
    if freeze not in FREEZE_CHOICES:
        raise UserInputError(f"freeze={freeze!r}: expected one of {', '.join(FREEZE_CHOICES)}")
    if freeze in ("backbone", "backbone_fpn"):
        model.backbone.trainable = False
    if freeze == "backbone_fpn":
        model.fpn.trainable = False
    return model
