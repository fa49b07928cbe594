"""A Keras callback that scores a detector during ``model.fit`` (pycocotools COCO box /
mask AP, class-agnostic proposal AR, or VOC07 / VOC12 mAP), and the stand-alone
:func:`evaluate_model`.

The callback and :func:`evaluate_model` share one code path (:func:`_collect_detections`
+ the evaluator :func:`~kerasdet.evaluation.metrics.make_evaluator` picks for ``metric``:
:class:`~kerasdet.evaluation.coco_eval.CocoEvaluator`,
:class:`~kerasdet.evaluation.proposal_recall.ProposalRecallEvaluator` or
:class:`~kerasdet.evaluation.metrics.VocEvaluator`), so the numbers in ``History`` are the
numbers a stand-alone evaluation prints.
"""
from __future__ import annotations

import os
from typing import Sequence

import keras
import numpy as np

from kerasdet.evaluation.coco_eval import CocoEvaluator
from kerasdet.evaluation.metrics import check_metric, format_stats, make_evaluator

_PREDICTION_KEYS = ("boxes", "scores", "classes", "num_detections")
_LABEL_KEYS = ("image_id", "image_scale")


def _split_element(element):
    """``(images, labels[, sample_weight])`` -> ``(images, labels)`` with a clear error."""
    if not isinstance(element, (tuple, list)) or len(element) < 2:
        raise ValueError(
            "COCO evaluation dataset must yield (images, labels) pairs where labels is a "
            f"dict with {_LABEL_KEYS}; got an element of type {type(element).__name__}")
    images, labels = element[0], element[1]
    if not isinstance(labels, dict):
        raise ValueError(
            f"COCO evaluation dataset: labels must be a dict with {_LABEL_KEYS}, "
            f"got {type(labels).__name__}")
    for key in _LABEL_KEYS:
        if key not in labels:
            raise ValueError(
                f"COCO evaluation dataset: labels have no '{key}' field (keys: "
                f"{sorted(labels)}); the loader must keep it for evaluation")
    return images, labels


def make_predictor(model):
    """A ``images -> dict of numpy`` function running ``model``'s ``predict_step``.

    ``model.predict_on_batch`` is used when the model lives on one replica. Under a
    multi-replica strategy (e.g. ``MirroredStrategy``) Keras' ``predict_on_batch`` hands the
    whole, undistributed batch to every replica and concatenates the copies (measured with
    Keras 3.15: a batch of 2 on 2 replicas comes back with 4 rows), so there the
    ``predict_step`` runs once, outside the strategy, in a ``tf.function`` of its own.
    A model with another ``bounding_box_format`` has its boxes converted back to the
    ``yxyx`` pixels the evaluation expects.
    """
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None or strategy.num_replicas_in_sync == 1:
        predict = model.predict_on_batch
    else:
        import tensorflow as tf

        step = tf.function(lambda images: model.predict_step((images,)), reduce_retracing=True)

        def predict(images):
            return {k: v.numpy() for k, v in step(images).items()}

    if getattr(model, "bounding_box_format", "yxyx") == "yxyx":
        return predict

    def in_pixels(images):  # a model that predicts in another box format: back to yxyx pixels
        out = dict(predict(images))
        out["boxes"] = np.asarray(model.boxes_to_internal(out["boxes"], tuple(images.shape[1:3])))
        return out

    return in_pixels


def _collect_detections(model, dataset, evaluator: CocoEvaluator, predict=None):
    """Runs the model over ``dataset`` and feeds ``evaluator`` (reset first): any object
    with CocoEvaluator's ``reset``/``update`` (also VocEvaluator); ``predict``'s
    ``"masks"`` are passed too when the evaluator ``needs_masks``."""
    predict = predict or make_predictor(model)
    with_masks = bool(getattr(evaluator, "needs_masks", False))
    required = _PREDICTION_KEYS + (("masks",) if with_masks else ())
    evaluator.reset()
    for element in dataset:
        images, labels = _split_element(element)
        outputs = predict(images)
        if not isinstance(outputs, dict) or any(k not in outputs for k in required):
            got = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
            raise ValueError(
                f"the model's predict_step must return a dict with {required}, "
                f"got {got}")
        batch = int(np.shape(labels["image_id"])[0])
        if len(outputs["boxes"]) != batch:
            raise ValueError(
                f"the model returned {len(outputs['boxes'])} images of detections for a "
                f"batch of {batch} images")
        evaluator.update(
            labels["image_id"],
            outputs["boxes"],
            outputs["scores"],
            outputs["classes"],
            outputs["num_detections"],
            labels["image_scale"],
            **({"masks": outputs["masks"]} if with_masks else {}),
        )
    return evaluator


def evaluate_model(
    model,
    dataset,
    coco_gt,
    *,
    category_ids: Sequence[int] | None = None,
    results_file: str | None = None,
    verbose: bool = False,
    metric: str = "coco",
) -> dict[str, float]:
    """Scores ``model`` on ``dataset`` (the callback's code path).

    ``evaluate_model(model, val_ds, val_source, metric="voc07")`` is the source-based
    form; ``evaluate_model(model, val_ds, "instances_val.json", category_ids=...)`` the
    file-based one (COCO metric).

    Args:
      model: a detector whose ``predict_step`` returns the dict
        ``boxes/scores/classes/num_detections`` (package convention); run through
        :func:`make_predictor` (``predict_on_batch`` on one replica).
      dataset: iterable of ``(images, labels)`` with ``labels["image_id"]`` ``[B]`` and
        ``labels["image_scale"]`` ``[B]`` (network px per original px); other label keys
        are ignored. Iterated once, in order.
      coco_gt: the ground truth: a :class:`~kerasdet.data.coco.DetectionSource` (the
        validation source; any metric), a COCO annotation JSON path (any metric) or a
        pycocotools ``COCO`` (``"coco"``).
      category_ids: contiguous class index -> dataset category id; default the source's
        (required with a path or ``COCO``).
      results_file: if given, the detections are written there too as a COCO results
        JSON (original-image pixels, dataset category ids), whatever the metric.
      verbose: print the evaluator's summary (pycocotools' for ``"coco"``).
      metric: ``"coco"`` (pycocotools), ``"coco_segm"`` (box and mask AP; the model's
        ``predict`` must return ``"masks"``), ``"proposals"`` / ``"proposals_segm"``
        (class-agnostic box / box and segment AR), ``"voc07"`` (VOC2007 11-point
        mAP@0.5, difficult ignored) or ``"voc12"`` (all-point mAP@0.5); see
        :mod:`kerasdet.evaluation.metrics`.

    Returns:
      ``"coco"``: the 12 COCO stats keyed by
      :data:`~kerasdet.evaluation.coco_eval.STAT_KEYS` (``"coco_segm"``: also the
      ``mask_`` ones); the proposal metrics:
      :func:`~kerasdet.evaluation.metrics.stat_keys`; ``"voc07"``/``"voc12"``:
      ``{"mAP": float, "AP/<class name>": float}``. :func:`format_stats` prints any.
    """
    evaluator = make_evaluator(metric, coco_gt, category_ids=category_ids)
    _collect_detections(model, dataset, evaluator)
    if results_file is not None:
        evaluator.write_results(results_file)
    return evaluator.evaluate(verbose=verbose)


class CocoEvalCallback(keras.callbacks.Callback):
    """Scores the model (pycocotools, or VOC mAP) at the end of every ``every_n_epochs``
    epochs.

    The stats are written into the epoch ``logs`` as ``prefix + key``: for
    ``metric="coco"`` ``val_AP``, ``val_AP50``, ..., ``val_ARl`` (``"coco_segm"`` also
    ``val_mask_AP``, ...; ``"proposals"`` ``val_AR10``, ..., ``val_ARl1000``); for ``"voc07"`` /
    ``"voc12"`` ``val_mAP`` and ``val_AP/<class name>``
    (:func:`~kerasdet.evaluation.metrics.primary_key` names the one to monitor). They
    land in ``History`` and can be monitored by callbacks placed *after* this one in the
    ``callbacks`` list (``EarlyStopping``, ``ModelCheckpoint(monitor="val_AP",
    mode="max")``). Epochs that are not evaluated carry no such keys (like Keras'
    ``validation_freq``).

    Args:
      dataset: iterable of ``(images, labels)``; ``labels`` is a dict with at least
        ``"image_id"`` ``[B]`` and ``"image_scale"`` ``[B]`` (boxes/classes are ignored).
        A ``tf.data.Dataset`` is re-iterated each evaluation; do not shuffle it needlessly.
      coco_gt: the ground truth (loaded once): a
        :class:`~kerasdet.data.coco.DetectionSource`, a COCO annotation JSON path, or a
        pycocotools ``COCO`` (``metric="coco"`` only).
      category_ids: contiguous class index -> dataset category id; default the source's.
      every_n_epochs: evaluate when ``(epoch + 1) % every_n_epochs == 0``.
      log_dir: if given, the stats are also written as TensorBoard scalars (tags
        ``prefix + key``, ``step=epoch``) to ``log_dir/validation``, next to what
        ``keras.callbacks.TensorBoard(log_dir)`` writes.
        Under ``MultiWorkerMirroredStrategy`` every worker evaluates; give ``log_dir``
        to the chief only.
      prefix: prefix of the log keys and TensorBoard tags.
      verbose: 0 silent, 1 one summary line per evaluation, 2 also the full table.
      metric: ``"coco"``, ``"coco_segm"``, ``"proposals"``, ``"proposals_segm"``,
        ``"voc07"`` or ``"voc12"`` (see :func:`evaluate_model`); the ``_segm`` ones pass
        the model's ``predict`` ``"masks"`` to the evaluator.

    Attributes:
      last_stats: the stats of the latest evaluation (``None`` before the first).
    """

    def __init__(
        self,
        dataset,
        coco_gt,
        *,
        category_ids: Sequence[int] | None = None,
        every_n_epochs: int = 1,
        log_dir: str | None = None,
        prefix: str = "val_",
        verbose: int = 1,
        metric: str = "coco",
    ):
        super().__init__()
        if int(every_n_epochs) < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.dataset = dataset
        self.metric = check_metric(metric)
        self.evaluator = make_evaluator(self.metric, coco_gt, category_ids=category_ids)
        self.every_n_epochs = int(every_n_epochs)
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.prefix = prefix
        self.verbose = int(verbose)
        self.last_stats: dict[str, float] | None = None
        self._writer = None
        self._predict = None
        self._predict_model = None

    def evaluate(self) -> dict[str, float]:
        """Runs one evaluation of ``self.model`` now and returns the stats."""
        if self._predict is None or self._predict_model is not self.model:
            self._predict = make_predictor(self.model)
            self._predict_model = self.model
        _collect_detections(self.model, self.dataset, self.evaluator, self._predict)
        self.last_stats = self.evaluator.evaluate()
        return self.last_stats

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs != 0:
            return
        stats = self.evaluate()
        if logs is not None:
            for key, value in stats.items():
                logs[self.prefix + key] = value
        if self.log_dir is not None:
            self._write_summaries(stats, epoch)
        if self.verbose >= 1:
            keys = {"coco": ("AP", "AP50", "AP75"), "coco_segm": ("AP", "mask_AP", "mask_AP50"),
                    "proposals": ("AR100", "AR1000"),
                    "proposals_segm": ("AR1000", "mask_AR100", "mask_AR1000")
                    }.get(self.metric, ("mAP",))
            line = "  ".join(f"{self.prefix}{k}={stats[k]:.4f}" for k in keys)
            print(f"\nEpoch {epoch + 1}: {self.metric.upper()} {line}")
        if self.verbose >= 2:
            print(format_stats(stats))

    def _write_summaries(self, stats, epoch):
        """Scalars through core ``tf.summary.write`` with the TensorBoard "scalars"
        plugin metadata (what ``tf.summary.scalar`` writes), so no ``tensorboard`` package
        is needed to log, only to view."""
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(
                os.path.join(self.log_dir, "validation"))
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
        with self._writer.as_default(step=int(epoch)):
            for key, value in stats.items():
                tf.summary.write(
                    self.prefix + key,
                    tf.constant(value, tf.float32),
                    metadata=metadata.SerializeToString())
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


#: The same callback under a metric-neutral name (``metric="voc07"`` reads better with it).
DetectionEvalCallback = CocoEvalCallback
