"""TFRecord shards of ``tf.Example`` s in the TF Object Detection API / Model Garden schema:
writing (``kerasdet convert coco2tfrecord`` / ``voc2tfrecord``) and reading (the
``tfrecord`` data kind).

The schema (what the OD API's ``create_coco_tf_record.py`` writes and Model Garden's
``TfExampleDecoder`` reads), one ``tf.train.Example`` per image:

================================  =======  ==============================================
``image/encoded``                 bytes    the image file (PNG / JPEG as on disk)
``image/format``                  bytes    ``"jpeg"`` / ``"png"``
``image/height``, ``image/width`` int64    pixels
``image/filename``                bytes    file name (optional when reading)
``image/source_id``               bytes    the dataset image id as text (``"139"``)
``image/key/sha256``              bytes    hex digest of ``image/encoded`` (optional)
``image/object/bbox/xmin`` ...    float    ``xmin, ymin, xmax, ymax`` in 0..1 (divided
                                           by the image width / height)
``image/object/class/label``      int64    the dataset category id (COCO ids, VOC 1..20)
``image/object/class/text``       bytes    category name (optional)
``image/object/is_crowd``         int64    0/1 (optional, default 0; VOC difficult = 1)
``image/object/area``             float    pixels (optional)
``image/object/mask``             bytes    one PNG per object, 0/1 (written with masks)
================================  =======  ==============================================

Shards are ``PREFIX-00000-of-0000N.tfrecord``; image ``i`` goes to shard ``i % N``.
Files that are neither PNG nor JPEG are re-encoded as PNG (lossless), so readers decode
every record with graph ops.

Reading: :func:`load_tfrecord_source` scans the records once on the host (every
feature but the image bytes is parsed; the bytes are still read from disk) for what a
run needs before training: the number of images, the class list (the sorted labels of
the records, or a label map) and, for evaluation, the ground truth as a
:class:`~kerasdet.data.coco.DetectionSource` (pycocotools' GT is built from it with
:func:`kerasdet.data.convert.coco_from_source`). :func:`make_tfrecord_dataset` gives the
batches of :func:`~kerasdet.data.pipeline.make_dataset` (same keys, shapes and
preprocessing) from the shards: ``list_files`` order (sorted), interleaved reading,
per-worker sharding by file (by record when there are fewer files than workers), a
record shuffle buffer; graph ops only, so it can run on tf.data service workers.
Masks are written but not read back (``masks`` is not supported by the tfrecord kind yet).
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
from typing import Sequence

import numpy as np

from kerasdet.errors import ConfigError, DataError, DataFileNotFoundError

from .coco import DetectionSource, load_coco, read_image
from .geometry import MIN_VISIBLE_FRACTION

logger = logging.getLogger(__name__)

__all__ = ["shard_names", "example_from_source", "write_tfrecords", "coco_to_tfrecord",
           "voc_to_tfrecord", "tfrecord_files", "read_label_map", "parse_example",
           "load_tfrecord_source", "make_tfrecord_dataset"]

_BOX_KEYS = ("xmin", "ymin", "xmax", "ymax")


# --- writing -----------------------------------------------------------------------------
def shard_names(prefix: str, num_shards: int) -> list:
    """``PREFIX-00000-of-0000N.tfrecord`` for ``N = num_shards``."""
    if int(num_shards) < 1:
        raise ConfigError(f"num_shards must be >= 1, got {num_shards}")
    return [f"{prefix}-{i:05d}-of-{int(num_shards):05d}.tfrecord" for i in range(int(num_shards))]


def _encoded_image(path):
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data, b"png"
    if data.startswith(b"\xff\xd8"):
        return data, b"jpeg"
    import cv2  # another format: lossless PNG of what the OpenCV pipeline decodes

    ok, buf = cv2.imencode(".png", read_image(path)[..., ::-1])
    if not ok:
        raise DataError(f"{path}: could not re-encode the image as PNG")
    return buf.tobytes(), b"png"


def example_from_source(source: DetectionSource, index: int, *, masks=None):
    """The ``tf.train.Example`` of image ``index`` of ``source`` (schema in the module doc).

    ``masks``: optional uint8 ``[h, w, n]`` instance masks of its objects (PNG-encoded into
    ``image/object/mask``)."""
    import tensorflow as tf

    i = int(index)
    path = str(source.image_paths[i])
    data, fmt = _encoded_image(path)
    h, w = int(source.heights[i]), int(source.widths[i])
    boxes = np.asarray(source.boxes[i], np.float64).reshape(-1, 4)
    classes = np.asarray(source.classes[i], np.int64).reshape(-1)
    labels = np.asarray(source.category_ids, np.int64)[classes] if len(classes) else classes
    names = [str(source.category_names[c]).encode() for c in classes]

    def ints(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(x) for x in v]))

    def floats(v):
        return tf.train.Feature(float_list=tf.train.FloatList(value=[float(x) for x in v]))

    def strs(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(v)))

    feature = {
        "image/encoded": strs([data]),
        "image/format": strs([fmt]),
        "image/height": ints([h]),
        "image/width": ints([w]),
        "image/filename": strs([os.path.basename(path).encode()]),
        "image/source_id": strs([str(source.image_ids[i]).encode()]),
        "image/key/sha256": strs([hashlib.sha256(data).hexdigest().encode()]),
        "image/object/bbox/xmin": floats(boxes[:, 1] / w),
        "image/object/bbox/ymin": floats(boxes[:, 0] / h),
        "image/object/bbox/xmax": floats(boxes[:, 3] / w),
        "image/object/bbox/ymax": floats(boxes[:, 2] / h),
        "image/object/class/label": ints(labels),
        "image/object/class/text": strs(names),
        "image/object/is_crowd": ints(np.asarray(source.is_crowd[i], bool).reshape(-1)),
        "image/object/area": floats((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])),
    }
    if masks is not None:
        import cv2

        pngs = []
        for j in range(masks.shape[-1]):
            ok, buf = cv2.imencode(".png", np.ascontiguousarray(masks[..., j]))
            pngs.append(buf.tobytes())
        feature["image/object/mask"] = strs(pngs)
    return tf.train.Example(features=tf.train.Features(feature=feature))


def write_tfrecords(source: DetectionSource, output_prefix: str, *, num_shards: int = 1,
                    include_masks: bool = False) -> list:
    """Writes ``source`` as ``num_shards`` TFRecord shards; returns their paths.

    Args:
      source: any :class:`DetectionSource` (``load_coco``, ``load_voc_sets``).
      output_prefix: path prefix of the shards (folders created).
      num_shards: number of files (default 1); image ``i`` goes to shard ``i % N``.
      include_masks: also write ``image/object/mask`` (the source's segmentations
        rasterized with :func:`kerasdet.data.masks.rasterize_masks`, filled boxes where an
        object has none). Default False.
    """
    import tensorflow as tf

    names = shard_names(os.fspath(output_prefix), num_shards)
    parent = os.path.dirname(names[0])
    if parent:
        os.makedirs(parent, exist_ok=True)
    entries = None
    if include_masks:
        from .masks import check_segmentations

        entries = check_segmentations(source)[0]
    writers = [tf.io.TFRecordWriter(n + ".tmp") for n in names]
    try:
        for i in range(len(source)):
            masks = None
            if entries is not None:
                from .masks import rasterize_masks

                masks = rasterize_masks(entries[i], np.asarray(source.boxes[i]).reshape(-1, 4),
                                        np.asarray(source.is_crowd[i], bool).reshape(-1),
                                        int(source.heights[i]), int(source.widths[i]),
                                        "instances", where=str(source.annotation_file))
            writers[i % len(names)].write(
                example_from_source(source, i, masks=masks).SerializeToString())
    finally:
        for w in writers:
            w.close()
    for n in names:
        os.replace(n + ".tmp", n)
    logger.info("wrote %d image(s) to %d shard(s) %s", len(source), len(names), names[0])
    return names


def coco_to_tfrecord(annotation_file: str, image_dir: str, output_prefix: str, *,
                     num_shards: int = 1, include_masks: bool = False) -> list:
    """``kerasdet convert coco2tfrecord``: a COCO JSON + image folder as TFRecord shards
    (:func:`write_tfrecords`; the loader's checks and skips apply, see
    :func:`kerasdet.data.coco.load_coco`)."""
    source = load_coco(annotation_file, image_dir)
    return write_tfrecords(source, output_prefix, num_shards=num_shards,
                           include_masks=include_masks)


def voc_to_tfrecord(voc_root: str, output_prefix: str, *, sets: Sequence[str] = ("2007/test",),
                    num_shards: int = 1, use_difficult: bool = False) -> list:
    """``kerasdet convert voc2tfrecord``: VOC years/splits as TFRecord shards (labels
    ``1..20`` in ``VOC_CLASSES`` order; difficult objects are ``is_crowd=1`` unless
    ``use_difficult``)."""
    from .voc import VOC_CLASSES, load_voc_sets

    source = load_voc_sets(os.fspath(voc_root), sets, class_names=VOC_CLASSES,
                           use_difficult=use_difficult)
    return write_tfrecords(source, output_prefix, num_shards=num_shards)


# --- reading -----------------------------------------------------------------------------
def tfrecord_files(pattern) -> list:
    """The sorted files of a glob pattern (or of a list of patterns / files)."""
    patterns = [pattern] if isinstance(pattern, (str, os.PathLike)) else list(pattern)
    files = sorted({f for p in patterns for f in glob.glob(os.fspath(p))})
    if not files:
        raise DataFileNotFoundError(f"no TFRecord file matches {pattern}")
    return files


def read_label_map(path: str) -> dict:
    """``{id: name}`` from an OD API label map (``item { id: 1 name: 'cat' }`` pbtxt, with
    ``display_name`` accepted) or a JSON object ``{"1": "cat", ...}``."""
    import json

    if not os.path.isfile(path):
        raise DataFileNotFoundError(f"label map not found: {path}")
    with open(path) as f:
        text = f.read()
    if path.lower().endswith(".json"):
        try:
            return {int(k): str(v) for k, v in json.loads(text).items()}
        except (ValueError, AttributeError) as e:
            raise DataError(f"{path}: expected a JSON object {{id: name}} ({e})") from None
    out = {}
    for item in re.findall(r"item\s*\{(.*?)\}", text, re.S):
        ids = re.findall(r"\bid\s*:\s*(-?\d+)", item)
        names = re.findall(r"\b(?:display_)?name\s*:\s*['\"](.*?)['\"]", item)
        if not ids:
            raise DataError(f"{path}: label map item without an id: {item.strip()[:60]}")
        out[int(ids[0])] = names[0] if names else ids[0]
    if not out:
        raise DataError(f"{path}: no 'item {{ id: ... name: ... }}' entries")
    return out


def _features(with_image):
    import tensorflow as tf

    f = {
        "image/height": tf.io.FixedLenFeature([], tf.int64),
        "image/width": tf.io.FixedLenFeature([], tf.int64),
        "image/source_id": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "image/filename": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "image/object/class/label": tf.io.VarLenFeature(tf.int64),
        "image/object/class/text": tf.io.VarLenFeature(tf.string),
        "image/object/is_crowd": tf.io.VarLenFeature(tf.int64),
    }
    f.update({f"image/object/bbox/{k}": tf.io.VarLenFeature(tf.float32) for k in _BOX_KEYS})
    if with_image:
        f["image/encoded"] = tf.io.FixedLenFeature([], tf.string)
    return f


def _image_id(source_id):
    """int64 image id of a ``source_id``: the number when it is one, else a stable hash."""
    import tensorflow as tf

    numeric = tf.strings.regex_full_match(source_id, r"[0-9]{1,18}")
    return tf.where(numeric, tf.strings.to_number(tf.where(numeric, source_id, "0"), tf.int64),
                    tf.strings.to_hash_bucket_fast(source_id, 2**62) + 1)


def parse_example(serialized, *, category_ids: Sequence[int], decode: bool = True):
    """Graph op: one serialized ``tf.Example`` -> the example dict of the pipeline.

    ``{"image" (uint8 [h, w, 3], with ``decode``), "image_id", "size" [2], "boxes" [n, 4]
    yxyx pixels, "classes" [n] contiguous indices, "is_crowd" [n], "labels" [n] (the
    record's labels)}``. Boxes are clipped to the image; objects whose label is not in
    ``category_ids`` or whose clipped box is empty are dropped (the host scan,
    :func:`load_tfrecord_source`, counts them).
    """
    import tensorflow as tf

    from .decoding import decode_image_bytes

    ex = tf.io.parse_single_example(serialized, _features(decode))
    dense = {k: tf.sparse.to_dense(v) for k, v in ex.items() if isinstance(v, tf.SparseTensor)}
    h = tf.cast(ex["image/height"], tf.float32)
    w = tf.cast(ex["image/width"], tf.float32)
    clip = lambda v: tf.clip_by_value(v, 0.0, 1.0)  # noqa: E731
    boxes = tf.stack([clip(dense["image/object/bbox/ymin"]) * h, clip(dense["image/object/bbox/xmin"]) * w,
                      clip(dense["image/object/bbox/ymax"]) * h, clip(dense["image/object/bbox/xmax"]) * w],
                     axis=-1)
    labels = dense["image/object/class/label"]
    n = tf.shape(labels)[0]
    crowd = dense["image/object/is_crowd"]
    crowd = tf.cond(tf.shape(crowd)[0] == n, lambda: crowd, lambda: tf.zeros([n], tf.int64))
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(list(category_ids), tf.int64),
                                            tf.range(len(category_ids), dtype=tf.int32)), -1)
    classes = table.lookup(labels)
    keep = (classes >= 0) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    size = tf.cast(tf.stack([ex["image/height"], ex["image/width"]]), tf.int32)
    out = {
        "image_id": _image_id(ex["image/source_id"]),
        "size": size,
        "boxes": tf.boolean_mask(boxes, keep),
        "classes": tf.boolean_mask(classes, keep),
        "is_crowd": tf.boolean_mask(crowd > 0, keep),
        "labels": labels,
    }
    if decode:
        name = tf.strings.join(["TFRecord image ", ex["image/source_id"], " (",
                                ex["image/filename"], ")"])
        image = decode_image_bytes(ex["image/encoded"], name)
        same = tf.debugging.Assert(tf.reduce_all(tf.shape(image)[:2] == size),
                                   [name, ": decoded size", tf.shape(image)[:2],
                                    "is not image/height, image/width", size])
        with tf.control_dependencies([same]):
            out["image"] = tf.identity(image)
    return out


def load_tfrecord_source(pattern, *, category_ids: Sequence[int] | None = None,
                         label_map: str | None = None) -> DetectionSource:
    """Scans TFRecord shards on the host into a :class:`DetectionSource` (no image decoded).

    Args:
      pattern: glob pattern(s) of the shards (:func:`tfrecord_files`).
      category_ids: the class list (dataset label ids, contiguous-index order); default:
        the label map's ids (sorted), else the sorted labels found in the records.
      label_map: optional OD API label map (pbtxt) or JSON ``{id: name}``
        (:func:`read_label_map`): class names, and the class list when ``category_ids``
        is not given. Without it names are the records' ``class/text`` (else the ids).

    ``image_paths`` are ``"<shard>#<record>"`` (for messages), ``annotation_file`` is the
    pattern; objects with a label outside the class list are counted in
    ``skipped["unknown_category"]``, empty boxes in ``skipped["degenerate_bbox"]``.
    Duplicate image ids are a :class:`~kerasdet.errors.DataError` naming them.
    """
    import tensorflow as tf

    files = tfrecord_files(pattern)
    names = read_label_map(label_map) if label_map else {}
    rows = []
    seen_labels, texts = set(), {}
    for fname in files:
        ds = tf.data.TFRecordDataset(fname).map(lambda s: {
            k: v.values if isinstance(v, tf.SparseTensor) else v
            for k, v in tf.io.parse_single_example(s, _features(False)).items()})
        for k, ex in enumerate(ds.as_numpy_iterator()):
            sparse = {key: np.asarray(v) for key, v in ex.items() if key.startswith("image/object/")}
            rows.append((f"{fname}#{k}", ex, sparse))
            seen_labels.update(int(v) for v in sparse["image/object/class/label"])
            for lab, txt in zip(sparse["image/object/class/label"], sparse["image/object/class/text"]):
                texts.setdefault(int(lab), txt.decode("utf-8", "replace"))
    if category_ids is None:
        category_ids = sorted(names) if names else sorted(seen_labels)
    category_ids = [int(c) for c in category_ids]
    cat_names = [names.get(c, texts.get(c, str(c))) for c in category_ids]
    source = DetectionSource(image_paths=[], image_ids=[], heights=[], widths=[], boxes=[], classes=[],
                             is_crowd=[], annotation_ids=[], category_ids=category_ids,
                             category_names=cat_names, annotation_file=str(pattern))
    index = {c: i for i, c in enumerate(category_ids)}
    skipped = {"unknown_category": 0, "degenerate_bbox": 0}
    next_ann = 1
    for where, ex, sparse in rows:
        h, w = int(ex["image/height"]), int(ex["image/width"])
        boxes = np.stack([np.clip(sparse[f"image/object/bbox/{k}"], 0, 1) * s
                          for k, s in (("ymin", h), ("xmin", w), ("ymax", h), ("xmax", w))],
                         axis=-1).astype(np.float32).reshape(-1, 4)
        labels = sparse["image/object/class/label"].astype(np.int64)
        crowd = sparse["image/object/is_crowd"].astype(bool)
        if len(crowd) != len(labels):
            crowd = np.zeros(len(labels), bool)
        classes = np.asarray([index.get(int(v), -1) for v in labels], np.int32)
        degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        keep = (classes >= 0) & ~degenerate
        skipped["unknown_category"] += int((classes < 0).sum())
        skipped["degenerate_bbox"] += int(((classes >= 0) & degenerate).sum())
        source.image_paths.append(where)
        source.image_ids.append(int(_image_id(tf.constant(ex["image/source_id"])).numpy()))
        source.heights.append(h)
        source.widths.append(w)
        source.boxes.append(boxes[keep])
        source.classes.append(classes[keep])
        source.is_crowd.append(crowd[keep])
        source.annotation_ids.append(np.arange(next_ann, next_ann + int(keep.sum()), dtype=np.int64))
        next_ann += int(keep.sum())
    ids = np.asarray(source.image_ids)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"{pattern}: duplicate image/source_id (image ids "
                        f"{unique[counts > 1][:5].tolist()})")
    source.skipped = {k: v for k, v in skipped.items() if v}
    if source.skipped:
        logger.warning("%s: skipped objects %s", pattern, source.skipped)
    return source


def make_tfrecord_dataset(
    pattern,
    *,
    category_ids: Sequence[int],
    batch_size: int,
    image_size: Sequence[int],
    min_size: int | None = None,
    max_size: int | None = None,
    training: bool = False,
    flip: bool | None = None,
    scale_jitter: Sequence[float] | None = None,
    ssd_augmentation: bool = False,
    max_boxes: int = 100,
    seed: int | None = None,
    shuffle_buffer_size: int = 1024,
    start_batch: int = 0,
    num_parallel_calls=None,
    cycle_length: int = 8,
    min_visible_fraction: float = MIN_VISIBLE_FRACTION,
    input_context=None,
    data_service: str | None = None,
):
    """Batches of :func:`~kerasdet.data.pipeline.make_dataset` read from TFRecord shards.

    Args:
      pattern: glob pattern(s) of the shards.
      category_ids: record labels in contiguous-index order (``source.category_ids`` of
        :func:`load_tfrecord_source`); other labels are dropped.
      batch_size: the GLOBAL batch (with an ``input_context`` of N pipelines each yields
        ``batch_size / num_replicas_in_sync`` per batch, as ``make_dataset``).
      image_size, min_size, max_size, flip, scale_jitter, ssd_augmentation, max_boxes,
      min_visible_fraction: as :func:`~kerasdet.data.pipeline.make_dataset` (``flip``
        defaults to ``training``; augmentation only in training).
      training: shuffle (files, then records in a ``shuffle_buffer_size`` buffer;
        default 1024), repeat forever, drop the last partial batch. Else one pass in
        file order (sorted names, records in order; interleaving is deterministic).
      seed: shuffle and augmentation seed (the augmentation of stream position ``p`` is
        seeded by ``(seed + 1, p)``); same seed, same stream. None: random.
      start_batch: training: skip this many batches (records are read, not decoded).
      num_parallel_calls: of the parse / preprocess maps (default AUTOTUNE).
      cycle_length: shards read at once (default 8).
      input_context: a ``tf.distribute.InputContext`` (default:
        :func:`kerasdet.distribute.current_input_context` in training): pipeline ``w`` of
        ``N`` reads files ``w, w + N, ...`` (records ``w, w + N, ...`` when there are
        fewer files than pipelines).
      data_service: training: ``"grpc://host:port"`` of a tf.data service dispatcher;
        reading, decoding and preprocessing run on its workers (``distributed_epoch``:
        the shards are split between the workers, each record read by one worker per
        pass); batches are formed here, in arrival order. The augmentation seed of a
        record is then a hash of the record (the same in every epoch), not its stream
        position. Default None (local).
    """
    import tensorflow as tf

    from .pipeline import prepare_example

    files = tfrecord_files(pattern)
    image_size = (int(image_size[0]), int(image_size[1]))
    num_parallel_calls = tf.data.AUTOTUNE if num_parallel_calls is None else num_parallel_calls
    flip = training if flip is None else bool(flip)
    if not training:
        flip, scale_jitter, ssd_augmentation = False, None, False
    random_aug = flip or scale_jitter is not None or ssd_augmentation
    if seed is None:
        seed = int(np.random.randint(0, 2**31 - 1))
    seed = int(seed)
    if input_context is None and training:
        from kerasdet.distribute import current_input_context

        input_context = current_input_context()
    pipelines = input_context.num_input_pipelines if input_context is not None else 1
    out_batch = int(batch_size)
    if input_context is not None:
        out_batch = input_context.get_per_replica_batch_size(int(batch_size))
    ds = tf.data.Dataset.from_tensor_slices(files)
    by_file = pipelines > 1 and len(files) >= pipelines
    if by_file:
        ds = ds.shard(pipelines, input_context.input_pipeline_id)
    if training:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=max(1, min(cycle_length, len(files))),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if pipelines > 1 and not by_file:
        ds = ds.shard(pipelines, input_context.input_pipeline_id)
    if training:
        ds = ds.shuffle(int(shuffle_buffer_size), seed=seed + 2, reshuffle_each_iteration=True).repeat()
        ds = ds.skip(int(start_batch) * out_batch)
    if data_service:  # one source only (the shards are what the workers split): no counter
        ds = ds.map(lambda s: (s, tf.strings.to_hash_bucket_fast(s, 2**62)))
    else:
        ds = tf.data.Dataset.zip(ds, tf.data.Dataset.counter(int(start_batch) * out_batch))
    aug_seed = seed + 1

    def prepare(serialized, position):
        example = parse_example(serialized, category_ids=category_ids)
        element_seed = (tf.stack([tf.constant(aug_seed, tf.int64), position])
                        if random_aug else None)
        return prepare_example(
            example, element_seed, image_size=image_size, min_size=min_size, max_size=max_size,
            flip=flip, scale_jitter=scale_jitter, max_boxes=max_boxes,
            min_visible_fraction=min_visible_fraction, ssd_augmentation=ssd_augmentation)

    ds = ds.map(prepare, num_parallel_calls=num_parallel_calls)
    if data_service:
        if not training or pipelines > 1:
            raise ConfigError("the tf.data service is used for training with one input pipeline")
        ds = ds.apply(tf.data.experimental.service.distribute(
            processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC, service=data_service))
    ds = ds.batch(out_batch, drop_remainder=training)
    if input_context is not None:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        ds = ds.with_options(options)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    ds._kerasdet_input_context = input_context
    return ds
