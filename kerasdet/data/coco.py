"""COCO JSON loading into a :class:`DetectionSource`, and robust image reading.

Nothing here imports TensorFlow: a :class:`DetectionSource` is plain numpy, and
:func:`kerasdet.data.pipeline.make_dataset` turns one into a ``tf.data.Dataset``.

Choices made here (documented for the README):

* Boxes become ``[ymin, xmin, ymax, xmax]`` float32 in absolute pixels of the *original*
  image (pixel-edge convention: COCO ``[x, y, w, h]`` -> ``[y, x, y + h, x + w]``).
* Categories are mapped to contiguous 0-based indices in ascending dataset-id order (or
  in the order of ``category_ids`` when given); ``source.category_ids[k]`` maps back.
* Per-annotation faults are skipped, counted in ``source.skipped`` and reported once with
  ``logging.warning``; structural faults of the file raise ``DataError`` naming the file
  and the field. Every error about the user's data is a :class:`kerasdet.errors.DataError`
  (a ``ValueError``); a missing file is a :class:`kerasdet.errors.DataFileNotFoundError`
  (also a ``FileNotFoundError``), so the command line reports either as one line.
* ``iscrowd=1`` annotations are kept with ``is_crowd=True`` (models ignore them in
  matching; they are not training targets). Images without annotations are negatives.
* Images are read with OpenCV ``IMREAD_UNCHANGED`` (EXIF orientation is *not* applied,
  matching the pixel grid the annotations were drawn on): grey and RGBA become RGB,
  16-bit is scaled to 8-bit; truncated PNG/JPEG files are detected by their end marker.
"""
from __future__ import annotations

import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np

from kerasdet.errors import ConfigError, DataError, DataFileNotFoundError

logger = logging.getLogger(__name__)

#: ``skipped`` reasons that are faults of the annotation file (reported with a warning).
FAULT_REASONS = (
    "missing_bbox", "bad_bbox", "non_finite_bbox", "degenerate_bbox", "box_outside_image",
    "unknown_category", "unknown_image", "unknown_class",
)


# --------------------------------------------------------------------------------------
# DetectionSource
# --------------------------------------------------------------------------------------
@dataclass
class DetectionSource:
    """A detection data set in memory: per-image paths, sizes and ground truth.

    Per-image lists are aligned; per-image arrays are aligned with each other.

    Attributes:
      image_paths: image file per image.
      image_ids: dataset image id per image (COCO ``id``; VOC: index in the split).
      heights, widths: original image size in pixels.
      boxes: ``[n, 4]`` float32 ``[ymin, xmin, ymax, xmax]`` in original-image pixels.
      classes: ``[n]`` int32 contiguous 0-based class indices.
      is_crowd: ``[n]`` bool; crowd (COCO) / difficult (VOC) objects to be ignored.
      annotation_ids: ``[n]`` int64 annotation ids (COCO ``id``; VOC running number).
      masks: per image, the list of raw COCO ``segmentation`` entries (polygons or RLE;
        ``None`` where missing) aligned with ``boxes``; ``None`` for box-only sources.
      category_ids: contiguous index -> dataset category id.
      category_names: contiguous index -> category name.
      annotation_file: the file the source came from (COCO JSON or VOC split file).
      skipped: counts of skipped annotations/images per reason.
    """

    image_paths: list
    image_ids: list
    heights: list
    widths: list
    boxes: list
    classes: list
    is_crowd: list
    annotation_ids: list
    category_ids: list
    category_names: list
    annotation_file: str | None = None
    masks: list | None = None
    skipped: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_paths)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @property
    def num_boxes(self) -> int:
        return int(sum(len(b) for b in self.boxes))

    @property
    def category_id_to_index(self) -> dict:
        """Dataset category id -> contiguous index."""
        return {cid: i for i, cid in enumerate(self.category_ids)}

    def to_category_ids(self, classes) -> np.ndarray:
        """Contiguous class indices (any shape; negative = padding) -> dataset category
        ids (int64; padding stays -1)."""
        classes = np.asarray(classes)
        table = np.asarray(self.category_ids, np.int64)
        out = np.full(classes.shape, -1, np.int64)
        valid = (classes >= 0) & (classes < len(table))
        out[valid] = table[classes[valid].astype(np.int64)]
        return out

    def to_class_indices(self, category_ids) -> np.ndarray:
        """Dataset category ids (any shape) -> contiguous indices (int32; unknown -> -1)."""
        lookup = self.category_id_to_index
        ids = np.asarray(category_ids)
        return np.vectorize(lambda c: lookup.get(int(c), -1), otypes=[np.int32])(ids) \
            if ids.size else ids.astype(np.int32)

    def subset(self, indices: Sequence[int]) -> "DetectionSource":
        """A new source with the images at ``indices`` (same categories)."""
        idx = [int(i) for i in indices]
        pick = lambda seq: None if seq is None else [seq[i] for i in idx]  # noqa: E731
        return DetectionSource(
            image_paths=pick(self.image_paths), image_ids=pick(self.image_ids),
            heights=pick(self.heights), widths=pick(self.widths), boxes=pick(self.boxes),
            classes=pick(self.classes), is_crowd=pick(self.is_crowd),
            annotation_ids=pick(self.annotation_ids), category_ids=list(self.category_ids),
            category_names=list(self.category_names), annotation_file=self.annotation_file,
            masks=pick(self.masks), skipped=dict(self.skipped))


# --------------------------------------------------------------------------------------
# Image reading
# --------------------------------------------------------------------------------------
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _truncation_problem(data: bytes) -> str | None:
    """Why ``data`` looks truncated (PNG without IEND, JPEG without EOI), else None.

    OpenCV returns a partial image (with only a stderr warning) for a truncated JPEG, so
    decoding alone does not detect it.
    """
    if data.startswith(_PNG_SIGNATURE):
        if b"IEND" not in data[-64:]:
            return "truncated PNG (no IEND chunk at the end)"
    elif data.startswith(b"\xff\xd8"):
        if b"\xff\xd9" not in data[-1024:]:
            return "truncated JPEG (no end-of-image marker)"
    return None


def to_rgb_uint8(image: np.ndarray, path: str = "<array>") -> np.ndarray:
    """An OpenCV-decoded array (grey, BGR, BGRA; uint8/uint16/float) -> RGB uint8 [h, w, 3].

    16-bit images are scaled by 1/257 (65535 -> 255); float images are taken as 0..1
    when their maximum is <= 1 and 0..255 otherwise; alpha is dropped.
    """
    if image.dtype == np.uint16:
        image = ((image.astype(np.float32) + 128.0) / 257.0).astype(np.uint8)
    elif image.dtype in (np.float32, np.float64):
        scale = 255.0 if (image.size and np.nanmax(image) <= 1.0) else 1.0
        image = np.clip(np.nan_to_num(image) * scale + 0.5, 0, 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise DataError(f"{path}: unsupported image dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise DataError(f"{path}: unsupported image shape {image.shape}")
    channels = image.shape[-1]
    if channels == 1:
        return np.ascontiguousarray(np.repeat(image, 3, axis=-1))
    if channels == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise DataError(f"{path}: unsupported number of channels {channels}")


def read_image(path: str) -> np.ndarray:
    """Read an image file as RGB uint8 ``[h, w, 3]``.

    Raises :class:`~kerasdet.errors.DataFileNotFoundError` for a missing file and
    :class:`~kerasdet.errors.DataError` naming the file for an unreadable, truncated or
    unsupported one.
    """
    path = os.fsdecode(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataFileNotFoundError(f"image file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not an image file") from None
    problem = _truncation_problem(data)
    if problem:
        raise DataError(f"{path}: {problem}")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) \
        if data else None
    if image is None:
        raise DataError(f"{path}: OpenCV could not decode the image (corrupt or "
                         "unsupported format)")
    return to_rgb_uint8(image, path)


def check_image_files(paths: Sequence[str], expected_hw: Sequence | None = None, *,
                      ids: Sequence | None = None, decode: bool = True,
                      num_threads: int = 8) -> list:
    """Check that every image exists (and, with ``decode``, decodes completely).

    Returns the decoded ``(height, width)`` per image (``None`` without ``decode``).
    Raises :class:`~kerasdet.errors.DataFileNotFoundError` / :class:`~kerasdet.errors.DataError`
    naming the first bad file and its image id. When ``expected_hw[i]`` is not None, a
    different decoded size is a ``DataError`` (the annotations would not match the pixels).
    """
    def describe(i):
        return f"{paths[i]}" + (f" (image id {ids[i]})" if ids is not None else "")

    for i, p in enumerate(paths):
        if not os.path.isfile(p):
            raise DataFileNotFoundError(f"image file not found: {describe(i)}")
    if not decode:
        return [None] * len(paths)

    def size_of(i):
        try:
            return read_image(paths[i]).shape[:2]
        except DataFileNotFoundError:
            raise
        except DataError as e:
            raise DataError(f"{e} (image id {ids[i]})" if ids is not None else str(e)) from None

    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        sizes = list(pool.map(size_of, range(len(paths))))
    if expected_hw is not None:
        for i, (hw, exp) in enumerate(zip(sizes, expected_hw)):
            if exp is not None and tuple(exp) != tuple(hw):
                raise DataError(f"{describe(i)}: annotated size (height, width)="
                                 f"{tuple(exp)} but the image is {tuple(hw)}")
    return sizes


# --------------------------------------------------------------------------------------
# Annotation helpers shared with voc.py
# --------------------------------------------------------------------------------------
def clip_box_yxyx(y0, x0, y1, x1, height, width):
    """Validate one yxyx box against an image; returns ``(box or None, fault or None)``.

    Faults: ``non_finite_bbox``, ``degenerate_bbox`` (zero/negative height or width),
    ``box_outside_image`` (nothing left after clipping). A box partly outside is clipped.
    """
    if not all(math.isfinite(v) for v in (y0, x0, y1, x1)):
        return None, "non_finite_bbox"
    if y1 <= y0 or x1 <= x0:
        return None, "degenerate_bbox"
    cy0, cx0 = max(y0, 0.0), max(x0, 0.0)
    cy1, cx1 = min(y1, float(height)), min(x1, float(width))
    if cy1 <= cy0 or cx1 <= cx0:
        return None, "box_outside_image"
    return (cy0, cx0, cy1, cx1), None


def report_skipped(skipped: dict, what: str) -> None:
    """One ``logging.warning`` with the fault counts in ``skipped`` (if any)."""
    faults = {k: v for k, v in skipped.items() if k in FAULT_REASONS and v}
    if faults:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(faults.items()))
        logger.warning("%s: skipped %d annotation(s): %s", what, sum(faults.values()), detail)


def as_arrays(per_image: list) -> tuple:
    """Per-image lists of ``(box_yxyx, class_index, is_crowd, annotation_id)`` -> the
    aligned per-image arrays ``(boxes [n, 4] float32, classes [n] int32, is_crowd [n]
    bool, annotation_ids [n] int64)`` a :class:`DetectionSource` holds."""
    boxes, classes, crowd, ann_ids = [], [], [], []
    for objs in per_image:
        boxes.append(np.asarray([o[0] for o in objs], np.float32).reshape(-1, 4))
        classes.append(np.asarray([o[1] for o in objs], np.int32).reshape(-1))
        crowd.append(np.asarray([o[2] for o in objs], bool).reshape(-1))
        ann_ids.append(np.asarray([o[3] for o in objs], np.int64).reshape(-1))
    return boxes, classes, crowd, ann_ids


# --------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_json(annotation_file: str) -> dict:
    if not os.path.isfile(annotation_file):
        raise DataFileNotFoundError(f"{annotation_file}: annotation file does not exist")
    try:
        with open(annotation_file, "rb") as f:
            data = json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{annotation_file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{annotation_file}: not a COCO file (top level is "
                         f"{type(data).__name__}, expected an object with 'images', "
                         "'annotations', 'categories')")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(f"{annotation_file}: not a COCO file: missing field '{key}'")
        if not isinstance(data[key], list):
            raise DataError(f"{annotation_file}: field '{key}' must be a list, got "
                             f"{type(data[key]).__name__}")
    return data


def _parse_categories(data: dict, annotation_file: str, category_ids) -> tuple:
    cats = {}
    for k, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise DataError(f"{annotation_file}: categories[{k}] needs an integer 'id'")
        if cat["id"] in cats:
            raise DataError(f"{annotation_file}: duplicate category id {cat['id']} in "
                             "'categories'")
        cats[cat["id"]] = str(cat.get("name", cat["id"]))
    if category_ids is None:
        ids = sorted(cats)
    else:
        ids = [int(c) for c in category_ids]
        missing = [c for c in ids if c not in cats]
        if missing:
            raise DataError(f"{annotation_file}: category_ids {missing} are not in "
                             "'categories'")
        if len(set(ids)) != len(ids):
            raise ConfigError(f"category_ids has duplicates: {ids}")
    return ids, [cats[c] for c in ids], set(cats)


def load_coco(
    annotation_file: str,
    image_dir: str | None,
    *,
    category_ids: Sequence[int] | None = None,
    skip_images_without_annotations: bool = False,
    check_images: bool | str = True,
) -> DetectionSource:
    """Load a COCO-format detection set.

    Args:
      annotation_file: COCO JSON with ``images``, ``annotations``, ``categories``.
      image_dir: folder the ``file_name`` entries are relative to (None: the folder of
        the annotation file).
      category_ids: dataset category ids to keep, in the order that defines the
        contiguous indices; default all categories sorted by id. Annotations of other
        categories are dropped (counted as ``other_category``, not a fault).
      skip_images_without_annotations: drop images without any kept non-crowd
        annotation (counted as ``image_without_annotations``); default keeps them as
        negatives.
      check_images: ``True`` (default) checks every file exists and decodes completely
        (parallel threads; a few ms per image), ``"exists"`` only checks existence,
        ``False`` checks nothing (errors then surface when the pipeline reads the file).

    Raises:
      kerasdet.errors.DataFileNotFoundError: the annotation file or an image file is
        missing (names the file, and the image id). Also a ``FileNotFoundError``.
      kerasdet.errors.DataError: the annotation file is not JSON or not COCO (a missing
        or mistyped field, a duplicate id is named); an image is unreadable/truncated or
        its size differs from the annotated one. Also a ``ValueError``.
      kerasdet.errors.ConfigError: ``category_ids`` has duplicates.
    """
    annotation_file = os.fspath(annotation_file)
    data = _read_json(annotation_file)
    if image_dir is None:
        image_dir = os.path.dirname(os.path.abspath(annotation_file))
    ids, names, all_cat_ids = _parse_categories(data, annotation_file, category_ids)
    cat_index = {c: i for i, c in enumerate(ids)}

    # Images.
    image_ids, paths, heights, widths, pos = [], [], [], [], {}
    for k, img in enumerate(data["images"]):
        where = f"{annotation_file}: images[{k}]"
        if not isinstance(img, dict):
            raise DataError(f"{where} must be an object")
        if not _is_int(img.get("id")):
            raise DataError(f"{where}: field 'id' must be an integer, got {img.get('id')!r}")
        if img["id"] in pos:
            raise DataError(f"{where}: duplicate image id {img['id']}")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise DataError(f"{where} (id {img['id']}): field 'file_name' missing or not "
                             "a string")
        for key in ("height", "width"):
            v = img.get(key)
            if v is not None and (not _is_number(v) or v <= 0 or v != int(v)):
                raise DataError(f"{where} (id {img['id']}): field '{key}' must be a "
                                 f"positive integer, got {v!r}")
        pos[img["id"]] = len(image_ids)
        image_ids.append(img["id"])
        paths.append(os.path.join(image_dir, img["file_name"]))
        heights.append(None if img.get("height") is None else int(img["height"]))
        widths.append(None if img.get("width") is None else int(img["width"]))

    # Sizes: the JSON's, checked against (or, where absent, taken from) the files.
    if check_images:
        sizes = check_image_files(
            paths, [None if h is None or w is None else (h, w) for h, w in zip(heights, widths)],
            ids=image_ids, decode=check_images != "exists")
        if check_images != "exists":
            heights = [int(s[0]) for s in sizes]
            widths = [int(s[1]) for s in sizes]
    for i, (h, w) in enumerate(zip(heights, widths)):
        if h is None or w is None:
            raise DataError(f"{annotation_file}: image id {image_ids[i]} has no "
                             "'height'/'width' field (pass check_images=True to read the "
                             "size from the file)")

    # Annotations.
    skipped: dict = {}

    def skip(reason):
        skipped[reason] = skipped.get(reason, 0) + 1

    per_image = [[] for _ in image_ids]
    segms = [[] for _ in image_ids]
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DataError(f"{annotation_file}: annotations[{k}] must be an object")
        img_i = pos.get(ann.get("image_id")) if _is_int(ann.get("image_id")) else None
        if img_i is None:
            skip("unknown_image")
            continue
        cid = ann.get("category_id")
        if not _is_int(cid) or cid not in all_cat_ids:
            skip("unknown_category")
            continue
        if cid not in cat_index:
            skip("other_category")
            continue
        bbox = ann.get("bbox")
        if bbox is None:
            skip("missing_bbox")
            continue
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or \
                not all(_is_number(v) or v is None for v in bbox):
            skip("bad_bbox")
            continue
        x, y, w, h = (float("nan") if v is None else float(v) for v in bbox)
        box, fault = clip_box_yxyx(y, x, y + h, x + w, heights[img_i], widths[img_i])
        if fault:
            skip(fault)
            continue
        crowd = bool(ann.get("iscrowd", 0))
        ann_id = ann.get("id", -1) if _is_int(ann.get("id", -1)) else -1
        per_image[img_i].append((box, cat_index[cid], crowd, ann_id))
        segms[img_i].append(ann.get("segmentation"))

    keep = list(range(len(image_ids)))
    if skip_images_without_annotations:
        keep = [i for i in keep if any(not o[2] for o in per_image[i])]
        dropped = len(image_ids) - len(keep)
        if dropped:
            skipped["image_without_annotations"] = dropped
    report_skipped(skipped, annotation_file)
    boxes, classes, crowd, ann_ids = as_arrays([per_image[i] for i in keep])
    return DetectionSource(
        image_paths=[paths[i] for i in keep], image_ids=[image_ids[i] for i in keep],
        heights=[heights[i] for i in keep], widths=[widths[i] for i in keep],
        boxes=boxes, classes=classes, is_crowd=crowd, annotation_ids=ann_ids,
        category_ids=ids, category_names=names, annotation_file=annotation_file,
        masks=[segms[i] for i in keep], skipped=skipped)
