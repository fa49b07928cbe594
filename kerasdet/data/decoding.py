"""Graph-native image decoding: PNG and JPEG files -> RGB uint8, as TensorFlow ops only.

What :func:`kerasdet.data.pipeline.make_dataset` uses by default (``decoder="tf"``). Every
op here is a plain TensorFlow op, so a pipeline built on it can be serialized and run on
``tf.data`` service workers (``tf.numpy_function`` cannot: its body lives in the calling
Python process).

It gives the tensors OpenCV gives (:func:`kerasdet.data.coco.read_image`, the ``"opencv"``
decoder), measured bit-identical on 8-bit RGB / grey / RGBA PNGs, 16-bit PNGs and JPEGs
(tests/data/test_decoding.py):

* PNG: ``decode_png(dtype=uint16)`` (8-bit files come back scaled by 257), then
  ``(v + 128) // 257``: OpenCV's 16-bit -> 8-bit conversion, and the identity on 8-bit
  files. Grey is replicated to 3 channels, grey+alpha and RGBA lose their alpha.
* JPEG: ``decode_jpeg(dct_method="INTEGER_ACCURATE")``, libjpeg's slow integer IDCT,
  which is what OpenCV uses (TensorFlow's default, ``INTEGER_FAST``, differs by up to 5
  grey levels on 2/3 of the pixels).
* EXIF orientation is not applied (as with OpenCV ``IMREAD_UNCHANGED``).

Bad files fail at run time with an error whose message names the file: a missing file
(``NotFoundError`` from ``read_file``), a file that is neither PNG nor JPEG by its first
bytes (empty, text, another format behind a ``.png`` name), a PNG without its ``IEND`` chunk
or a JPEG without its end-of-image marker at the end (truncated: libjpeg would return a
partly grey image), a decoded size that is not the annotated one. A file whose signature
and end marker are intact but whose inside is corrupt fails in the decoder with
TensorFlow's message, which does not name the file: ``load_coco`` / ``load_voc`` with
their default ``check_images=True`` decode every file once when the source is built and
name such a file there.

Other formats (BMP, TIFF, WebP, ...) are decoded by OpenCV inside the graph
(:func:`needs_opencv` picks them by file extension when the dataset is made); a pipeline
that holds such a branch cannot run on tf.data service workers.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import tensorflow as tf

__all__ = ["DECODERS", "GRAPH_EXTENSIONS", "needs_opencv", "decode_image_bytes",
           "read_image_graph"]

#: Values of ``make_dataset(decoder=...)``: ``"tf"`` (graph ops, the default) or
#: ``"opencv"`` (OpenCV in a ``tf.numpy_function``, the pipeline before graph decoding).
DECODERS = ("tf", "opencv")
#: File extensions decoded by TensorFlow ops (case-insensitive); others go to OpenCV.
GRAPH_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe")

_PNG_END = (73, 69, 78, 68)  # b"IEND"
_JPEG_END = (0xFF, 0xD9)


def needs_opencv(paths: Sequence[str]) -> np.ndarray:
    """bool per path: True where the extension is not one TensorFlow decodes here."""
    return np.asarray([os.path.splitext(str(p))[1].lower() not in GRAPH_EXTENSIONS
                       for p in paths], bool)


def _contains(tail, pattern):
    """Whether the uint8 vector ``tail`` holds the byte sequence ``pattern``."""
    k = len(pattern)
    n = tf.shape(tail)[0]
    if_long = tf.ones([tf.maximum(n - k + 1, 0)], tf.bool)
    for i, byte in enumerate(pattern):
        if_long &= tail[i:tf.maximum(n - k + 1 + i, i)] == byte
    return tf.reduce_any(if_long)


def _tail(data, length):
    size = tf.strings.length(data)
    start = tf.maximum(size - length, 0)
    return tf.io.decode_raw(tf.strings.substr(data, start, size - start), tf.uint8)


def decode_image_bytes(data, path=""):
    """Graph op: PNG or JPEG bytes -> RGB uint8 ``[h, w, 3]`` (see the module doc).

    ``path`` (a string tensor or str) only names the file in the error messages.
    """
    data = tf.convert_to_tensor(data, tf.string)
    path = tf.convert_to_tensor(path, tf.string)
    head = tf.strings.substr(data, 0, 8)
    is_png = tf.equal(head, b"\x89PNG\r\n\x1a\n")
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 2), b"\xff\xd8")
    known = tf.debugging.Assert(
        is_png | is_jpeg,
        [path, ": not a PNG or JPEG file (empty, corrupt, or another format behind this "
               "name); decode it with decoder='opencv' or convert it"])
    png_ok = tf.logical_or(tf.logical_not(is_png), _contains(_tail(data, 64), _PNG_END))
    jpeg_ok = tf.logical_or(tf.logical_not(is_jpeg), _contains(_tail(data, 1024), _JPEG_END))
    complete = tf.debugging.Assert(
        png_ok & jpeg_ok,
        [path, ": truncated image file (a PNG without its IEND chunk or a JPEG without its "
               "end-of-image marker)"])
    with tf.control_dependencies([known, complete]):
        data = tf.identity(data)

    def png():
        v = tf.io.decode_png(data, channels=0, dtype=tf.uint16)
        v = tf.cast((tf.cast(v, tf.int32) + 128) // 257, tf.uint8)
        pick = tf.where(tf.shape(v)[-1] < 3, tf.constant([0, 0, 0]), tf.constant([0, 1, 2]))
        return tf.gather(v, pick, axis=-1)

    def jpeg():
        return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")

    image = tf.cond(is_png, png, jpeg)
    image.set_shape([None, None, 3])
    return image


def read_image_graph(path, height=None, width=None):
    """Graph op: read and decode ``path`` (PNG / JPEG) as RGB uint8 ``[h, w, 3]``.

    With ``height`` / ``width`` (scalar tensors or ints), a decoded size that differs fails
    with an error naming the file and both sizes (the annotations would not match the
    pixels).
    """
    path = tf.convert_to_tensor(path, tf.string)
    image = decode_image_bytes(tf.io.read_file(path), path)
    if height is None or width is None:
        return image
    shape = tf.shape(image, out_type=tf.int32)[:2]
    expected = tf.stack([tf.cast(height, tf.int32), tf.cast(width, tf.int32)])
    same = tf.debugging.Assert(
        tf.reduce_all(tf.equal(shape, expected)),
        [path, ": image is (height, width)=", shape, "but the annotations say", expected])
    with tf.control_dependencies([same]):
        return tf.identity(image)
