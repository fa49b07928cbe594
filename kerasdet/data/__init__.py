"""kerasdet.data: loaders (COCO JSON, Pascal VOC), the embedded multi-digit set, tf.data.

* :func:`generate_digits` writes the default data set (real MNIST digits composed into
  detection images, PNG + COCO JSON with boxes and masks).
* :func:`load_coco` / :func:`load_voc` / :func:`load_voc_sets` return a
  :class:`DetectionSource` (numpy, no TF).
* :func:`make_dataset` turns a source into batched ``(images, labels)`` ``tf.data``.

Modules, each importing only those listed before it (a one-way graph):

* :mod:`~kerasdet.data.coco`, :mod:`~kerasdet.data.voc`: loaders (numpy, no TensorFlow);
* :mod:`~kerasdet.data.box_format`: a source's boxes from any Keras
  ``bounding_box_format`` to kerasdet's yxyx pixels (``make_dataset(bounding_box_format=)``);
* :mod:`~kerasdet.data.geometry`: resize / flip / crop / pad / clip / compaction graph ops;
* :mod:`~kerasdet.data.preprocess`: per-example preprocessing (standard and SSD's
  augmentation), built from the geometry ops;
* :mod:`~kerasdet.data.masks`: checking, decoding and rasterizing COCO segmentations;
* :mod:`~kerasdet.data.pipeline`: :func:`make_dataset`, the ``tf.data`` pipeline;
* :mod:`~kerasdet.data.digits`: the embedded data set's generator.

The TensorFlow modules (and ``generate_digits``, so that ``python -m
kerasdet.data.digits`` runs cleanly) are loaded lazily, which keeps the loaders light.
"""
from .coco import DetectionSource, load_coco, read_image
from .voc import VOC_CLASSES, load_voc, load_voc_sets

__all__ = [
    "DetectionSource", "load_coco", "load_voc", "load_voc_sets", "read_image", "VOC_CLASSES",
    "generate_digits", "make_dataset",
]


def __getattr__(name):
    if name == "generate_digits":
        from .digits import generate_digits

        return generate_digits
    if name == "make_dataset":
        from .pipeline import make_dataset

        return make_dataset
    if name in ("box_format", "geometry", "preprocess", "masks", "pipeline", "digits"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
