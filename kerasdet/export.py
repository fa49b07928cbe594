"""SavedModel export with a TF Serving signature.

The exported ``serving_default`` takes ``images: uint8 [None, None, None, 3]`` (a batch of
same-size RGB images, any size) and returns:

* ``detection_boxes``: float32 ``[B, K, 4]`` normalized ``[ymin, xmin, ymax, xmax]``
  relative to the ORIGINAL image (0..1);
* ``detection_scores``: float32 ``[B, K]``;
* ``detection_classes``: int32 ``[B, K]`` in the dataset's own ids (e.g. COCO category
  ids); padding rows are -1;
* ``num_detections``: int32 ``[B]``.

Resizing (the same ops as the training pipeline, :mod:`kerasdet.data.geometry`),
normalization (inside the backbone), decoding and NMS are all inside the graph. The
SavedModel loads and runs with TensorFlow alone (no kerasdet import), with
``tf.saved_model.load`` and with ``saved_model_cli run`` (the C++ loader TF Serving uses).
A ``kerasdet_export.json`` next to ``saved_model.pb`` records the label map, the input
geometry and what the model is, for humans and tools (``kerasdet predict`` reads it; see
:func:`export_metadata` for the fields).

Box format: ``detection_boxes`` are ``rel_yxyx`` of the original image, the TF Object
Detection API's convention that TF Serving clients expect, whatever ``bounding_box_format``
the model was built with: that setting only changes the boxes of ``fit``/``predict`` (the
Keras edges), while the serving graph runs ``model.detect``, which always gives ``yxyx``
network-input pixels, and maps them to the original image itself. The metadata records
``"bounding_box_format": "rel_yxyx"``.

Any image from 1x1 up (odd aspect ratios such as 1x3000, any batch size) is served; ``K``
is fixed by the model (``max_detections``), so outputs always have the shapes above.
Wrong inputs fail with ``InvalidArgumentError`` before the model runs: a non-uint8 dtype
with TensorFlow's own "expected to be a uint8 tensor but is a float tensor"; a wrong rank,
channel count with "Shape of tensor images [8,8,3] is not compatible with expected shape
[?,?,?,3]", an empty batch or a 0-pixel image with "serving_default expects images: uint8
[batch, height, width, 3] with batch, height, width >= 1; got an empty batch or image"
(checked in the graph: a loaded signature does not check shapes). ``tests/test_serving_fuzz.py`` covers these.
"""
import json
import os

import keras
import tensorflow as tf

from kerasdet.data.geometry import resize_scale, resized_shape

SIGNATURE_INPUT = tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")


def check_images(images):
    """In-graph checks of what a loaded signature does not check itself: rank 4, 3
    channels (``tf.ensure_shape``: "Shape of tensor images [8,8,3] is not compatible with
    expected shape [?,?,?,3]") and a non-empty batch and image (the dtype is checked by
    TensorFlow when the signature is called). Errors are ``InvalidArgumentError``."""
    # A run-time check: the signature's static [None, None, None, 3] folds tf.rank away.
    images = tf.ensure_shape(images, [None, None, None, 3], name="images")
    size_ok = tf.debugging.assert_positive(
        tf.shape(images)[:3],
        message="serving_default expects images: uint8 [batch, height, width, 3] with batch, height, "
        "width >= 1; got an empty batch or image")
    with tf.control_dependencies([size_ok]):
        return tf.identity(images)


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


def serving_outputs(detections, ratio, original_hw, category_ids):
    """Maps network-pixel detections to the serving signature's outputs."""
    h = tf.cast(original_hw[0], tf.float32)
    w = tf.cast(original_hw[1], tf.float32)
    boxes = detections["boxes"] / ratio / tf.stack([h, w, h, w])
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
        outputs["detection_masks"] = _masks_to_original(detections["masks"], ratio, original_hw)
        if "mask_scores" in detections:
            outputs["detection_mask_scores"] = detections["mask_scores"]
    return outputs


def _masks_to_original(masks, ratio, original_hw):
    """``[B, K, H, W]`` 0/1 masks on the network canvas -> ``[B, K, h, w]`` float32 0/1 on
    the original image (the image's part of the canvas, resized back, binarized at 0.5)."""
    shape = tf.shape(masks)
    b, k, ch, cw = shape[0], shape[1], shape[2], shape[3]
    h, w = original_hw[0], original_hw[1]
    # Original pixel i (centre i + 0.5) sits at canvas index (i + 0.5) * r - 0.5;
    # crop_and_resize samples index y1 * (H - 1) + i * (y2 - y1) * (H - 1) / (h - 1).
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    chf, cwf = tf.cast(ch, tf.float32), tf.cast(cw, tf.float32)
    y1 = (0.5 * ratio[0] - 0.5) / tf.maximum(chf - 1.0, 1.0)
    y2 = ((hf - 0.5) * ratio[0] - 0.5) / tf.maximum(chf - 1.0, 1.0)
    x1 = (0.5 * ratio[1] - 0.5) / tf.maximum(cwf - 1.0, 1.0)
    x2 = ((wf - 0.5) * ratio[1] - 0.5) / tf.maximum(cwf - 1.0, 1.0)
    flat = tf.reshape(tf.cast(masks, tf.float32), [-1, ch, cw, 1])
    n = tf.shape(flat)[0]
    crop = tf.tile(tf.reshape(tf.stack([y1, x1, y2, x2]), [1, 4]), [n, 1])
    out = tf.image.crop_and_resize(flat, crop, tf.range(n), tf.stack([h, w]))
    return tf.reshape(tf.cast(out[..., 0] > 0.5, tf.float32), [b, k, h, w])


def make_serving_function(model, *, image_size, min_size=None, max_size=None, category_ids=None):
    """The ``serving_default`` function (a ``tf.function`` over uint8 images).

    Args:
        model: a kerasdet detector (anything with ``detect(images)`` returning the
            detection dict).
        image_size: ``(H, W)`` network canvas, as in the training pipeline.
        min_size, max_size: the pipeline's optional Detectron-style resize rule.
        category_ids: contiguous class index -> dataset id. Default: ``range(K)``.
    """
    if category_ids is None:
        category_ids = list(range(model.num_classes))
    category_ids = [int(c) for c in category_ids]
    image_size = (int(image_size[0]), int(image_size[1]))

    @tf.function(input_signature=[SIGNATURE_INPUT])
    def serve(images):
        images = check_images(images)
        canvas, ratio = preprocess_batch(images, image_size=image_size, min_size=min_size, max_size=max_size)
        detections = model.detect(canvas)
        shape = tf.shape(images)
        return serving_outputs(detections, ratio, (shape[1], shape[2]), category_ids)

    return serve


#: The box format of ``detection_boxes`` (and of the export metadata's ``bounding_box_format``).
SERVING_BOX_FORMAT = "rel_yxyx"
#: Version of the ``kerasdet_export.json`` layout.
METADATA_VERSION = 2

_OUTPUT_DOCS = {
    "detection_boxes": "normalized [ymin, xmin, ymax, xmax] of the original image (rel_yxyx)",
    "detection_scores": "",
    "detection_classes": "dataset category ids, -1 padding",
    "num_detections": "",
    "detection_masks": "0/1 instance masks at the original image size",
    "detection_mask_scores": "",
}


def export_metadata(model, serve, *, image_size, min_size=None, max_size=None, category_ids=None,
                    category_names=None):
    """The ``kerasdet_export.json`` dict of an export of ``model`` served by ``serve``.

    Fields: ``format_version``; ``kerasdet_version``; ``class_name`` (the model class, also
    under the older key ``model``); ``num_classes``; ``model_config`` (the model's
    ``get_config()`` without the nested ``backbone``/``base``, which ``backbone`` /
    ``base`` name by class and name); ``image_size``, ``min_size``, ``max_size`` (the
    resize rule of the serving graph); ``category_ids`` (contiguous class index -> dataset
    id) and ``category_names`` (or None); ``bounding_box_format`` (``"rel_yxyx"``: the
    serving boxes, relative to the original image); ``max_detections`` (K, the second
    dimension of every per-detection output); ``has_masks``; ``signature`` (the inputs and
    each output's dtype, shape and meaning).
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
    signature_outputs = {}
    for key, spec in outputs.items():
        dims = ["B" if i == 0 else ("K" if i == 1 else (str(d) if d is not None else "?"))
                for i, d in enumerate(spec.shape.as_list())]
        text = f"{spec.dtype.name} [{', '.join(dims)}]"
        doc = _OUTPUT_DOCS.get(key, "")
        signature_outputs[key] = f"{text} {doc}".strip()
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
        "signature": {
            "inputs": {"images": "uint8 [None, None, None, 3] RGB, any size, same size within a batch"},
            "outputs": signature_outputs,
        },
    }


def export_saved_model(
    model,
    export_dir,
    *,
    image_size,
    min_size=None,
    max_size=None,
    category_ids=None,
    category_names=None,
):
    """Writes a SavedModel with the ``serving_default`` signature to ``export_dir``, and
    ``kerasdet_export.json`` (:func:`export_metadata`) next to it.

    Uses ``keras.export.ExportArchive`` (tracks every variable, so the C++ loader finds
    them). The serving graph calls ``model.detect`` (``yxyx`` network pixels), so the
    model's ``bounding_box_format`` does not change it. Returns ``export_dir``.
    """
    if not model.built:
        model(tf.zeros((1, image_size[0], image_size[1], 3), tf.float32))
    serve = make_serving_function(
        model, image_size=image_size, min_size=min_size, max_size=max_size, category_ids=category_ids
    )
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name="serving_default", fn=serve)
    archive.write_out(export_dir, verbose=False)
    meta = export_metadata(model, serve, image_size=image_size, min_size=min_size, max_size=max_size,
                           category_ids=category_ids, category_names=category_names)
    with open(os.path.join(export_dir, "kerasdet_export.json"), "w") as f:
        json.dump(meta, f, indent=2, default=str)
    return export_dir
