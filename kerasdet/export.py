"""SavedModel export for TF Serving: three signatures, a warm-up file, a versioned layout.

Signatures (every family; mask models add ``detection_masks`` / ``detection_mask_scores``
on each):

* ``serving_default``: ``images: uint8 [B, H, W, 3]``, a batch of same-size RGB images
  (the OD API exporter's ``image_tensor`` input type). It stays the default so clients of
  earlier exports and ``saved_model_cli run --inputs images=...npy`` keep working.
* ``encoded_image``: ``image_bytes: string [B]``, each element a whole JPEG, PNG, GIF
  or BMP file (the OD API's ``encoded_image_string_tensor``), each image its own size,
  decoded in the graph with ``tf.io.decode_image(channels=3, expand_animations=False)``.
  This is what a TF Serving client sends (REST ``{"b64": ...}``, gRPC ``DT_STRING``), and
  it is the one to use with server-side batching: TF Serving's batcher concatenates the
  requests' inputs along dimension 0 ("Batching Guide", tensorflow/serving
  ``batching/README.md``), which a string ``[B]`` input allows for any mix of sizes.
* ``tf_example``: ``serialized_examples: string [B]``, serialized ``tf.train.Example``
  protos whose ``image/encoded`` feature holds the encoded image (the key of the OD API's
  ``TfExampleDecoder`` and of Model Garden's ``tf_example_decoder``), decoded as above.

Outputs of every signature:

* ``detection_boxes``: float32 ``[B, K, 4]`` normalized ``[ymin, xmin, ymax, xmax]``
  relative to each ORIGINAL (decoded) image (0..1);
* ``detection_scores``: float32 ``[B, K]``;
* ``detection_classes``: int32 ``[B, K]`` in the dataset's own ids (e.g. COCO category
  ids); padding rows are -1;
* ``num_detections``: int32 ``[B]``;
* the two string signatures add ``image_shapes``: int32 ``[B, 2]``, each decoded image's
  ``(height, width)``; their ``detection_masks`` are ``[B, K, max h, max w]`` with image
  ``i``'s mask in the top-left ``image_shapes[i]`` corner and zeros elsewhere (a batch of
  differently sized images has no common mask size).

Resizing (the same ops as the training pipeline, :mod:`kerasdet.data.geometry`),
normalization (inside the backbone), decoding and NMS are all inside the graph. The
SavedModel loads and runs with TensorFlow alone (no kerasdet import), with
``tf.saved_model.load``, with ``saved_model_cli run`` (TensorFlow's Python session
loader) and with ``TF_LoadSessionFromSavedModel`` of TensorFlow's C API (the loader that
TF Serving's ``SavedModelBundle`` wraps; ``tests/test_serving_capi.py``).

Decoding conversions (``tf.io.decode_image`` with ``channels=3, dtype=uint8``): grey
images are replicated to RGB, an alpha channel is dropped (not composited), 16-bit PNGs
keep their high byte (``tf.image.convert_image_dtype``), an animated GIF gives its first
frame. Bad requests fail with ``InvalidArgumentError`` before the model runs: an empty
batch ("... with batch >= 1; got an empty batch"), an empty string ("empty string at
batch index"), bytes that are none of the four formats ("not a JPEG, PNG, GIF or BMP
image (by its first bytes) at batch index"), a truncated JPEG (TensorFlow's "Invalid
JPEG data or crop window"), a ``tf.Example`` without ``image/encoded`` (TensorFlow's
"Feature: image/encoded ... is required but could not be found"). The uint8 signature's
errors are documented at :func:`check_images`. ``tests/test_serving_fuzz.py`` covers them.

Warm-up: ``assets.extra/tf_serving_warmup_requests`` is a TFRecord of
``tensorflow.serving.PredictionLog`` protos, one ``PredictRequest`` per signature, that
TF Serving replays when it loads the model ("SavedModel Warmup",
https://www.tensorflow.org/tfx/serving/saved_model_warmup). The protos come from the
``tensorflow-serving-api`` package (``pip install kerasdet[serving]``).

Layout: TF Serving loads ``<model_base_path>/<integer version>/saved_model.pb`` and
serves the highest version by default ("TensorFlow Serving with Docker" and
"Serving Configuration", https://www.tensorflow.org/tfx/serving/serving_config).
:func:`export_versioned` writes ``<base>/<version>/`` (default: one above the highest
existing version), written under a hidden temporary name and renamed into place so the
server never sees a half-written version; an existing version is never overwritten.

A ``kerasdet_export.json`` next to ``saved_model.pb`` records the label map, the input
geometry and what the model is, for humans and tools (``kerasdet predict`` reads it; see
:func:`export_metadata` for the fields).

Box format: ``detection_boxes`` are ``rel_yxyx`` of the original image, the TF Object
Detection API's convention that TF Serving clients expect, whatever ``bounding_box_format``
the model was built with: that setting only changes the boxes of ``fit``/``predict`` (the
Keras edges), while the serving graph runs ``model.detect``, which always gives ``yxyx``
network-input pixels, and maps them to the original image itself.
"""
import json
import logging
import os
import re
import shutil
import uuid

import keras
import numpy as np
import tensorflow as tf

from kerasdet.data.geometry import resize_scale, resized_shape
from kerasdet.errors import DataFileNotFoundError, UserInputError
from kerasdet.precision import inference_variant

log = logging.getLogger(__name__)

SIGNATURE_INPUT = tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")
ENCODED_INPUT = tf.TensorSpec([None], tf.string, name="image_bytes")
EXAMPLE_INPUT = tf.TensorSpec([None], tf.string, name="serialized_examples")
#: signature key -> its one input's name
SIGNATURE_INPUTS = {"serving_default": "images", "encoded_image": "image_bytes", "tf_example": "serialized_examples"}
#: the tf.Example feature that holds the encoded image (OD API / Model Garden key)
EXAMPLE_IMAGE_KEY = "image/encoded"
#: where TF Serving looks for warm-up requests, relative to the version folder
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")


class ExportVersionExistsError(UserInputError, FileExistsError):
    """The export's version folder exists already (versions are never overwritten)."""


def check_images(images):
    """In-graph checks of what a loaded signature does not check itself: rank 4, 3
    channels (``tf.ensure_shape``: "Shape of tensor images [8,8,3] is not compatible with
    expected shape [?,?,?,3]") and a non-empty batch and image ("serving_default expects
    images: uint8 [batch, height, width, 3] with batch, height, width >= 1; got an empty
    batch or image"; the dtype is checked by TensorFlow when the signature is called:
    "expected to be a uint8 tensor but is a float tensor"). Errors are
    ``InvalidArgumentError``."""
    # A run-time check: the signature's static [None, None, None, 3] folds tf.rank away.
    images = tf.ensure_shape(images, [None, None, None, 3], name="images")
    size_ok = tf.debugging.assert_positive(
        tf.shape(images)[:3],
        message="serving_default expects images: uint8 [batch, height, width, 3] with batch, height, "
        "width >= 1; got an empty batch or image")
    with tf.control_dependencies([size_ok]):
        return tf.identity(images)


def check_encoded(image_bytes, signature="encoded_image", input_name="image_bytes"):
    """In-graph checks of a string ``[B]`` batch of encoded images before decoding: a
    non-empty batch, no empty string, and each element starting like a JPEG
    (``FF D8 FF``), PNG (``89 'PNG'``), GIF (``'GIF8'``) or BMP (``'BM'``) file, the
    formats of ``tf.io.decode_image``. The messages name the signature and the offending
    batch indices. Errors are ``InvalidArgumentError``."""
    image_bytes = tf.ensure_shape(image_bytes, [None], name=input_name)
    batch_ok = tf.debugging.assert_positive(
        tf.size(image_bytes),
        message=f"{signature} expects {input_name}: string [batch] with batch >= 1; got an empty batch")
    empty = tf.equal(tf.strings.length(image_bytes), 0)
    empty_ok = tf.debugging.Assert(
        tf.logical_not(tf.reduce_any(empty)),
        [f"{signature}: {input_name} holds an empty string at batch index(es)", tf.where(empty)[:, 0]])
    known = (tf.equal(tf.strings.substr(image_bytes, 0, 3), b"\xff\xd8\xff")
             | tf.equal(tf.strings.substr(image_bytes, 0, 4), b"\x89PNG")
             | tf.equal(tf.strings.substr(image_bytes, 0, 4), b"GIF8")
             | tf.equal(tf.strings.substr(image_bytes, 0, 2), b"BM"))
    format_ok = tf.debugging.Assert(
        tf.reduce_all(known | empty),
        [f"{signature}: {input_name} element is not a JPEG, PNG, GIF or BMP image (by its first bytes) at "
         "batch index(es)", tf.where(tf.logical_not(known))[:, 0]])
    with tf.control_dependencies([batch_ok, empty_ok, format_ok]):
        return tf.identity(image_bytes)


def preprocess_batch(images, *, image_size, min_size=None, max_size=None):
    """Resizes a ``[B, h, w, 3]`` batch onto the ``image_size`` canvas like the pipeline.

    Returns ``(canvas float32 [B, H, W, 3], ratio [4])`` with ``ratio`` the per-axis
    ``(new_h / h, new_w / w, new_h / h, new_w / w)`` that maps original to network pixels.
    """
    images = tf.cast(images, tf.float32)
    shape = tf.shape(images)
    h, w = shape[1], shape[2]
    scale = resize_scale(h, w, image_size, min_size, max_size)
    new_h, new_w = resized_shape(h, w, scale)
    new_h = tf.minimum(new_h, image_size[0])
    new_w = tf.minimum(new_w, image_size[1])
    resized = tf.image.resize(images, tf.stack([new_h, new_w]), method="bilinear")
    canvas = tf.image.pad_to_bounding_box(resized, 0, 0, image_size[0], image_size[1])
    ry = tf.cast(new_h, tf.float32) / tf.cast(h, tf.float32)
    rx = tf.cast(new_w, tf.float32) / tf.cast(w, tf.float32)
    return canvas, tf.stack([ry, rx, ry, rx])


def decode_image(contents):
    """One encoded image -> uint8 ``[h, w, 3]`` (see the module doc for the conversions)."""
    image = tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def decode_and_preprocess(image_bytes, *, image_size, min_size=None, max_size=None):
    """A checked string ``[B]`` batch -> ``(canvas float32 [B, H, W, 3], ratios [B, 4],
    image_shapes int32 [B, 2])``: each image decoded and resized onto the canvas on its
    own (:func:`preprocess_batch` of a batch of one)."""
    height, width = int(image_size[0]), int(image_size[1])

    def one(contents):
        image = decode_image(contents)
        canvas, ratio = preprocess_batch(image[None], image_size=image_size, min_size=min_size, max_size=max_size)
        return tf.ensure_shape(canvas[0], [height, width, 3]), ratio, tf.shape(image)[:2]

    return tf.map_fn(one, image_bytes, fn_output_signature=(
        tf.TensorSpec([height, width, 3], tf.float32), tf.TensorSpec([4], tf.float32),
        tf.TensorSpec([2], tf.int32)))


def serving_outputs(detections, ratio, original_hw, category_ids):
    """Maps network-pixel detections to the serving signature's outputs.

    ``ratio``: ``[4]`` (one for the batch) or ``[B, 4]`` (per image); ``original_hw``:
    ``(h, w)`` of the batch or ``[B, 2]`` per image."""
    batch = tf.shape(detections["boxes"])[0]
    ratio = tf.broadcast_to(tf.reshape(tf.cast(ratio, tf.float32), [-1, 4]), tf.stack([batch, 4]))
    hw = tf.broadcast_to(tf.reshape(tf.cast(tf.convert_to_tensor(original_hw), tf.int32), [-1, 2]),
                         tf.stack([batch, 2]))
    hw4 = tf.tile(tf.cast(hw, tf.float32), [1, 2])
    boxes = detections["boxes"] / ratio[:, None, :] / hw4[:, None, :]
    boxes = tf.clip_by_value(boxes, 0.0, 1.0)
    classes = detections["classes"]
    ids = tf.constant(category_ids, tf.int32)
    mapped = tf.gather(ids, tf.maximum(classes, 0))
    outputs = {
        "detection_boxes": boxes,
        "detection_scores": detections["scores"],
        "detection_classes": tf.where(classes >= 0, mapped, -1),
        "num_detections": tf.cast(detections["num_detections"], tf.int32),
    }
    if "masks" in detections:
        outputs["detection_masks"] = _masks_to_original(detections["masks"], ratio, hw)
        if "mask_scores" in detections:
            outputs["detection_mask_scores"] = detections["mask_scores"]
    return outputs


def _masks_to_original(masks, ratio, hw):
    """``[B, K, H, W]`` 0/1 masks on the network canvas -> ``[B, K, max h, max w]``
    float32 0/1 on each original image (its part of the canvas, resized back, binarized at
    0.5; zeros outside image ``i``'s ``hw[i]``). ``ratio`` ``[B, 4]``, ``hw`` int ``[B, 2]``."""
    shape = tf.shape(masks)
    b, k, ch, cw = shape[0], shape[1], shape[2], shape[3]
    out_h, out_w = tf.reduce_max(hw[:, 0]), tf.reduce_max(hw[:, 1])
    # Original pixel i (centre i + 0.5) sits at canvas index (i + 0.5) * r - 0.5;
    # crop_and_resize samples canvas index y1 * (H - 1) + i * (y2 - y1) * (H - 1) / (out_h - 1),
    # so y1 = (0.5 r - 0.5) / (H - 1) and a step of r per output pixel.
    chf, cwf = tf.maximum(tf.cast(ch, tf.float32) - 1.0, 1.0), tf.maximum(tf.cast(cw, tf.float32) - 1.0, 1.0)
    ry, rx = ratio[:, 0], ratio[:, 1]
    y1 = (0.5 * ry - 0.5) / chf
    x1 = (0.5 * rx - 0.5) / cwf
    y2 = y1 + ry * (tf.cast(out_h, tf.float32) - 1.0) / chf
    x2 = x1 + rx * (tf.cast(out_w, tf.float32) - 1.0) / cwf
    flat = tf.reshape(tf.cast(masks, tf.float32), tf.stack([-1, ch, cw, 1]))
    n = tf.shape(flat)[0]
    crop = tf.repeat(tf.stack([y1, x1, y2, x2], axis=1), k, axis=0)
    out = tf.image.crop_and_resize(flat, crop, tf.range(n), tf.stack([out_h, out_w]))
    out = tf.reshape(tf.cast(out[..., 0] > 0.5, tf.float32), tf.stack([b, k, out_h, out_w]))
    inside = ((tf.range(out_h)[None, :, None] < hw[:, 0, None, None])
              & (tf.range(out_w)[None, None, :] < hw[:, 1, None, None]))
    return out * tf.cast(inside, tf.float32)[:, None]


def _serving_args(model, image_size, category_ids):
    if category_ids is None:
        category_ids = list(range(model.num_classes))
    return (int(image_size[0]), int(image_size[1])), [int(c) for c in category_ids]


def make_serving_function(model, *, image_size, min_size=None, max_size=None, category_ids=None):
    """The ``serving_default`` function (a ``tf.function`` over uint8 images).

    Args:
        model: a kerasdet detector (anything with ``detect(images)`` returning the
            detection dict).
        image_size: ``(H, W)`` network canvas, as in the training pipeline.
        min_size, max_size: the pipeline's optional Detectron-style resize rule.
        category_ids: contiguous class index -> dataset id. Default: ``range(K)``.
    """
    image_size, category_ids = _serving_args(model, image_size, category_ids)

    @tf.function(input_signature=[SIGNATURE_INPUT])
    def serve(images):
        images = check_images(images)
        canvas, ratio = preprocess_batch(images, image_size=image_size, min_size=min_size, max_size=max_size)
        detections = model.detect(canvas)
        shape = tf.shape(images)
        return serving_outputs(detections, ratio, tf.stack([shape[1], shape[2]]), category_ids)

    return serve


def _serve_encoded(model, image_bytes, image_size, min_size, max_size, category_ids):
    canvas, ratios, shapes = decode_and_preprocess(image_bytes, image_size=image_size, min_size=min_size,
                                                   max_size=max_size)
    outputs = serving_outputs(model.detect(canvas), ratios, shapes, category_ids)
    outputs["image_shapes"] = shapes
    return outputs


def make_encoded_serving_function(model, *, image_size, min_size=None, max_size=None, category_ids=None):
    """The ``encoded_image`` function: ``image_bytes`` string ``[B]`` of JPEG/PNG/GIF/BMP
    files, each its own size (arguments as :func:`make_serving_function`)."""
    image_size, category_ids = _serving_args(model, image_size, category_ids)

    @tf.function(input_signature=[ENCODED_INPUT])
    def serve_encoded(image_bytes):
        image_bytes = check_encoded(image_bytes)
        return _serve_encoded(model, image_bytes, image_size, min_size, max_size, category_ids)

    return serve_encoded


def make_example_serving_function(model, *, image_size, min_size=None, max_size=None, category_ids=None):
    """The ``tf_example`` function: ``serialized_examples`` string ``[B]`` of
    ``tf.train.Example`` protos with the encoded image under ``image/encoded``."""
    image_size, category_ids = _serving_args(model, image_size, category_ids)

    @tf.function(input_signature=[EXAMPLE_INPUT])
    def serve_tf_example(serialized_examples):
        serialized_examples = tf.ensure_shape(serialized_examples, [None], name="serialized_examples")
        batch_ok = tf.debugging.assert_positive(
            tf.size(serialized_examples),
            message="tf_example expects serialized_examples: string [batch] with batch >= 1; got an empty batch")
        with tf.control_dependencies([batch_ok]):
            features = tf.io.parse_example(serialized_examples,
                                           {EXAMPLE_IMAGE_KEY: tf.io.FixedLenFeature([], tf.string)})
        image_bytes = check_encoded(features[EXAMPLE_IMAGE_KEY], "tf_example", EXAMPLE_IMAGE_KEY)
        return _serve_encoded(model, image_bytes, image_size, min_size, max_size, category_ids)

    return serve_tf_example


def make_serving_functions(model, *, image_size, min_size=None, max_size=None, category_ids=None):
    """``{signature key: tf.function}`` of the three signatures (see the module doc)."""
    kwargs = dict(image_size=image_size, min_size=min_size, max_size=max_size, category_ids=category_ids)
    return {"serving_default": make_serving_function(model, **kwargs),
            "encoded_image": make_encoded_serving_function(model, **kwargs),
            "tf_example": make_example_serving_function(model, **kwargs)}


#: The box format of ``detection_boxes`` (and of the export metadata's ``bounding_box_format``).
SERVING_BOX_FORMAT = "rel_yxyx"
#: Version of the ``kerasdet_export.json`` layout (3: three signatures, ``signatures``).
METADATA_VERSION = 3

_OUTPUT_DOCS = {
    "detection_boxes": "normalized [ymin, xmin, ymax, xmax] of the original image (rel_yxyx)",
    "detection_scores": "",
    "detection_classes": "dataset category ids, -1 padding",
    "num_detections": "",
    "detection_masks": "0/1 instance masks at the original image size",
    "detection_mask_scores": "",
    "image_shapes": "(height, width) of each decoded image",
}
_INPUT_DOCS = {
    "serving_default": {"images": "uint8 [None, None, None, 3] RGB, any size, same size within a batch"},
    "encoded_image": {"image_bytes": "string [None] JPEG/PNG/GIF/BMP files, each its own size"},
    "tf_example": {"serialized_examples": f"string [None] serialized tf.train.Example, {EXAMPLE_IMAGE_KEY} = "
                                          "JPEG/PNG/GIF/BMP file"},
}


def _describe_outputs(fn):
    described = {}
    for key, spec in fn.get_concrete_function().structured_outputs.items():
        dims = ["B" if i == 0 else ("K" if i == 1 and key != "image_shapes" else (str(d) if d is not None else "?"))
                for i, d in enumerate(spec.shape.as_list())]
        described[key] = f"{spec.dtype.name} [{', '.join(dims)}] {_OUTPUT_DOCS.get(key, '')}".strip()
    return described


def export_metadata(model, serve, *, image_size, min_size=None, max_size=None, category_ids=None,
                    category_names=None, functions=None):
    """The ``kerasdet_export.json`` dict of an export of ``model`` served by ``serve``.

    Fields: ``format_version``; ``kerasdet_version``; ``class_name`` (the model class, also
    under the older key ``model``); ``num_classes``; ``model_config`` (the model's
    ``get_config()`` without the nested ``backbone``/``base``, which ``backbone`` /
    ``base`` name by class and name); ``image_size``, ``min_size``, ``max_size`` (the
    resize rule of the serving graph); ``category_ids`` (contiguous class index -> dataset
    id) and ``category_names`` (or None); ``bounding_box_format`` (``"rel_yxyx"``: the
    serving boxes, relative to the original image); ``max_detections`` (K, the second
    dimension of every per-detection output); ``has_masks``; ``signature`` (the
    ``serving_default`` inputs and each output's dtype, shape and meaning) and
    ``signatures`` (the same for every signature in ``functions``, ``{key: tf.function}``).
    """
    import kerasdet

    outputs = serve.get_concrete_function().structured_outputs
    num_classes = int(model.num_classes)
    ids = [int(c) for c in category_ids] if category_ids is not None else list(range(num_classes))
    config = model.get_config()
    nested = {}
    for key in ("backbone", "base"):
        if isinstance(config.get(key), dict):
            nested[key] = {"class_name": config[key].get("class_name"),
                           "name": config[key].get("config", {}).get("name")}
    functions = functions or {"serving_default": serve}
    signatures = {key: {"inputs": _INPUT_DOCS[key], "outputs": _describe_outputs(fn)}
                  for key, fn in functions.items()}
    return {
        "format_version": METADATA_VERSION,
        "kerasdet_version": kerasdet.__version__,
        "class_name": type(model).__name__,
        "model": type(model).__name__,
        "num_classes": num_classes,
        "model_config": {k: v for k, v in config.items() if k not in ("backbone", "base")},
        **nested,
        "image_size": [int(image_size[0]), int(image_size[1])],
        "min_size": min_size,
        "max_size": max_size,
        "category_ids": ids,
        "category_names": list(category_names) if category_names is not None else None,
        "bounding_box_format": SERVING_BOX_FORMAT,
        "max_detections": int(outputs["detection_boxes"].shape[1]),
        "has_masks": "detection_masks" in outputs,
        "signature": {"inputs": _INPUT_DOCS["serving_default"], "outputs": _describe_outputs(serve)},
        "signatures": signatures,
    }


# --- warm-up ------------------------------------------------------------------------------
def warmup_image(image_size, seed=0):
    """The deterministic uint8 ``[H, W, 3]`` image of the warm-up requests (smooth
    gradients plus noise, so that the JPEG is a realistic size)."""
    h, w = int(image_size[0]), int(image_size[1])
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.RandomState(seed)
    base = np.stack([255 * yy / max(h - 1, 1), 255 * xx / max(w - 1, 1), np.full((h, w), 128.0)], -1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def encode_example(image_bytes):
    """A serialized ``tf.train.Example`` with ``image/encoded`` = ``image_bytes`` (the
    ``tf_example`` signature's input element)."""
    feature = {EXAMPLE_IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[bytes(image_bytes)]))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def warmup_inputs(image_size):
    """``{signature key: {input name: numpy array}}`` of the warm-up requests: one image of
    the network's canvas size per signature (uint8, its JPEG, a ``tf.Example`` of it)."""
    image = warmup_image(image_size)
    jpeg = tf.io.encode_jpeg(tf.constant(image), quality=90).numpy()
    return {"serving_default": {"images": image[None]},
            "encoded_image": {"image_bytes": np.array([jpeg], dtype=object)},
            "tf_example": {"serialized_examples": np.array([encode_example(jpeg)], dtype=object)}}


def write_warmup_requests(export_dir, requests):
    """Writes ``assets.extra/tf_serving_warmup_requests`` (TFRecord of ``PredictionLog``
    protos with ``predict_log.request`` set; the format of "SavedModel Warmup",
    https://www.tensorflow.org/tfx/serving/saved_model_warmup) for ``requests``,
    ``{signature key: {input name: numpy array}}``. Needs ``tensorflow-serving-api``.
    Returns the file's path."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    path = os.path.join(export_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for signature, inputs in requests.items():
            request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(signature_name=signature))
            for name, value in inputs.items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
            log_entry = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log_entry.SerializeToString())
    return path


def _serving_api_available():
    try:
        import tensorflow_serving.apis.prediction_log_pb2  # noqa: F401
    except ImportError:
        return False
    return True


# --- writing ------------------------------------------------------------------------------
def export_saved_model(
    model,
    export_dir,
    *,
    image_size,
    min_size=None,
    max_size=None,
    category_ids=None,
    category_names=None,
    warmup="auto",
    fold_batchnorm="auto",
    precision="float32",
):
    """Writes a SavedModel with the three signatures to ``export_dir`` (this folder itself;
    :func:`export_versioned` adds the version layer TF Serving needs), ``kerasdet_export.json``
    (:func:`export_metadata`) next to it, and the warm-up requests.

    Uses ``keras.export.ExportArchive`` (tracks every variable, so the C++ loader finds
    them). The serving graph calls ``model.detect`` (``yxyx`` network pixels), so the
    model's ``bounding_box_format`` does not change it. ``warmup``: ``"auto"`` (default)
    writes ``assets.extra/tf_serving_warmup_requests`` when ``tensorflow-serving-api`` is
    installed (else logs a warning), ``True`` requires it, ``False`` skips it.

    ``fold_batchnorm`` (default ``"auto"``) and ``precision`` (default ``"float32"``;
    ``"bfloat16"``, or ``"auto"``: bfloat16 when the exporting machine's CPU has native
    bfloat16) choose the traced graph (:func:`kerasdet.precision.inference_variant`): by
    default every backbone BatchNormalization is folded into its convolution (measured on
    ResNet-50-FPN RetinaNet, 512², AVX-512 CPU: predict 0.93x / 0.74x the unfolded time
    at batch 1 / 4, ``benchmarks/vs_keras_hub.py --fold-bn``; detections equal within
    float round-off, tested). The choices are recorded in ``kerasdet_export.json``.
    Returns ``export_dir``.
    """
    if warmup not in ("auto", True, False):
        raise ValueError(f"warmup must be 'auto', True or False, got {warmup!r}")
    if warmup is True and not _serving_api_available():
        raise ImportError("warmup=True needs the tensorflow-serving-api package: pip install 'kerasdet[serving]'")
    if not model.built:
        model(tf.zeros((1, image_size[0], image_size[1], 3), tf.float32))
    with inference_variant(model, fold_batchnorm=fold_batchnorm, precision=precision) as (variant, graph):
        functions = make_serving_functions(
            variant, image_size=image_size, min_size=min_size, max_size=max_size, category_ids=category_ids
        )
        archive = keras.export.ExportArchive()
        archive.track(variant)
        for key, fn in functions.items():
            archive.add_endpoint(name=key, fn=fn)
        archive.write_out(export_dir, verbose=False)
        meta = export_metadata(model, functions["serving_default"], image_size=image_size, min_size=min_size,
                               max_size=max_size, category_ids=category_ids, category_names=category_names,
                               functions=functions)
    meta["inference_graph"] = graph
    with open(os.path.join(export_dir, "kerasdet_export.json"), "w") as f:
        json.dump(meta, f, indent=2, default=str)
    if warmup is True or (warmup == "auto" and _serving_api_available()):
        write_warmup_requests(export_dir, warmup_inputs(image_size))
    elif warmup == "auto":
        log.warning("tensorflow-serving-api is not installed: %s has no %s (pip install 'kerasdet[serving]')",
                    export_dir, WARMUP_FILE)
    return export_dir


_VERSION = re.compile(r"^[0-9]+$")


def existing_versions(base_dir):
    """The integer version folders under ``base_dir`` (sorted; those TF Serving sees)."""
    if not os.path.isdir(base_dir):
        return []
    return sorted(int(n) for n in os.listdir(base_dir)
                  if _VERSION.match(n) and os.path.isdir(os.path.join(base_dir, n)))


def next_version(base_dir):
    """One above the highest existing version under ``base_dir`` (1 for a new folder)."""
    versions = existing_versions(base_dir)
    return versions[-1] + 1 if versions else 1


def export_versioned(model, base_dir, *, version=None, **kwargs):
    """:func:`export_saved_model` into ``<base_dir>/<version>/``, TF Serving's layout.

    ``version``: a positive integer, default :func:`next_version`. An existing version
    folder is never overwritten (:class:`ExportVersionExistsError`). The SavedModel is
    written to a hidden sibling folder and renamed into place, so a model server polling
    ``base_dir`` never loads a half-written version. Returns the version folder.
    """
    if version is None:
        version = next_version(base_dir)
    elif isinstance(version, bool) or not isinstance(version, (int, np.integer)) or int(version) < 1:
        raise UserInputError(f"export version must be a positive integer, got {version!r}")
    version = int(version)
    if os.path.exists(base_dir) and not os.path.isdir(base_dir):
        raise UserInputError(f"export folder {base_dir} is a file")
    if os.path.isfile(os.path.join(base_dir, "saved_model.pb")):
        raise UserInputError(f"{base_dir} holds an unversioned SavedModel (saved_model.pb); TF Serving wants "
                             f"<base>/<version>/saved_model.pb: move it to {os.path.join(base_dir, '1')} or "
                             "export to another folder")
    target = os.path.join(base_dir, str(version))
    if os.path.exists(target):
        raise ExportVersionExistsError(
            f"export version {version} exists already in {base_dir} (versions are never overwritten; "
            f"existing: {existing_versions(base_dir)}, next free: {next_version(base_dir)})")
    os.makedirs(base_dir, exist_ok=True)
    tmp = os.path.join(base_dir, f".tmp-{version}-{uuid.uuid4().hex[:8]}")
    try:
        export_saved_model(model, tmp, **kwargs)
        if os.path.exists(target):  # another writer won the race
            raise ExportVersionExistsError(f"export version {version} appeared in {base_dir} while writing")
        os.rename(tmp, target)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_saved_model_dir(path):
    """``path`` itself when it holds ``saved_model.pb`` (a version folder, or an
    unversioned export), else its highest integer version folder that holds one (what TF
    Serving serves by default). :class:`DataFileNotFoundError` otherwise."""
    if not os.path.isdir(path):
        raise DataFileNotFoundError(f"no SavedModel folder {path}")
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    for version in reversed(existing_versions(path)):
        candidate = os.path.join(path, str(version))
        if os.path.isfile(os.path.join(candidate, "saved_model.pb")):
            return candidate
    raise DataFileNotFoundError(f"{path} holds neither saved_model.pb nor a <version>/saved_model.pb folder")
