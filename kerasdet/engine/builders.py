"""From a :class:`~kerasdet.engine.config.Config` to the objects of a run.

Public, documented functions the runner (and users' own scripts) call: data sources,
``tf.data`` datasets, backbones, detectors, optimizers with their schedules, the standard
callbacks, and evaluation by the configured metric. Nothing here trains.
"""
from __future__ import annotations

import math
import os

from kerasdet.engine.config import Config, StageConfig
from kerasdet.errors import ConfigError, DataFileNotFoundError

#: COCO results / proposal AR / VOC mAP key that names the headline metric of each
#: ``eval.metric`` (:data:`kerasdet.evaluation.metrics.PRIMARY_KEYS`).
HEADLINE_METRIC = {"coco": "AP", "coco_segm": "mask_AP", "proposals": "AR1000",
                   "proposals_segm": "mask_AR1000", "voc07": "mAP", "voc12": "mAP"}


# --- data ----------------------------------------------------------------------------------
def data_paths(config: Config, data_dir: str | None = None) -> dict:
    """The files of a ``digits`` or ``coco`` data section: ``{train_annotations,
    train_images, val_annotations, val_images}``. Digits: generates the set under
    ``data_dir`` (default ``data.dir``) first (idempotent: an existing set is reused)."""
    data = config.data
    if data.kind == "digits":
        from kerasdet.data.digits import generate_digits

        return dict(generate_digits(data_dir or data.dir, **data.generate))
    if data.kind == "coco":
        paths = {k: getattr(data, k) for k in ("train_annotations", "train_images", "val_annotations", "val_images")}
        missing = [k for k, v in paths.items() if not v]
        if missing:
            raise ConfigError(f"data.kind 'coco' needs data.{', data.'.join(missing)} (--set data.{missing[0]}=...)")
        return paths
    if data.kind == "tfrecord":
        paths = {k: getattr(data, k) for k in ("train_records", "val_records")}
        missing = [k for k, v in paths.items() if not v]
        if missing:
            raise ConfigError(f"data.kind 'tfrecord' needs data.{', data.'.join(missing)} (glob patterns of "
                              f"the shards, --set data.{missing[0]}=...)")
        return paths
    raise ConfigError(f"data.kind {data.kind!r} has no annotation files (expected 'digits', 'coco' or "
                      "'tfrecord')")


def build_sources(config: Config, data_dir: str | None = None):
    """``(train_source, val_source)`` :class:`~kerasdet.data.coco.DetectionSource` s of the
    data section; the validation source uses the training source's class list."""
    train = build_source(config, "train", data_dir=data_dir)
    val = build_source(config, "val", data_dir=data_dir, category_ids=train.category_ids)
    return train, val


def build_source(config: Config, split: str, *, data_dir=None, category_ids=None, paths=None):
    """One split (``"train"`` or ``"val"``) of the data section as a ``DetectionSource``.

    Args:
      split: ``"train"`` or ``"val"``.
      data_dir: digits: where the set lives (default ``data.dir``).
      category_ids: the class list (dataset ids in contiguous-index order) to map to;
        default: the split's own categories.
      paths: ``{<split>_annotations, <split>_images}`` already resolved (e.g. from a
        ``run.json``), so nothing is generated.
    """
    from kerasdet.data.coco import load_coco

    data = config.data
    if data.kind == "voc":
        from kerasdet.data.voc import VOC_CLASSES, load_voc_sets

        if not data.voc_root:
            raise ConfigError("data.kind 'voc' needs data.voc_root (the VOCdevkit folder)")
        if not os.path.isdir(data.voc_root):
            raise DataFileNotFoundError(f"data.voc_root: no folder {data.voc_root}")
        sets = data.train_sets if split == "train" else data.val_sets
        return load_voc_sets(data.voc_root, sets=sets, class_names=VOC_CLASSES, use_difficult=data.use_difficult)
    paths = paths or data_paths(config, data_dir)
    if data.kind == "tfrecord":
        from kerasdet.data.tfrecord import load_tfrecord_source

        return load_tfrecord_source(paths[f"{split}_records"], category_ids=category_ids,
                                    label_map=data.label_map)
    annotations, images = paths[f"{split}_annotations"], paths[f"{split}_images"]
    return load_coco(annotations, images, category_ids=category_ids)


def build_dataset(config: Config, source, *, training: bool, seed: int = 0, start_batch: int = 0,
                  input_context=None):
    """The ``tf.data`` pipeline of the input section for one source.

    Training: the infinite, step-addressable stream (``repeat=True``, batch
    ``start_batch`` first) of ``train.batch_size`` images a step, which exact resume
    needs. Under several workers each worker reads its own slice of every global batch
    (``input_context`` of ``strategy.distribute_datasets_from_function``; by default the
    one :func:`kerasdet.callbacks.fit_resumable` sets). Evaluation: one pass,
    ``eval.batch_size``. ``data.kind="tfrecord"``: the same batches from the shards
    (:func:`kerasdet.data.tfrecord.make_tfrecord_dataset`). ``input.data_service``: the
    training preprocessing runs on tf.data service workers.
    """
    from kerasdet.data.pipeline import make_dataset

    inp = config.input
    if config.data.kind == "tfrecord":
        from kerasdet.data.tfrecord import make_tfrecord_dataset

        if inp.masks or inp.cache_images or inp.decoder != "tf":
            raise ConfigError("data.kind 'tfrecord' reads boxes only and decodes in the graph: set "
                              "input.masks=null, input.cache_images=false, input.decoder='tf'")
        common = dict(image_size=inp.image_size, min_size=inp.min_size, max_size=inp.max_size,
                      max_boxes=inp.max_boxes, category_ids=source.category_ids)
        if not training:
            return make_tfrecord_dataset(source.annotation_file, batch_size=config.eval.batch_size, **common)
        return make_tfrecord_dataset(
            source.annotation_file, batch_size=config.train.batch_size, training=True, flip=inp.flip,
            scale_jitter=inp.scale_jitter, ssd_augmentation=inp.ssd_augmentation, seed=seed,
            shuffle_buffer_size=inp.shuffle_buffer_size, start_batch=start_batch, input_context=input_context,
            data_service=inp.data_service, **common)
    common = dict(image_size=inp.image_size, min_size=inp.min_size, max_size=inp.max_size,
                  max_boxes=inp.max_boxes, masks=inp.masks, cache_images=inp.cache_images, decoder=inp.decoder)
    if not training:
        return make_dataset(source, batch_size=config.eval.batch_size, training=False, **common)
    return make_dataset(source, batch_size=config.train.batch_size, training=True, flip=inp.flip,
                        scale_jitter=inp.scale_jitter, ssd_augmentation=inp.ssd_augmentation, seed=seed,
                        repeat=True, start_batch=start_batch, input_context=input_context,
                        data_service=inp.data_service, **common)


def steps_per_epoch(config: Config, num_train_images: int) -> int:
    """Optimizer steps of one epoch: ``len(train) // train.batch_size`` (global batch)."""
    steps = num_train_images // config.train.batch_size
    if steps < 1:
        raise ConfigError(f"train.batch_size {config.train.batch_size} is larger than the {num_train_images} "
                          "training images")
    return steps


def stage_length(stage: StageConfig, epoch_steps: int) -> tuple[int, int]:
    """``(epochs, steps_per_epoch)`` of a resolved stage for ``fit``: whole epochs of the
    data set, or one "epoch" of ``stage.steps`` (or of a fractional number of epochs)."""
    if stage.steps is not None:
        return 1, max(1, int(stage.steps))
    epochs = float(stage.epochs)
    if epochs.is_integer():
        return max(1, int(epochs)), epoch_steps
    return 1, max(1, int(round(epochs * epoch_steps)))


# --- models --------------------------------------------------------------------------------
def build_backbone(config: Config, section: str = "backbone"):
    """The backbone of ``config.backbone`` (``name`` + the builder's keyword arguments)."""
    from kerasdet.backbones import get_backbone

    args = dict(config.section(section))
    if "name" not in args:
        raise ConfigError(f"section {section!r} needs a 'name'")
    name = args.pop("name")
    return get_backbone(name, **args)


def build_detector(model_class, config: Config, num_classes: int, *, section: str = "model", **extra):
    """``model_class(backbone=build_backbone(config), num_classes=..., weight_decay=
    train.weight_decay, **config.<section>, **extra)``: the ``build_model`` of a recipe
    whose config follows the house layout. The section's ``weights`` / ``freeze`` keys
    (:data:`~kerasdet.engine.config.MODEL_WEIGHT_KEYS`) are applied after building, see
    :func:`load_model_weights`."""
    args = dict(config.section(section))
    weights, freeze = args.pop("weights", None), args.pop("freeze", "none")
    model = model_class(backbone=build_backbone(config), num_classes=num_classes,
                        weight_decay=config.train.weight_decay, **args, **extra)
    if weights is not None or freeze != "none":
        load_model_weights(model, weights, freeze=freeze)
    return model


def load_model_weights(model, weights, *, freeze="none"):
    """``model.weights`` / ``model.freeze`` of a config: builds ``model`` and loads
    ``weights`` (a keras-hub preset folder, a kerasdet run folder or ``.weights.h5``;
    ``None``: none) with :func:`kerasdet.weights.load_detector_weights`, then freezes."""
    import logging

    from kerasdet.weights import FREEZE_CHOICES, freeze_detector, load_detector_weights

    if freeze not in FREEZE_CHOICES:
        raise ConfigError(f"model.freeze: {freeze!r} is not one of {', '.join(FREEZE_CHOICES)}")
    if weights is None:
        model.build()
        return freeze_detector(model, freeze)
    report = load_detector_weights(model, weights, freeze=freeze)
    logging.getLogger("kerasdet").info("%s", report.summary())
    return model


def build_optimizer(stage: StageConfig, total_steps: int, *, train=None):
    """The optimizer of one resolved stage and its learning-rate schedule.

    ``stage.lr`` is scaled from ``train.reference_batch`` to ``train.batch_size``
    (linear scaling rule). ``schedule="step"``: warm-up then x ``decay`` at ``decay_steps``
    (absolute) or at the fractions ``decay_at`` of ``total_steps``; ``"cosine"``: cosine
    decay over ``total_steps`` to ``cosine_alpha`` x lr after the warm-up.

    Args:
      stage: a stage of :meth:`TrainConfig.resolved_stages` (every field set).
      total_steps: optimizer steps of the stage.
      train: the :class:`TrainConfig` (batch sizes, momentum).
    """
    import keras

    from kerasdet.schedules import WarmupPiecewiseConstant

    batch = train.batch_size if train is not None else 1
    reference = (train.reference_batch or batch) if train is not None else 1
    lr = stage.lr * batch / reference
    if stage.schedule == "cosine":
        if stage.warmup_steps:  # linear from warmup_factor x lr to lr, then cosine
            schedule = keras.optimizers.schedules.CosineDecay(
                lr * stage.warmup_factor, max(1, total_steps - stage.warmup_steps), alpha=stage.cosine_alpha,
                warmup_target=lr, warmup_steps=stage.warmup_steps)
        else:
            schedule = keras.optimizers.schedules.CosineDecay(lr, max(1, total_steps), alpha=stage.cosine_alpha)
    else:
        boundaries = [int(f * total_steps) for f in stage.decay_at]
        if stage.decay_steps is not None:
            boundaries = list(stage.decay_steps)
        schedule = WarmupPiecewiseConstant(base_lr=lr, boundaries=boundaries, decay=stage.decay,
                                           warmup_steps=stage.warmup_steps, warmup_factor=stage.warmup_factor)
    clip = {"clipnorm": stage.clipnorm} if stage.clipnorm else {}
    if stage.optimizer == "sgd":
        momentum = train.momentum if train is not None else 0.9
        return keras.optimizers.SGD(learning_rate=schedule, momentum=momentum, **clip)
    if stage.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=schedule, **clip)
    if stage.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=schedule, **clip)
    raise ConfigError(f"optimizer {stage.optimizer!r}: expected 'sgd', 'adam' or 'adamw'")


# --- evaluation ----------------------------------------------------------------------------
def evaluate(model, dataset, source, *, metric: str = "coco", results_file: str | None = None) -> dict:
    """Scores ``model`` on ``dataset`` (of ``source``) by ``metric``: ``"coco"``
    (pycocotools: AP, AP50, ...), ``"coco_segm"`` (also mask AP: ``mask_AP``, ...),
    ``"proposals"`` / ``"proposals_segm"`` (class-agnostic AR of the boxes / boxes and
    masks) or ``"voc07"`` / ``"voc12"`` (mAP at IoU 0.5, difficult objects ignored, with
    per-class AP). The ground truth is the source itself (its COCO file, or an in-memory
    COCO of a VOC source)."""
    from kerasdet.evaluation.callback import evaluate_model

    return evaluate_model(model, dataset, source, metric=metric, results_file=results_file)


def eval_callback(config: Config, dataset, source, *, every_n_epochs: int, log_dir: str | None):
    """The evaluation callback of ``eval.metric`` (logs ``val_<key>`` every N epochs)."""
    from kerasdet.evaluation.callback import CocoEvalCallback

    return CocoEvalCallback(dataset, source, metric=config.eval.metric, every_n_epochs=every_n_epochs,
                            log_dir=log_dir)


def format_stats(stats: dict) -> str:
    """A printable table of either kind of stats (COCO or VOC)."""
    from kerasdet.evaluation.metrics import format_stats as fmt

    return fmt(stats)


def metric_keys(metric: str, class_names=()) -> list:
    """The stat names ``metric`` produces (the columns of ``history.csv``; VOC: ``mAP``)."""
    from kerasdet.evaluation.metrics import stat_keys

    return list(stat_keys(metric))


def is_finite_number(value) -> bool:
    """True for a real, finite number (stats of an empty evaluation can be -1 or NaN)."""
    return isinstance(value, (int, float)) and math.isfinite(value)
