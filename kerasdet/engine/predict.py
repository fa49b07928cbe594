"""Export of a trained model for its config, and drawing an exported model's detections."""
from __future__ import annotations

import json
import os

import numpy as np

from kerasdet.engine.config import Config
from kerasdet.errors import DataFileNotFoundError

EXPORT_METADATA = "kerasdet_export.json"


def export_model(model, config: Config, label_map: dict, export_dir: str, *, version: int | None = None,
                 precision: str | None = None) -> str:
    """:func:`kerasdet.export.export_versioned` with the input section's resize rule, the
    export section's ``fold_batchnorm`` and the run's label map (dataset category ids and
    names): writes TF Serving's layout ``<export_dir>/<version>/saved_model.pb``
    (``version`` default: one above the highest existing one; an existing version is an
    :class:`~kerasdet.export.ExportVersionExistsError`). ``precision``: the serving graph's
    compute dtype (default ``export.precision``, whose ``"auto"`` resolves here by the
    CPU alone; the runner resolves it with the metric check of
    :func:`choose_export_precision` first). Returns the version folder written."""
    from kerasdet.export import export_versioned

    inp = config.input
    return export_versioned(model, export_dir, version=version, image_size=inp.image_size, min_size=inp.min_size,
                            max_size=inp.max_size, category_ids=label_map["category_ids"],
                            category_names=label_map.get("category_names"),
                            fold_batchnorm="auto" if config.export.fold_batchnorm else False,
                            precision=precision or config.export.precision)


def choose_export_precision(model, config: Config, evaluate, float32_stats: dict, headline: str) -> dict:
    """``export.precision`` resolved for a trained model: ``"auto"`` is bfloat16 only on a
    CPU with native bfloat16 and when ``evaluate(variant)`` (the validation stats of the
    bfloat16 serving graph) loses at most ``export.max_metric_drop`` of ``headline``
    against ``float32_stats``. Returns ``{"precision", "reason", ...}`` for ``run.json``."""
    from kerasdet.precision import cpu_supports_bfloat16, inference_variant

    exp = config.export
    if exp.precision != "auto":
        return {"precision": exp.precision, "reason": "export.precision"}
    if not cpu_supports_bfloat16():
        return {"precision": "float32", "reason": "this CPU has no native bfloat16 (AVX512_BF16 / AMX-BF16)"}
    fold = "auto" if exp.fold_batchnorm else False
    with inference_variant(model, fold_batchnorm=fold, precision="bfloat16") as (variant, _):
        stats = evaluate(variant)
    reference, reduced = float(float32_stats[headline]), float(stats[headline])
    ok = reference - reduced <= exp.max_metric_drop
    return {"precision": "bfloat16" if ok else "float32", "metric": headline, "float32": reference,
            "bfloat16": reduced, "max_metric_drop": exp.max_metric_drop,
            "reason": f"{headline} {reduced:.4f} in bfloat16 vs {reference:.4f} in float32: "
                      f"{'within' if ok else 'beyond'} {exp.max_metric_drop}"}


def export_model_litert(model, config: Config, label_map: dict, path: str, *, quantization: str = "float32",
                        input_size=None) -> str:
    """:func:`kerasdet.litert.export_litert` with the input section's canvas and resize rule
    and the run's label map; ``input_size`` (default the canvas) is the fixed size of the
    device's images. Returns the ``.tflite`` path."""
    from kerasdet.litert import export_litert

    inp = config.input
    return export_litert(model, path, image_size=inp.image_size, input_size=input_size, quantization=quantization,
                         min_size=inp.min_size, max_size=inp.max_size, category_ids=label_map["category_ids"])


def read_export_metadata(saved_model_dir: str) -> dict:
    """The export's ``kerasdet_export.json`` (``{}`` for a SavedModel written elsewhere);
    ``saved_model_dir`` as in :func:`predict_images`."""
    from kerasdet.export import resolve_saved_model_dir

    saved_model_dir = resolve_saved_model_dir(saved_model_dir)
    path = os.path.join(saved_model_dir, EXPORT_METADATA)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def predict_images(saved_model_dir: str, image_paths, output_dir: str, *, score_threshold: float = 0.3) -> list:
    """Runs an exported SavedModel's ``serving_default`` on image files and writes each
    with its boxes drawn to ``output_dir/<stem>_det.png`` (small images upscaled so labels
    stay legible). Class names come from the export's metadata. Returns the paths.

    ``saved_model_dir``: a version folder (or any folder holding ``saved_model.pb``), or a
    TF Serving base folder, then its highest version
    (:func:`kerasdet.export.resolve_saved_model_dir`)."""
    import cv2
    import tensorflow as tf

    from kerasdet.data.coco import read_image
    from kerasdet.visualize import draw_detections, save_image

    from kerasdet.export import resolve_saved_model_dir

    saved_model_dir = resolve_saved_model_dir(saved_model_dir)
    meta = read_export_metadata(saved_model_dir)
    names = None
    if meta.get("category_names") and meta.get("category_ids"):
        names = dict(zip(meta["category_ids"], meta["category_names"]))
    fn = tf.saved_model.load(saved_model_dir).signatures["serving_default"]
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for path in image_paths:
        if not os.path.isfile(path):
            raise DataFileNotFoundError(f"image {path} does not exist")
        image = read_image(path)
        out = fn(images=tf.constant(image[None]))
        n = int(out["num_detections"][0])
        boxes, scores = out["detection_boxes"][0, :n].numpy(), out["detection_scores"][0, :n].numpy()
        classes = out["detection_classes"][0, :n].numpy()
        style = {}
        if image.shape[0] < 256:
            f = int(np.ceil(256 / image.shape[0]))
            image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST)
            style = dict(thickness=2, font_scale=0.6)
        drawn = draw_detections(image, boxes, scores, classes, class_names=names, score_threshold=score_threshold,
                                **style)
        target = os.path.join(output_dir, os.path.splitext(os.path.basename(path))[0] + "_det.png")
        save_image(target, drawn)
        written.append(target)
    return written
