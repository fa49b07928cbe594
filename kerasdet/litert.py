"""LiteRT (TFLite) export of a detector: a fixed input size, builtin ops only, NMS inside.

:func:`export_litert` writes ``<path>.tflite`` (one signature, ``serving_default``) and a
``<path>.json`` sidecar (label map, input size, quantization, outputs), for phones and
other devices that run the LiteRT interpreter instead of TF Serving.

The graph is the SavedModel's ``serving_default`` at one input size, batch 1:

* input ``images``: uint8 ``[1, h, w, 3]`` RGB at the fixed ``input_size`` chosen at export
  (default the network canvas). The image is resized onto the canvas inside the graph
  with the pipeline's rule (:func:`kerasdet.export.preprocess_batch`), so a device that
  captures frames of that size passes them unchanged;
* outputs as the SavedModel's (:func:`kerasdet.export.serving_outputs`):
  ``detection_boxes`` float32 ``[1, K, 4]`` normalized ``[ymin, xmin, ymax, xmax]`` of the
  input image, ``detection_scores`` float32 ``[1, K]``, ``detection_classes`` int32
  ``[1, K]`` dataset category ids (-1 padding), ``num_detections`` int32 ``[1]``.

NMS: the model's ``nms_method`` is set to ``"padded"`` while the graph is traced: the
class-offset trick through ``tf.image.non_max_suppression_padded``, whose ops are all
LiteRT builtins (``combined_non_max_suppression`` has no builtin; it would need the Flex
delegate). Conversion uses ``TFLITE_BUILTINS`` only: a family whose graph needs another op
fails with :class:`LiteRTConversionError` naming the ops, never a model that needs the
Flex delegate at run time.

Quantization (``quantization``):

* ``"float32"``: the weights as trained;
* ``"dynamic_int8"``: dynamic-range quantization (``tf.lite.Optimize.DEFAULT`` without a
  representative data set): weights stored as int8 (about 4x smaller), activations stay
  float and are quantized on the fly by the kernels that support it.

Conversion goes through a SavedModel written by ``keras.export.ExportArchive`` and
``TFLiteConverter.from_saved_model``. Measured trap (TF 2.21, Keras 3.15):
``TFLiteConverter.from_concrete_functions(..., trackable_obj=model)`` keeps every Keras
variable as a ``VAR_HANDLE`` / ``READ_VARIABLE`` pair instead of freezing it into a
constant; with the default XNNPACK delegate the uninitialized variables make every output
NaN, without it the interpreter fails ("READ_VARIABLE failed to invoke"). The
``ExportArchive`` SavedModel tracks only the variables the endpoint reads, and the
converter freezes them.

:func:`load_litert` returns a :class:`LiteRTDetector` that runs the file with
``ai_edge_litert`` (``pip install kerasdet[litert]``) or, where that is not installed,
TensorFlow's own ``tf.lite.Interpreter``.
"""
import contextlib
import json
import logging
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from kerasdet.errors import DataFileNotFoundError, UserInputError
from kerasdet.export import preprocess_batch, serving_outputs
from kerasdet.layers.roi_align import RoIAlign

log = logging.getLogger(__name__)

QUANTIZATIONS = ("float32", "dynamic_int8")
#: version of the ``.json`` sidecar layout
METADATA_VERSION = 1
OUTPUT_NAMES = ("detection_boxes", "detection_scores", "detection_classes", "num_detections")


class LiteRTConversionError(UserInputError):
    """The detector's graph does not convert with LiteRT builtin ops only."""


def litert_function(model, *, image_size, input_size=None, min_size=None, max_size=None, category_ids=None):
    """The ``tf.function`` that the LiteRT file holds (traced with padded NMS).

    Args:
        model: a kerasdet detector (``detect(images)`` gives the detection dict).
        image_size: ``(H, W)`` network canvas, as in the training pipeline.
        input_size: ``(h, w)`` of the images the device passes. Default ``image_size``.
        min_size, max_size: the pipeline's optional Detectron-style resize rule.
        category_ids: contiguous class index -> dataset id. Default ``range(K)``.
    """
    image_size = (int(image_size[0]), int(image_size[1]))
    input_size = tuple(int(s) for s in (input_size or image_size))
    if category_ids is None:
        category_ids = list(range(model.num_classes))
    category_ids = [int(c) for c in category_ids]
    spec = tf.TensorSpec([1, input_size[0], input_size[1], 3], tf.uint8, name="images")

    @tf.function(input_signature=[spec])
    def serve(images):
        canvas, ratio = preprocess_batch(images, image_size=image_size, min_size=min_size, max_size=max_size)
        detections = model.detect(canvas)
        serve.mask_outputs = "masks" in detections
        detections = {k: detections[k] for k in ("boxes", "scores", "classes", "num_detections")}
        return serving_outputs(detections, ratio, tf.constant(input_size, tf.int32), category_ids)

    return serve


@contextlib.contextmanager
def builtin_ops(model):
    """Inside the block the model traces with LiteRT-builtin backends, restored after:
    ``nms_method="padded"`` on the model and on each :class:`DetectionPostProcessor`
    (``combined_non_max_suppression`` has no builtin), and ``method="gather"`` on each
    RoIAlign layer set to ``"auto"`` (``crop_and_resize`` has no builtin; the gather
    backend is torchvision's exact RoIAlign, tested equal)."""
    changed = []
    for layer in model._flatten_layers(include_self=True, recursive=True):  # as set_compute_dtype walks them
        if isinstance(getattr(layer, "nms_method", None), str) and layer.nms_method != "padded":
            changed.append((layer, "nms_method", layer.nms_method))
            layer.nms_method = "padded"
        if isinstance(layer, RoIAlign) and layer.method == "auto":
            changed.append((layer, "method", layer.method))
            layer.method = "gather"
    try:
        yield model
    finally:
        for layer, name, value in reversed(changed):
            setattr(layer, name, value)


def convert_to_litert(model, *, image_size, input_size=None, quantization="float32", min_size=None,
                      max_size=None, category_ids=None) -> bytes:
    """The LiteRT flatbuffer of ``model`` (arguments as :func:`export_litert`)."""
    if quantization not in QUANTIZATIONS:
        raise UserInputError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    with builtin_ops(model), tempfile.TemporaryDirectory(prefix="kerasdet_litert_") as tmp:
        serve = litert_function(model, image_size=image_size, input_size=input_size, min_size=min_size,
                                max_size=max_size, category_ids=category_ids)
        serve.get_concrete_function()
        if serve.mask_outputs:
            raise LiteRTConversionError(
                f"{type(model).__name__} returns instance masks, which the LiteRT export does not carry "
                "(the SavedModel's mask resampling needs crop_and_resize, which has no LiteRT builtin); "
                "serve it as a SavedModel")
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint("serving_default", serve)
        archive.write_out(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantization == "dynamic_int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        try:
            return converter.convert()
        except Exception as err:  # ConverterError: the message lists the unsupported ops
            raise LiteRTConversionError(
                f"{type(model).__name__} does not convert to LiteRT with builtin ops only: "
                f"{_first_error_lines(err)}") from err


def _first_error_lines(err, limit=6) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if "error" in ln.lower() or "op" in ln.lower()]
    return " | ".join(lines[:limit]) or str(err)[:500]


def export_litert(model, path, *, image_size, input_size=None, quantization="float32", min_size=None,
                  max_size=None, category_ids=None, overwrite=False) -> str:
    """Writes ``path`` (a ``.tflite`` file; the suffix is added when missing) and its
    ``.json`` sidecar; returns the ``.tflite`` path.

    Args:
        model: a built kerasdet detector whose graph converts with builtin ops (measured:
            RetinaNet, SSD / ASSD and Faster R-CNN FPN; the others raise
            :class:`LiteRTConversionError`, see the module doc).
        path: output file.
        image_size: ``(H, W)`` network canvas of the training pipeline.
        input_size: ``(h, w)`` of the device's images. Default ``image_size``.
        quantization: ``"float32"`` (default) or ``"dynamic_int8"`` (see the module doc).
        min_size, max_size: the pipeline's optional resize rule.
        category_ids: contiguous class index -> dataset id. Default ``range(K)``.
        overwrite: replace an existing file. Default ``False`` (a clear error instead).
    """
    path = str(path)
    if not path.endswith(".tflite"):
        path += ".tflite"
    meta_path = path[: -len(".tflite")] + ".json"
    if os.path.exists(path) and not overwrite:
        raise UserInputError(f"{path} exists already: remove it or write elsewhere (overwrite=True in Python)")
    flatbuffer = convert_to_litert(model, image_size=image_size, input_size=input_size,
                                   quantization=quantization, min_size=min_size, max_size=max_size,
                                   category_ids=category_ids)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(flatbuffer)
    image_size = [int(s) for s in image_size]
    metadata = {
        "metadata_version": METADATA_VERSION,
        "model_class": type(model).__name__,
        "num_classes": int(model.num_classes),
        "category_ids": [int(c) for c in (category_ids if category_ids is not None else range(model.num_classes))],
        "image_size": image_size,
        "input_size": [int(s) for s in (input_size or image_size)],
        "min_size": min_size,
        "max_size": max_size,
        "quantization": quantization,
        "nms": "padded (tf.image.non_max_suppression_padded, class-offset)",
        "input": {"images": "uint8 [1, h, w, 3] RGB at input_size"},
        "outputs": list(OUTPUT_NAMES),
        "bounding_box_format": "rel_yxyx",
        "bytes": len(flatbuffer),
    }
    with open(meta_path, "w") as f:
        json.dump(metadata, f, indent=2)
    log.info("LiteRT export: %s (%s, %.2f MB)", path, quantization, len(flatbuffer) / 2**20)
    return path


def interpreter_class():
    """``ai_edge_litert``'s ``Interpreter`` where installed, else ``tf.lite.Interpreter``."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - depends on the environment
        Interpreter = tf.lite.Interpreter
    return Interpreter


class LiteRTDetector:
    """Runs an exported ``.tflite`` detector (see :func:`load_litert`).

    Call with one uint8 ``[h, w, 3]`` or ``[1, h, w, 3]`` image at the export's input size;
    returns the four output arrays by name (batch axis kept).
    """

    def __init__(self, path, *, num_threads=None):
        path = str(path)
        if not os.path.isfile(path):
            raise DataFileNotFoundError(f"LiteRT file {path} does not exist")
        self.path = path
        meta_path = path[: -len(".tflite")] + ".json" if path.endswith(".tflite") else path + ".json"
        self.metadata = {}
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                self.metadata = json.load(f)
        self.interpreter = interpreter_class()(model_path=path, num_threads=num_threads)
        self.runner = self.interpreter.get_signature_runner("serving_default")
        spec = self.runner.get_input_details()["images"]
        self.input_shape = tuple(int(s) for s in spec["shape"])

    def __call__(self, image):
        image = np.asarray(image)
        if image.ndim == 3:
            image = image[None]
        if image.dtype != np.uint8:
            raise UserInputError(f"{self.path}: expects uint8 images, got {image.dtype}")
        if tuple(image.shape) != self.input_shape:
            raise UserInputError(f"{self.path}: expects images of shape {list(self.input_shape)} "
                                 f"(the export's input_size), got {list(image.shape)}")
        return self.runner(images=image)


def load_litert(path, *, num_threads=None) -> LiteRTDetector:
    """A :class:`LiteRTDetector` for an exported ``.tflite`` file (``num_threads``: the
    interpreter's CPU threads; default the runtime's)."""
    return LiteRTDetector(path, num_threads=num_threads)
