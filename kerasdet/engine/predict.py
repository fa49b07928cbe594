"""Export of a trained model for its config, and drawing an exported model's detections."""
from __future__ import annotations

import json
import os

import numpy as np

from kerasdet.engine.config import Config
from kerasdet.errors import DataFileNotFoundError

EXPORT_METADATA = "kerasdet_export.json"


def export_model(model, config: Config, label_map: dict, export_dir: str, *, version: int | None = None) -> str:
    """:func:`kerasdet.export.export_versioned` with the input section's resize rule and
    the run's label map (dataset category ids and names): writes TF Serving's layout
    ``<export_dir>/<version>/saved_model.pb`` (``version`` default: one above the highest
    existing one; an existing version is an :class:`~kerasdet.export.ExportVersionExistsError`).
    Returns the version folder written."""
    from kerasdet.export import export_versioned

    inp = config.input
    return export_versioned(model, export_dir, version=version, image_size=inp.image_size, min_size=inp.min_size,
                            max_size=inp.max_size, category_ids=label_map["category_ids"],
                            category_names=label_map.get("category_names"))


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
