"""Typed run configuration: sections, strict loading, ``--set`` overrides.

A recipe preset is a plain dict of sections (``data``, ``input``, ``backbone``, ``model``,
``train``, ``eval``, ``export`` and any open section the recipe declares, e.g. SMN's
``base``). :func:`load_config` turns it into a :class:`Config`:

* the closed sections (:class:`DataConfig`, :class:`InputConfig`, :class:`TrainConfig`
  with its ordered :class:`StageConfig` list, :class:`EvalConfig`, :class:`ExportConfig`)
  are dataclasses: an unknown or misspelt key is a :class:`~kerasdet.errors.ConfigError`
  naming the key, its section and the closest valid keys; every value is type-checked
  (a string where a number belongs is an error here, not a crash deep in TensorFlow);
* the open sections (``backbone``, ``model``, ``data.generate``, stage ``params``) are
  keyword arguments of a callable (the backbone builder, the model class, the digits
  generator, the recipe's stage hook): :func:`check_kwargs` checks their names against
  the callable's signature and their types against its defaults.

Overrides (``--set key=value``) are dotted paths into the preset dict
(``train.epochs=3``, ``train.stages.1.lr=1e-4``); values are JSON (``[8,16]``, ``true``,
``null``) or else plain strings. Paths are checked like keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import typing
from typing import Any, Literal, Optional, Union

from kerasdet.errors import ConfigError

#: Keys of the ``model`` section that are not the model class's arguments: the weights to
#: start from (:func:`kerasdet.weights.load_detector_weights`: a keras-hub preset folder, a
#: kerasdet run folder or ``.weights.h5`` file) and what to freeze (``none``,
#: ``backbone``, ``backbone_fpn``).
MODEL_WEIGHT_KEYS = {"weights": None, "freeze": "none"}

#: The closed sections and the open ones every recipe has.
SECTIONS = ("data", "input", "backbone", "model", "train", "eval", "export")


# --- sections --------------------------------------------------------------------------------
@dataclasses.dataclass
class DataConfig:
    """Where the data comes from.

    Attributes:
      kind: ``"digits"`` (the embedded set, generated under ``dir``), ``"coco"`` (COCO JSON
        + image folders) or ``"voc"`` (VOCdevkit year folders under ``voc_root``).
      dir: digits: where the set is generated (idempotent). Default ``data/digits``.
      generate: digits: keyword arguments of :func:`kerasdet.data.digits.generate_digits`.
      train_annotations, train_images, val_annotations, val_images: coco: the JSON files
        and image folders of the two splits.
      voc_root: voc: the ``VOCdevkit`` folder (holding ``VOC2007``, ``VOC2012``, ...).
      train_sets, val_sets: voc: ``"<year>/<split>"`` entries joined into one split
        (``("2007/trainval", "2012/trainval")`` is the papers' 07+12).
      use_difficult: voc: train on ``difficult`` objects too (default: ignored, as the VOC
        protocol).
      train_records, val_records: tfrecord: glob patterns of the TFRecord shards
        (OD API / Model Garden ``tf.Example`` schema, :mod:`kerasdet.data.tfrecord`).
      label_map: tfrecord: optional OD API label map (pbtxt) or JSON ``{id: name}``: the
        class list (its ids, sorted) and names; default: the sorted labels found in the
        training records, named by their ``class/text``.
    """

    kind: Literal["digits", "coco", "voc", "tfrecord"] = "digits"
    dir: str = "data/digits"
    generate: dict = dataclasses.field(default_factory=dict)
    train_annotations: Optional[str] = None
    train_images: Optional[str] = None
    val_annotations: Optional[str] = None
    val_images: Optional[str] = None
    voc_root: Optional[str] = None
    train_sets: tuple[str, ...] = ("2007/trainval", "2012/trainval")
    val_sets: tuple[str, ...] = ("2007/test",)
    use_difficult: bool = False
    train_records: Optional[str] = None
    val_records: Optional[str] = None
    label_map: Optional[str] = None


@dataclasses.dataclass
class InputConfig:
    """The input pipeline (:func:`kerasdet.data.pipeline.make_dataset`).

    Attributes:
      image_size: ``(H, W)`` canvas every image is resized (aspect kept) and padded onto.
      min_size, max_size: Detectron's resize rule (short side -> ``min_size``, long side
        at most ``max_size``); default: fit the canvas.
      flip: random horizontal flip in training.
      scale_jitter: ``(low, high)`` random scale in training.
      ssd_augmentation: SSD's photometric distortion, expand and IoU crop.
      cache_images: keep decoded images in memory after the first epoch.
      max_boxes: rows of the padded label tensors.
      masks: ``"union"`` / ``"instances"`` to decode segmentations, else none.
      decoder: ``"tf"`` (graph-native PNG/JPEG decoding, the default) or ``"opencv"``
        (OpenCV in a ``tf.numpy_function``, the pipeline before graph decoding).
      data_service: ``"grpc://host:port"`` of a tf.data service dispatcher: the per-image
        training preprocessing runs on its workers (``distributed_epoch``: each stream
        position is processed by exactly one worker; batches are formed here). Default
        None: preprocessing in this process.
      shuffle_buffer_size: tfrecord: the record shuffle buffer in training.
    """

    image_size: tuple[int, int] = (512, 512)
    min_size: Optional[int] = None
    max_size: Optional[int] = None
    flip: bool = True
    scale_jitter: Optional[tuple[float, float]] = None
    ssd_augmentation: bool = False
    cache_images: bool = False
    max_boxes: int = 100
    masks: Optional[Literal["union", "instances"]] = None
    decoder: Literal["tf", "opencv"] = "tf"
    data_service: Optional[str] = None
    shuffle_buffer_size: int = 1024


@dataclasses.dataclass
class StageConfig:
    """One stage of training: one ``fit`` with a fresh optimizer.

    Every optimizer/schedule field left ``None`` takes the :class:`TrainConfig` value.

    Attributes:
      name: the stage's name (unique in the run; names its backup, logs and weights).
      kind: what the stage trains, read by the recipe's stage hook (SMN: ``"base"`` /
        ``"memory"``; decompNet: ``"category"`` / ``"instance"`` / ``"joint"`` /
        ``"box"``); default ``"train"`` (the whole model).
      epochs, steps: the stage's length (``steps`` wins; ``epochs`` may be fractional).
      evaluate_every: evaluate every this many epochs during the stage; default: only the
        last stage evaluates, every ``eval.every_n_epochs``.
      params: recipe-specific stage parameters (SMN: ``num_steps``; decompNet:
        ``warmup_epochs``), checked against the recipe's ``STAGE_PARAMS``.
    """

    name: str = "train"
    kind: str = "train"
    epochs: Optional[float] = None
    steps: Optional[int] = None
    lr: Optional[float] = None
    optimizer: Optional[Literal["sgd", "adam", "adamw"]] = None
    schedule: Optional[Literal["step", "cosine"]] = None
    decay_at: Optional[tuple[float, ...]] = None
    decay_steps: Optional[tuple[int, ...]] = None
    decay: Optional[float] = None
    cosine_alpha: Optional[float] = None
    warmup_steps: Optional[int] = None
    warmup_factor: Optional[float] = None
    clipnorm: Optional[float] = None
    evaluate_every: Optional[int] = None
    params: dict = dataclasses.field(default_factory=dict)


#: Stage fields that default to the TrainConfig field of the same name.
INHERITED_STAGE_FIELDS = ("epochs", "steps", "lr", "optimizer", "schedule", "decay_at", "decay_steps", "decay",
                          "cosine_alpha", "warmup_steps", "warmup_factor", "clipnorm")


@dataclasses.dataclass
class TrainConfig:
    """Optimization.

    Attributes:
      batch_size: the GLOBAL batch: images per optimizer step summed over all replicas
        and workers (each of N workers reads ``batch_size / N`` images a step). An epoch
        is ``len(train) // batch_size`` steps whatever N is, so the schedule below means
        the same for 1 and N workers.
      reference_batch: ``lr`` is given for this batch and scaled linearly to
        ``batch_size`` (Goyal et al. 2017); default: ``batch_size`` (no scaling).
      lr, optimizer (``sgd`` with ``momentum``, ``adam``, ``adamw``), clipnorm.
      weight_decay: coupled L2 on conv/dense kernels (passed to the model).
      epochs, steps: length of the single stage when ``stages`` is empty.
      schedule: ``"step"`` (linear warm-up then x ``decay`` at ``decay_steps`` or at the
        fractions ``decay_at`` of the stage) or ``"cosine"`` (to ``cosine_alpha`` x lr).
      warmup_steps, warmup_factor: linear warm-up from ``warmup_factor`` x lr.
      nan_policy: ``"raise"`` / ``"skip"`` / ``"off"`` (see :class:`kerasdet.models.base.Detector`).
      jit_compile: XLA-compile the train step.
      backup_every: exact-resume backup every N steps, or ``"epoch"``.
      stages: ordered stages; empty: one stage ``train`` of ``epochs``.
    """

    batch_size: int = 16
    reference_batch: Optional[int] = None
    lr: float = 0.01
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    clipnorm: Optional[float] = None
    epochs: float = 1
    steps: Optional[int] = None
    schedule: Literal["step", "cosine"] = "step"
    decay_at: tuple[float, ...] = ()
    decay_steps: Optional[tuple[int, ...]] = None
    decay: float = 0.1
    cosine_alpha: float = 0.0
    warmup_steps: int = 0
    warmup_factor: float = 1.0 / 3.0
    nan_policy: Literal["raise", "skip", "off"] = "raise"
    jit_compile: bool = False
    backup_every: Union[int, Literal["epoch"]] = "epoch"
    stages: tuple[StageConfig, ...] = ()

    def resolved_stages(self) -> tuple[StageConfig, ...]:
        """The stages with every inherited field filled in (one ``train`` stage when
        ``stages`` is empty)."""
        stages = self.stages or (StageConfig(),)
        out = []
        for stage in stages:
            values = {f: getattr(stage, f) if getattr(stage, f) is not None else getattr(self, f)
                      for f in INHERITED_STAGE_FIELDS}
            if stage.steps is None and stage.epochs is not None:
                values["steps"] = None  # the stage's own epochs win over train.steps
            out.append(dataclasses.replace(stage, **values))
        return tuple(out)


@dataclasses.dataclass
class EvalConfig:
    """Evaluation on the validation split.

    Attributes:
      metric: ``"coco"`` (pycocotools AP, AP50, ...), ``"coco_segm"`` (box and mask AP:
        also ``mask_AP``, ...; the model must predict ``masks``), ``"proposals"`` /
        ``"proposals_segm"`` (class-agnostic box / box and segment AR: ``AR10``, ...,
        ``ARl1000``, ``mask_AR10``, ...), ``"voc07"`` (11-point mAP at IoU 0.5, difficult
        objects ignored) or ``"voc12"`` (all-point mAP); see
        :mod:`kerasdet.evaluation.metrics`.
      every_n_epochs: evaluation during training (the last stage), every N epochs.
      batch_size: images per evaluation batch.
    """

    metric: Literal["coco", "coco_segm", "proposals", "proposals_segm", "voc07", "voc12"] = "coco"
    every_n_epochs: int = 1
    batch_size: int = 8


@dataclasses.dataclass
class ExportConfig:
    """The SavedModel export at the end of a run.

    Attributes:
      enabled: export at all (``--no-export`` sets it False).
      dir: where; default ``saved_models/<recipe>_<preset>``.
      num_draw: validation images drawn with the exported model's detections.
      score_threshold: drawing threshold.
      precision: the serving graph's compute dtype: ``"auto"`` (default: bfloat16 on a CPU
        with native bfloat16, AVX512_BF16 / AMX-BF16, when the validation headline metric
        computed in bfloat16 is at most ``max_metric_drop`` below float32's, else
        float32; the check and the choice are written to ``run.json``), ``"float32"`` or
        ``"bfloat16"`` (forced).
      max_metric_drop: ``"auto"``'s tolerance. Default 0.005 (half a point of AP).
      fold_batchnorm: fold every backbone BatchNormalization into its convolution in the
        serving graph (:func:`kerasdet.precision.inference_variant`). Default True.
    """

    enabled: bool = True
    dir: Optional[str] = None
    num_draw: int = 4
    score_threshold: float = 0.3
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    max_metric_drop: float = 0.005
    fold_batchnorm: bool = True


@dataclasses.dataclass
class Config:
    """A resolved run configuration (closed sections typed, open ones checked dicts)."""

    data: DataConfig
    input: InputConfig
    backbone: dict
    model: dict
    train: TrainConfig
    eval: EvalConfig
    export: ExportConfig
    extra: dict = dataclasses.field(default_factory=dict)  # recipe-declared open sections

    def section(self, name: str) -> dict:
        """An open section by name (``backbone``, ``model`` or one the recipe declares)."""
        if name in ("backbone", "model"):
            return getattr(self, name)
        if name not in self.extra:
            raise ConfigError(f"no section {name!r} in this config (it has {sorted(self.extra)})")
        return self.extra[name]

    def to_dict(self) -> dict:
        """Plain JSON-able dict; :func:`load_config` of it gives this config back."""
        out = {name: to_plain(getattr(self, name)) for name in SECTIONS}
        out.update({name: to_plain(value) for name, value in self.extra.items()})
        return out


_CLOSED = {"data": DataConfig, "input": InputConfig, "train": TrainConfig, "eval": EvalConfig,
           "export": ExportConfig}


# --- loading -----------------------------------------------------------------------------------
def unknown_key_error(key: str, where: str, valid) -> ConfigError:
    """The error for an unknown key: names it, its section and the closest valid keys."""
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown key {key!r} in section {where!r}; {hint}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_value(tp, value, where: str):
    """``value`` checked (and normalized: lists -> tuples, ints -> floats) against the type
    hint ``tp``; a :class:`ConfigError` naming ``where`` otherwise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return check_value(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} is not a valid value ({'; '.join(errors)})")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(check_value(args[0], v, f"{where}.{i}") for i, v in enumerate(value))
        if args:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(check_value(a, v, f"{where}.{i}") for i, (a, v) in enumerate(zip(args, value)))
        return tuple(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return load_section(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"check_value: unsupported type hint {_type_name(tp)} at {where}")  # a bug, not input


def load_section(cls, data, where: str):
    """A dataclass section from a dict, strictly (unknown keys and bad types are errors)."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"section {where!r} must be a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise unknown_key_error(key, where, names)
        kwargs[key] = check_value(hints[key], value, f"{where}.{key}")
    return cls(**kwargs)


def keyword_parameters(fn, exclude=()) -> dict:
    """``{name: inspect.Parameter}`` of ``fn``'s named parameters (a class: its
    ``__init__``), without ``self``, ``*args``/``**kwargs`` and ``exclude``."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    params = inspect.signature(target).parameters
    return {name: p for name, p in params.items()
            if name != "self" and name not in exclude
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}


def _check_like_default(default, value, where):
    """Type check of an open-section value against the parameter's default."""
    if default is inspect.Parameter.empty or default is None or value is None:
        return value
    if isinstance(default, bool):
        return check_value(bool, value, where)
    if isinstance(default, int):
        return check_value(int, value, where)
    if isinstance(default, float):
        return check_value(float, value, where)
    if isinstance(default, str):
        return check_value(str, value, where)
    if isinstance(default, (tuple, list)):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return value
    return value


def check_kwargs(fn, kwargs: dict, where: str, *, exclude=(), extra=None) -> dict:
    """``kwargs`` checked against ``fn``'s signature: every key a named parameter (an
    unknown key is a :class:`ConfigError` with the closest names), every value of the
    type of the parameter's default (lists stay lists). ``extra`` (``{name: default}``)
    adds keys that are not ``fn``'s (e.g. a section's ``weights`` path)."""
    if not isinstance(kwargs, dict):
        raise ConfigError(f"section {where!r} must be a mapping, got {type(kwargs).__name__} {kwargs!r}")
    defaults = {name: p.default for name, p in keyword_parameters(fn, exclude).items()}
    defaults.update(extra or {})
    out = {}
    for key, value in kwargs.items():
        if key not in defaults:
            raise unknown_key_error(key, where, defaults)
        out[key] = _check_like_default(defaults[key], value, f"{where}.{key}")
    return out


def parse_overrides(items) -> dict:
    """``["train.epochs=3", "model.name=x"]`` -> ``{"train.epochs": 3, "model.name": "x"}``
    (JSON values, else the plain string)."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def apply_overrides(preset: dict, overrides: dict, sections) -> dict:
    """A plain copy of ``preset`` (tuples as lists) with dotted ``overrides`` set. The
    first part must be a section; inside a list, a part is an index
    (``train.stages.1.lr``). New keys are created here and checked by
    :func:`load_config`."""
    config = to_plain(preset)
    for key, value in overrides.items():
        parts = key.split(".")
        if parts[0] not in sections:
            raise unknown_key_error(parts[0], "<top level>", sections)
        node = config.setdefault(parts[0], {})
        for depth, part in enumerate(parts[1:], start=1):
            where = ".".join(parts[:depth])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {where} has {len(node)} entries; {part!r} is not an index")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {where} is {node!r}, not a section")
            if depth == len(parts) - 1:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return config


def load_config(preset: dict, overrides: dict | None = None, *, model_class=None, backbone_builder=None,
                open_sections: dict | None = None, stage_params: dict | None = None) -> Config:
    """The :class:`Config` of a preset dict with ``overrides`` applied, strictly checked.

    Args:
      preset: ``{section: ...}`` (a recipe's ``PRESETS[name]`` or a ``run.json`` config).
      overrides: dotted keys (see :func:`apply_overrides`).
      model_class: the callable the ``model`` section is passed to; its keyword
        parameters are the valid ``model`` keys (``backbone``, ``num_classes``,
        ``weight_decay`` excluded: the builders set them).
      backbone_builder: ``name -> builder`` (default :func:`kerasdet.backbones.get_backbone`'s
        registry) for checking ``backbone`` keys.
      open_sections: other open sections ``{name: callable}`` or ``{name: (callable,
        {extra_key: default})}`` (SMN: ``{"base": (FasterRCNN, {"weights": None})}``).
      stage_params: ``{name: type}`` valid in a stage's ``params``.
    """
    open_sections = dict(open_sections or {})
    sections = (*SECTIONS, *open_sections)
    raw = apply_overrides(preset, overrides or {}, sections)
    for key in raw:
        if key not in sections:
            raise unknown_key_error(key, "<top level>", sections)
    values = {name: load_section(cls, raw.get(name, {}), name) for name, cls in _CLOSED.items()}
    data = values["data"]
    if data.generate:
        from kerasdet.data.digits import generate_digits

        data.generate = check_kwargs(generate_digits, data.generate, "data.generate", exclude=("output_dir",))
    for i, stage in enumerate(values["train"].stages):
        where = f"train.stages.{i}"
        for key, value in stage.params.items():
            if key not in (stage_params or {}):
                raise unknown_key_error(key, f"{where}.params", stage_params or {})
            stage.params[key] = check_value(stage_params[key], value, f"{where}.params.{key}")
    names = [s.name for s in values["train"].stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"train.stages: stage names must be unique, got {names}")
    model = dict(raw.get("model", {}))
    if model_class is not None:
        # model.weights / model.freeze: for the models built as backbone + the rest
        # (build_detector applies them); SMN (a `base`) and decompNet do not take them.
        takes_backbone = "backbone" in inspect.signature(model_class).parameters
        model = check_kwargs(model_class, model, "model", exclude=("backbone", "num_classes", "weight_decay", "base"),
                             extra=MODEL_WEIGHT_KEYS if takes_backbone else None)
    backbone = dict(raw.get("backbone", {}))
    if backbone:
        backbone = check_backbone(backbone, backbone_builder)
    extra = {}
    for name, spec in open_sections.items():
        fn, extra_keys = spec if isinstance(spec, tuple) else (spec, None)
        extra[name] = check_kwargs(fn, dict(raw.get(name, {})), name,
                                   exclude=("backbone", "num_classes", "weight_decay"), extra=extra_keys)
    return Config(backbone=backbone, model=model, extra=extra, **values)


def check_backbone(backbone: dict, builder_for=None) -> dict:
    """The ``backbone`` section: ``name`` plus the keyword arguments of that builder."""
    from kerasdet.backbones import backbone_builder

    if "name" not in backbone:
        raise ConfigError("section 'backbone' needs a 'name' (e.g. small, resnet50, vgg16)")
    name = backbone["name"]
    try:
        builder = (builder_for or backbone_builder)(name)
    except ValueError as exc:
        raise ConfigError(f"backbone.name: {exc}") from None
    rest = {k: v for k, v in backbone.items() if k != "name"}
    return {"name": name, **check_kwargs(builder, rest, "backbone")}


def to_plain(value):
    """Dataclasses, tuples and dicts as JSON-able dicts/lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
