"""``tf.data`` input pipeline: a :class:`~kerasdet.data.coco.DetectionSource` -> batches.

:func:`make_dataset` yields ``(images, labels)``:

* ``images``: float32 ``[B, H, W, 3]``, RGB, 0..255 (not normalized: models normalize).
* ``labels``: a dict

  - ``"boxes"`` float32 ``[B, max_boxes, 4]`` yxyx in network-input pixels (0 rows pad),
  - ``"classes"`` int32 ``[B, max_boxes]`` contiguous, padded with -1,
  - ``"is_crowd"`` bool ``[B, max_boxes]`` (False pad): ignore these in matching,
  - ``"image_id"`` int64 ``[B]`` (the dataset's image id),
  - ``"image_scale"`` float32 ``[B]``: network px per original px, so
    ``original = network / image_scale`` (the nominal scale; the image itself is resized
    to ``round(h * scale)``, which differs by < 0.5 px),
  - ``"original_size"`` int32 ``[B, 2]``: ``(height, width)`` of the original image.

  - with ``masks="union"``: ``"foreground"`` uint8 ``[B, H, W]``, the class-agnostic
    foreground: 1 where a non-crowd object's mask covers the pixel, **255 = "ignore"**
    where only crowd (``iscrowd=1``) regions cover it (a loss should give those pixels
    weight 0; non-crowd foreground wins where both overlap), 0 elsewhere, padding
    included. Objects whose boxes were dropped by a crop or ``max_boxes`` still count:
    their visible pixels are foreground,
  - with ``masks="instances"``: ``"masks"`` uint8 ``[B, max_boxes, H, W]`` (0/1), row
    ``i`` is the mask of the object in row ``i`` of ``"boxes"`` (same compaction and
    dropping after the crop; zero rows for padding; crowd rows carry their region).

Shapes are static (``B`` too when ``drop_remainder``), so models trace once.

Masks (and their cost): each image's COCO ``segmentation`` entries (``source.masks``:
polygons, uncompressed or compressed RLE) are checked once when the dataset is made
(a malformed entry raises ``ValueError`` naming the annotation file, the annotation id
and the image id; degenerate polygon parts are dropped and counted) and rasterized with
``pycocotools`` on the host, in a ``tf.numpy_function`` of the load step, at the
*original* image size (:mod:`kerasdet.data.masks`); with ``cache_images`` the
rasterized masks are cached with the images. The graph then applies exactly the image's
resize (nearest neighbour, :func:`kerasdet.data.geometry.resize_masks`), flip, jitter
crop and padding. Objects without a usable segmentation (box-only annotations, VOC, all
polygon parts degenerate) get their *filled box* as mask in both modes: **our
extension** (Attention CoupleNet, §III-B, supervises its attention maps with instance
segmentations only); their number (images and annotations) is logged once as a
warning. Memory: the cache holds ``h * w`` bytes per image for ``"union"`` and
``h * w * n_objects`` for ``"instances"`` (COCO train2017, 640x480 and ~7 objects per
image: ~36 GB resp. ~250 GB, so do not ``cache_images`` COCO), and an ``"instances"``
batch is ``B * max_boxes * H * W`` bytes (2 x 100 x 1344^2 = 361 MB: lower
``max_boxes`` for large canvases). Not supported with ``ssd_augmentation``.

Structure (and why): per-image labels enter as ragged tensor slices (no Python
generator); images are decoded by TensorFlow ops (``decoder="tf"``, the default:
:mod:`kerasdet.data.decoding`, PNG / JPEG, bit-identical to OpenCV; other formats by
OpenCV) or by OpenCV inside ``tf.numpy_function`` (``decoder="opencv"``; grey, RGBA,
16-bit, BGR -> RGB handled in :func:`~kerasdet.data.coco.read_image`); either way a bad
file raises an error naming it. Without masks and without ``cache_images`` + ``repeat``
(a host-memory cache) the whole per-element map is graph ops, so it can run on tf.data
service workers; mask rasterization (pycocotools) stays on the host. Shuffling happens on file indices before decoding, or on decoded
images after ``cache()`` when ``cache_images``. Randomness is stateless per element,
seeded from ``tf.data.Dataset.random(seed)``, so a seeded pipeline is reproducible and
still differs between epochs.

``repeat=True`` builds a different, step-addressable stream (what training with
``steps_per_epoch`` and exact resume use): per-data-epoch stateless permutations seeded by
``(seed, epoch)`` and per-position augmentation seeds, so the same seed gives the same
infinite stream in any process, however often it is re-iterated, and ``start_batch``
starts it at any batch without reading the images before it.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import tensorflow as tf

from kerasdet.errors import ConfigError

from .box_format import to_yxyx_source
from .coco import DetectionSource, read_image
from .decoding import DECODERS, needs_opencv, read_image_graph
from .geometry import MIN_VISIBLE_FRACTION, numpy_resized_shapes
from .masks import MASK_MODES, mask_loader
from .preprocess import preprocess_example

logger = logging.getLogger(__name__)

__all__ = ["DetectionSource", "make_dataset", "decode_image", "prepare_example", "MASK_MODES", "DECODERS"]

def _decode_numpy(path, height, width, cache=None):
    path = path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else str(path)
    if cache is not None and path in cache:
        return cache[path]
    image = read_image(path)
    if image.shape[0] != height or image.shape[1] != width:
        raise ValueError(f"{path}: image is {image.shape[:2]} but the annotations say "
                         f"(height, width)=({height}, {width})")
    if cache is not None:
        cache[path] = image
    return image


def decode_image(path, height, width, cache=None, *, decoder="opencv", opencv=None):
    """Graph op: read ``path`` as RGB uint8 ``[h, w, 3]``.

    Raises (at run time) an error whose message names the file when it is missing,
    unreadable, truncated, or not of the expected ``(height, width)``.

    Args:
      decoder: ``"opencv"`` (default here; OpenCV in a ``tf.numpy_function``, the
        decoding of :func:`~kerasdet.data.coco.read_image`) or ``"tf"`` (TensorFlow ops,
        :func:`kerasdet.data.decoding.read_image_graph`: PNG / JPEG, same tensors).
      cache: ``"opencv"`` only: an optional dict (path -> decoded image) kept across
        calls (in-memory image cache that does not depend on the order images are read in).
      opencv: ``"tf"`` only: an optional bool tensor; where True this image goes through
        OpenCV instead (a format TensorFlow does not decode, see
        :func:`kerasdet.data.decoding.needs_opencv`). Default None: never.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder == "tf" and cache is None:
        if opencv is None:
            return read_image_graph(path, height, width)
        return tf.cond(opencv, lambda: decode_image(path, height, width),
                       lambda: read_image_graph(path, height, width))
    fn = _decode_numpy if cache is None else (
        lambda p, h, w: _decode_numpy(p, h, w, cache))
    image = tf.numpy_function(fn, [path, height, width], tf.uint8, stateful=False)
    image.set_shape([None, None, 3])
    return image


def _opencv_flags(source, decoder, cache_images):
    """Per-image "decode with OpenCV" flags for ``decoder="tf"`` (None: no image needs it)."""
    if decoder != "tf" or cache_images:
        return None
    flags = needs_opencv(source.image_paths)
    if flags.any():
        logger.info("make_dataset: %d of %d image(s) are not PNG/JPEG by extension: OpenCV "
                    "decodes those (not serializable to tf.data service workers)",
                    int(flags.sum()), len(flags))
        return flags
    return None


def _validate(source, batch_size, image_size, min_size, max_size, scale_jitter, max_boxes):
    if not isinstance(source, DetectionSource):
        raise TypeError(f"make_dataset needs a DetectionSource, got {type(source).__name__}")
    if len(source) == 0:
        raise ValueError(f"the source from {source.annotation_file} has no images")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if len(image_size) != 2 or min(int(s) for s in image_size) < 1:
        raise ValueError(f"image_size must be (height, width), got {image_size!r}")
    if max_boxes < 1:
        raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
    if scale_jitter is not None and (len(scale_jitter) != 2
                                     or not 0 < scale_jitter[0] <= scale_jitter[1]):
        raise ValueError(f"scale_jitter must be (low, high) with 0 < low <= high, got "
                         f"{scale_jitter!r}")
    if any(h is None or w is None for h, w in zip(source.heights, source.widths)):
        raise ValueError("every image of the source needs a height and width")
    if min_size is not None or max_size is not None:
        new_h, new_w = numpy_resized_shapes(source.heights, source.widths, image_size,
                                            min_size, max_size)
        too_big = np.flatnonzero((new_h > image_size[0]) | (new_w > image_size[1]))
        if len(too_big):
            i = int(too_big[0])
            need = (int(new_h.max()), int(new_w.max()))
            raise ValueError(
                f"canvas image_size={tuple(image_size)} is smaller than the resized image "
                f"({new_h[i]}, {new_w[i]}) of {source.image_paths[i]} with min_size="
                f"{min_size}, max_size={max_size} ({len(too_big)} image(s) affected); use "
                f"an image_size of at least {need}, e.g. a multiple of 128 such as "
                f"{tuple(-(-n // 128) * 128 for n in need)}")
    counts = np.asarray([len(b) for b in source.boxes])
    if counts.size and counts.max() > max_boxes:
        logger.warning("%d image(s) have more than max_boxes=%d objects (max %d); extra "
                       "objects are dropped (crowd ones first)",
                       int((counts > max_boxes).sum()), max_boxes, int(counts.max()))


def _ragged(arrays, dtype, inner_shape=()):
    values = np.concatenate([np.asarray(a, dtype).reshape((-1,) + inner_shape)
                             for a in arrays]) if arrays else np.zeros((0,) + inner_shape, dtype)
    lengths = np.asarray([len(a) for a in arrays], np.int64)
    return tf.RaggedTensor.from_row_lengths(values, lengths)


def make_dataset(
    source: DetectionSource,
    *,
    batch_size: int,
    image_size: Sequence[int],
    min_size: int | None = None,
    max_size: int | None = None,
    training: bool = False,
    shuffle: bool | None = None,
    flip: bool | None = None,
    scale_jitter: Sequence[float] | None = None,
    max_boxes: int = 100,
    drop_remainder: bool | None = None,
    seed: int | None = None,
    num_parallel_calls: int = tf.data.AUTOTUNE,
    cache_images: bool = False,
    repeat: bool = False,
    shuffle_buffer_size: int | None = None,
    min_visible_fraction: float = MIN_VISIBLE_FRACTION,
    start_batch: int = 0,
    ssd_augmentation: bool = False,
    masks: str | None = None,
    bounding_box_format: str = "yxyx",
    input_context: tf.distribute.InputContext | None = None,
    decoder: str = "tf",
    data_service: str | None = None,
    num_batches: int | None = None,
) -> tf.data.Dataset:
    """Batched ``(images, labels)`` dataset for a detection source (see module doc).

    Args:
      source: a loaded :class:`DetectionSource` (``load_coco``, ``load_voc``).
      batch_size: images per batch.
      image_size: ``(H, W)`` output canvas; every image is resized keeping its aspect
        ratio and padded bottom/right with 0.
      min_size, max_size: resize rule (Detectron: short side -> ``min_size``, long side
        capped at ``max_size``); default: fit inside the canvas. The canvas must hold
        every resized image (checked here against the source's sizes: e.g. 800/1333
        needs up to 1333 px on either side, so a 1344x1344 canvas, or 1408x1408 for a
        multiple of 128).
      training: turns on the defaults of ``shuffle``, ``flip``, ``drop_remainder``.
      shuffle: shuffle images (default: ``training``); else the source order.
      flip: random horizontal flip, p = 0.5 (default: ``training``).
      scale_jitter: ``(low, high)`` random factor on the resize scale (training only),
        then a random crop to the canvas; default None (off).
      max_boxes: label rows per image (padding with class -1; more objects are dropped).
      drop_remainder: drop the last partial batch (default: ``training``; needed for
        static batch shapes and under tf.distribute).
      seed: makes shuffling and augmentation deterministic; None: random.
      num_parallel_calls: parallelism of the decode and preprocess maps (order is kept).
      cache_images: keep decoded images in memory after the first pass (small sets).
      repeat: repeat forever (e.g. with ``steps_per_epoch``) as a *step-addressable*
        stream: the shuffle order of data epoch ``e`` is a stateless permutation seeded
        by ``(seed, e)`` and the augmentation of the element at stream position ``p``
        is seeded by ``(seed + 1, p)``, so the stream never depends on how many
        iterators were made before, and ``start_batch`` can start it anywhere (exact
        resume of an interrupted run, :func:`kerasdet.callbacks.fit_resumable`). Batches
        run across data-epoch boundaries (no remainder is dropped). With ``seed=None``
        a random seed is drawn once.
      start_batch: with ``repeat``: the first batch to produce (the batches before it
        are skipped without reading their images). Batch ``k`` of a stream started at
        ``start_batch=j`` is batch ``j + k`` of the stream started at 0.
      shuffle_buffer_size: default: the whole set (ignored with ``repeat``: each data
        epoch is a full permutation).
      min_visible_fraction: a box cut by a jitter crop is kept when at least this
        fraction of its area stays visible.
      ssd_augmentation: SSD's photometric distortion, expand and IoU-constrained crop
        before the resize (training only; :func:`kerasdet.data.preprocess.ssd_augment`). Default False.
      masks: None (default, no masks), ``"union"`` (``labels["foreground"]`` [B, H, W],
        255 = ignore on crowd regions) or ``"instances"`` (``labels["masks"]``
        [B, max_boxes, H, W] aligned with ``labels["boxes"]``); see the module doc for
        the rasterization, the filled-box fallback and the memory cost.
      bounding_box_format: the format of ``source.boxes``, a Keras name: ``"xyxy"``,
        ``"yxyx"``, ``"xywh"``, ``"center_xywh"``, ``"center_yxhw"`` (pixels) or
        ``"rel_xyxy"``, ``"rel_yxyx"``, ``"rel_xywh"``, ``"rel_center_xywh"`` (fractions
        of each image's own height and width; :data:`kerasdet.boxes.BOX_FORMATS`). Default ``"yxyx"`` (original-image pixels,
        what ``load_coco`` / ``load_voc`` give). Converted once here
        (:func:`kerasdet.data.box_format.to_yxyx_source`); the dataset's
        ``labels["boxes"]`` are always yxyx network-input pixels.
      input_context: with ``repeat``: make only this input pipeline's part of the
        stream, for ``strategy.distribute_datasets_from_function`` (multi-worker
        training). ``batch_size`` stays the GLOBAL batch; pipeline ``w`` of ``N`` reads
        positions ``[w * B / N, (w + 1) * B / N)`` of every global batch of ``B`` and
        yields per-replica batches of ``B / num_replicas_in_sync`` (the same images and
        augmentation seeds as the single-process stream, none read twice or skipped).
        Default: :func:`kerasdet.distribute.current_input_context` (set by
        :func:`kerasdet.callbacks.fit_resumable` under a multi-worker strategy), else
        none (the whole stream).
      decoder: ``"tf"`` (default: TensorFlow ops, :mod:`kerasdet.data.decoding`; PNG and
        JPEG, other formats by OpenCV) or ``"opencv"`` (OpenCV in a ``tf.numpy_function``
        for every image, the pipeline before graph decoding). Both give the same tensors.
        ``cache_images`` with ``repeat`` keeps a host-memory cache and decodes with OpenCV
        whatever ``decoder`` says.
      data_service: with ``repeat``: ``"grpc://host:port"`` of a tf.data service
        dispatcher. The per-image work (decode, augmentation, resize, padding) runs on
        its workers in ``distributed_epoch`` mode: the stream positions are split between
        the workers, so each position (each image of each data epoch, with its
        augmentation seed) is processed by exactly one worker; elements come back in
        arrival order and are batched here, so the batch composition depends on worker
        timing (not bit-exact across runs or resumes, unlike the local stream). Needs a
        graph-only pipeline: no ``masks``, no ``cache_images``, PNG/JPEG files, one input
        pipeline. Default None (local).
      num_batches: with ``repeat``: stop after this many batches (default None: infinite).
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    image_size = (int(image_size[0]), int(image_size[1]))
    _validate(source, batch_size, image_size, min_size, max_size, scale_jitter, max_boxes)
    source = to_yxyx_source(source, bounding_box_format=bounding_box_format)
    shuffle = training if shuffle is None else bool(shuffle)
    flip = training if flip is None else bool(flip)
    drop_remainder = training if drop_remainder is None else bool(drop_remainder)
    if not training:
        if scale_jitter is not None or flip:
            logger.info("make_dataset: training=False, so flip/scale_jitter are off")
        scale_jitter, flip, ssd_augmentation = None, False, False
    random_aug = flip or scale_jitter is not None or ssd_augmentation
    n = len(source)
    if masks not in MASK_MODES:
        raise ValueError(f"masks must be one of {MASK_MODES}, got {masks!r}")
    if masks is not None and ssd_augmentation:
        raise ValueError("masks are not supported with ssd_augmentation (its expand/IoU "
                         "crop does not transform masks)")
    if start_batch and not repeat:
        raise ValueError("start_batch needs repeat=True (a step-addressable stream)")
    if int(start_batch) < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")

    if input_context is None:
        from kerasdet.distribute import current_input_context

        input_context = current_input_context() if repeat else None
    if input_context is not None and input_context.num_input_pipelines > 1 and not repeat:
        raise ValueError("make_dataset(input_context=...) shards the step-addressable stream: it "
                         "needs repeat=True")

    if repeat:
        return _stream_dataset(
            source, batch_size=batch_size, image_size=image_size, min_size=min_size,
            max_size=max_size, shuffle=shuffle, flip=flip, scale_jitter=scale_jitter,
            max_boxes=max_boxes, seed=seed, num_parallel_calls=num_parallel_calls,
            cache_images=cache_images, min_visible_fraction=min_visible_fraction,
            start_batch=int(start_batch), ssd_augmentation=ssd_augmentation, masks=masks,
            input_context=input_context, decoder=decoder, data_service=data_service,
            num_batches=num_batches)
    if data_service or num_batches is not None:
        raise ValueError("data_service and num_batches need repeat=True (the training stream)")

    slices = {
        "index": np.arange(n, dtype=np.int64),
        "path": np.asarray([str(p) for p in source.image_paths], dtype=object),
        "image_id": np.asarray(source.image_ids, np.int64),
        "size": np.stack([np.asarray(source.heights, np.int32),
                          np.asarray(source.widths, np.int32)], axis=1),
        "boxes": _ragged(source.boxes, np.float32, (4,)),
        "classes": _ragged(source.classes, np.int32),
        "is_crowd": _ragged(source.is_crowd, bool),
    }
    opencv = _opencv_flags(source, decoder, cache_images=False)
    if opencv is not None:
        slices["opencv"] = opencv
    ds = tf.data.Dataset.from_tensor_slices(slices)
    load_masks = mask_loader(source, masks)[0] if masks else None

    def load(example):
        example = dict(example)
        example["image"] = decode_image(example.pop("path"), example["size"][0],
                                        example["size"][1], decoder=decoder,
                                        opencv=example.pop("opencv", None))
        if load_masks is not None:
            example["masks"] = load_masks(example["index"])
        return example

    buffer = n if shuffle_buffer_size is None else int(shuffle_buffer_size)
    if cache_images:
        ds = ds.map(load, num_parallel_calls=num_parallel_calls).cache()
        if shuffle:
            ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    else:
        if shuffle:
            ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
        ds = ds.map(load, num_parallel_calls=num_parallel_calls)
    if repeat:
        ds = ds.repeat()
    if random_aug:
        aug_seed = None if seed is None else int(seed) + 1
        ds = tf.data.Dataset.zip(
            ds, tf.data.Dataset.random(seed=aug_seed, rerandomize_each_iteration=True))
    else:
        ds = ds.map(lambda ex: (ex, tf.constant(0, tf.int64)))

    def prepare(example, rand):
        element_seed = tf.stack([rand, tf.constant(0x5EED, tf.int64)]) if random_aug else None
        return prepare_example(
            example, element_seed, image_size=image_size, min_size=min_size, max_size=max_size, flip=flip,
            scale_jitter=scale_jitter, max_boxes=max_boxes, min_visible_fraction=min_visible_fraction,
            ssd_augmentation=ssd_augmentation, masks=masks)

    ds = ds.map(prepare, num_parallel_calls=num_parallel_calls)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)


def prepare_example(example, seed, *, image_size, masks=None, **preprocess_args):
    """``(image, labels)`` of one decoded example: :func:`preprocess_example` plus the label
    dict every model reads (``image_id``, ``image_scale``, ``original_size`` ride along;
    ``foreground`` / ``masks`` with ``masks="union"`` / ``"instances"``)."""
    if masks:
        image, boxes, classes, is_crowd, scale, mask_out = preprocess_example(
            example["image"], example["boxes"], example["classes"], example["is_crowd"],
            image_size=image_size, seed=seed, masks=example["masks"],
            mask_rows=masks == "instances", **preprocess_args)
    else:
        image, boxes, classes, is_crowd, scale = preprocess_example(
            example["image"], example["boxes"], example["classes"], example["is_crowd"],
            image_size=image_size, seed=seed, **preprocess_args)
    image.set_shape([image_size[0], image_size[1], 3])
    labels = {
        "boxes": boxes,
        "classes": classes,
        "is_crowd": is_crowd,
        "image_id": example["image_id"],
        "image_scale": tf.cast(scale, tf.float32),
        "original_size": example["size"],
    }
    if masks == "union":
        labels["foreground"] = mask_out[..., 0]  # [H, W], static
    elif masks == "instances":
        labels["masks"] = mask_out
    return image, labels


def _stream_dataset(source, *, batch_size, image_size, min_size, max_size, shuffle, flip,
                    scale_jitter, max_boxes, seed, num_parallel_calls, cache_images,
                    min_visible_fraction, start_batch, ssd_augmentation=False, masks=None,
                    input_context=None, decoder="tf", data_service=None, num_batches=None):
    """The ``repeat=True`` stream of :func:`make_dataset`: stateless and skippable.

    Element ``p`` of the infinite stream is image ``perm_e[p - e * n]`` of data epoch
    ``e = p // n`` (``perm_e``: stateless permutation seeded by ``(seed, e)``), augmented
    with the stateless seed ``(seed + 1, p)``. Skipping to ``start_batch`` only skips
    integers: no image before it is read. With an ``input_context`` of ``N > 1`` pipelines
    the positions outside this pipeline's slice of each global batch are dropped before
    any image is read (integers again), so the N pipelines together read every position
    exactly once.
    """
    n = len(source)
    if seed is None:
        seed = int(np.random.randint(0, 2**31 - 1))
    seed = int(seed)
    random_aug = flip or scale_jitter is not None or ssd_augmentation
    start = int(start_batch) * int(batch_size)
    first_epoch = start // n

    paths = tf.constant([str(p) for p in source.image_paths], tf.string)
    image_ids = tf.constant(np.asarray(source.image_ids, np.int64))
    sizes = tf.constant(np.stack([np.asarray(source.heights, np.int32),
                                  np.asarray(source.widths, np.int32)], axis=1))
    boxes = _ragged(source.boxes, np.float32, (4,))
    classes = _ragged(source.classes, np.int32)
    is_crowd = _ragged(source.is_crowd, bool)
    opencv = _opencv_flags(source, decoder, cache_images)
    if data_service:
        problems = [what for what, bad in (
            ("masks (rasterized on the host)", masks), ("cache_images (a host cache)", cache_images),
            ("decoder='opencv'", decoder == "opencv"), ("images that are not PNG/JPEG", opencv is not None),
            ("several input pipelines", input_context is not None and input_context.num_input_pipelines > 1))
            if bad]
        if problems:
            raise ConfigError("input.data_service needs a pipeline of graph ops only (tf.data service "
                              f"workers cannot run Python): not with {', '.join(problems)}")
    opencv = None if opencv is None else tf.constant(opencv)

    def epoch_order(epoch):
        order = tf.range(n, dtype=tf.int64)
        if shuffle:
            order = tf.random.experimental.stateless_shuffle(
                order, seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
        return tf.data.Dataset.from_tensor_slices(order)

    order = (tf.data.Dataset.counter(first_epoch, dtype=tf.int64)
             .flat_map(epoch_order).skip(start - first_epoch * n))
    positions = tf.data.Dataset.counter(start, dtype=tf.int64)
    stop = None if num_batches is None else start + int(num_batches) * int(batch_size)
    cache = {} if cache_images else None
    load_masks = (mask_loader(source, masks, {} if cache_images else None)[0]
                  if masks else None)

    def load(position, index):
        size = tf.gather(sizes, index)
        example = {
            "image": decode_image(tf.gather(paths, index), size[0], size[1], cache=cache,
                                  decoder="opencv" if cache is not None else decoder,
                                  opencv=None if opencv is None else tf.gather(opencv, index)),
            "image_id": tf.gather(image_ids, index),
            "size": size,
            "boxes": boxes[index],
            "classes": classes[index],
            "is_crowd": is_crowd[index],
        }
        if load_masks is not None:
            example["masks"] = load_masks(index)
        return example, position

    if data_service:  # a splittable source: the index of each position computed from it
        def position_and_index(position):
            epoch = position // n
            order = tf.range(n, dtype=tf.int64)
            if shuffle:
                order = tf.random.experimental.stateless_shuffle(
                    order, seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
            return position, order[position - epoch * n]

        ds = (tf.data.Dataset.range(start, stop) if stop is not None else positions).map(position_and_index)
    else:
        ds = tf.data.Dataset.zip(positions, order)
    out_batch = int(batch_size)
    if input_context is not None and input_context.num_input_pipelines > 1:
        from kerasdet.distribute import shard_of_batch

        first, size, out_batch = shard_of_batch(batch_size, input_context)
        global_batch = int(batch_size)
        ds = ds.filter(lambda p, i: (p % global_batch) // size == first // size)
        logger.info("make_dataset: input pipeline %d of %d reads positions [%d, %d) of each global "
                    "batch of %d (per-replica batch %d)", input_context.input_pipeline_id,
                    input_context.num_input_pipelines, first, first + size, global_batch, out_batch)
    ds = ds.map(load, num_parallel_calls=num_parallel_calls)
    aug_seed = seed + 1

    def prepare(example, position):
        element_seed = (tf.stack([tf.constant(aug_seed, tf.int64), position])
                        if random_aug else None)
        return prepare_example(
            example, element_seed, image_size=image_size, min_size=min_size, max_size=max_size, flip=flip,
            scale_jitter=scale_jitter, max_boxes=max_boxes, min_visible_fraction=min_visible_fraction,
            ssd_augmentation=ssd_augmentation, masks=masks)

    ds = ds.map(prepare, num_parallel_calls=num_parallel_calls)
    if data_service:
        ds = ds.apply(tf.data.experimental.service.distribute(
            processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC, service=data_service))
        logger.info("make_dataset: preprocessing on the tf.data service at %s (distributed_epoch)",
                    data_service)
    ds = ds.batch(out_batch, drop_remainder=True)
    if num_batches is not None and not data_service:
        ds = ds.take(int(num_batches))
    if input_context is not None:
        options = tf.data.Options()  # already sharded: tf.distribute must not shard it again
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        ds = ds.with_options(options)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    ds._kerasdet_input_context = input_context  # what fit_resumable checks
    return ds
