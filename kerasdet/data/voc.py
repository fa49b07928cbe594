"""Pascal VOC (XML) loading into a :class:`~kerasdet.data.coco.DetectionSource`.

Layout read (the VOCdevkit year folder, e.g. ``VOCdevkit/VOC2007``)::

    root/ImageSets/Main/{split}.txt     one image id (file stem) per line
    root/Annotations/{id}.xml
    root/JPEGImages/{id}.jpg

:func:`load_voc` reads one year folder's split; :func:`load_voc_sets` joins several
(``VOCdevkit`` + ``["2007/trainval", "2012/trainval"]``: the "07+12" training set).

Choices made here (documented for the README):

* **Coordinates.** VOC boxes are 1-based *inclusive* pixel indices. They become 0-based
  pixel-edge boxes: ``[ymin - 1, xmin - 1, ymax, xmax]`` (``xmin - 1`` is the left edge
  of the first pixel, ``xmax`` the right edge of the last one), so a box covering pixels
  1..10 is 10 px wide.
* **Difficult objects** become ``is_crowd=True`` (ignored in matching and evaluation, as
  in the VOC protocol) unless ``use_difficult=True``, which makes them normal objects.
* **Ids.** Image ids are the index of the image in the split file (in the joined list
  for :func:`load_voc_sets`); annotation ids run from 1; category ids are ``index + 1``
  (1-based, as in the usual VOC label maps; 0 is background elsewhere).
* Unknown class names are skipped and counted (``unknown_class``); malformed XML (not
  parseable, missing/non-numeric ``bndbox`` or ``size`` fields) is a
  :class:`~kerasdet.errors.DataError` naming the file and the field; a missing file or
  folder is a :class:`~kerasdet.errors.DataFileNotFoundError` naming the path.
"""
from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from typing import Sequence

from kerasdet.errors import ConfigError, DataError, DataFileNotFoundError

from .coco import DetectionSource, as_arrays, check_image_files, clip_box_yxyx, report_skipped

logger = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


def _number(node, tag: str, xml_path: str, where: str) -> float:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DataError(f"{xml_path}: missing field '{where}/{tag}'")
    try:
        return float(child.text.strip())
    except ValueError:
        raise DataError(f"{xml_path}: field '{where}/{tag}' is not a number: "
                         f"{child.text.strip()!r}") from None


def parse_voc_xml(xml_path: str) -> dict:
    """One VOC annotation file -> ``{"height", "width", "objects": [(name, difficult,
    (xmin, ymin, xmax, ymax)) ...]}`` with the raw 1-based coordinates.

    ``height``/``width`` are None when ``<size>`` is absent.
    """
    try:
        root = ET.parse(xml_path).getroot()
    except FileNotFoundError:
        raise DataFileNotFoundError(f"annotation file not found: {xml_path}") from None
    except ET.ParseError as e:
        raise DataError(f"{xml_path}: not valid XML ({e})") from None
    if root.tag != "annotation":
        raise DataError(f"{xml_path}: root element is <{root.tag}>, expected <annotation>")
    size = root.find("size")
    height = width = None
    if size is not None:
        height = _number(size, "height", xml_path, "size")
        width = _number(size, "width", xml_path, "size")
        if height <= 0 or width <= 0 or height != int(height) or width != int(width):
            raise DataError(f"{xml_path}: field 'size' must hold positive integers, got "
                             f"height={height}, width={width}")
        height, width = int(height), int(width)
    objects = []
    for k, obj in enumerate(root.findall("object")):
        where = f"object[{k}]"
        name_node = obj.find("name")
        if name_node is None or not (name_node.text or "").strip():
            raise DataError(f"{xml_path}: missing field '{where}/name'")
        difficult_node = obj.find("difficult")
        difficult = False
        if difficult_node is not None and (difficult_node.text or "").strip():
            try:
                difficult = bool(int(float(difficult_node.text.strip())))
            except ValueError:
                raise DataError(f"{xml_path}: field '{where}/difficult' is not 0/1: "
                                 f"{difficult_node.text.strip()!r}") from None
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DataError(f"{xml_path}: missing field '{where}/bndbox'")
        coords = tuple(_number(bndbox, t, xml_path, f"{where}/bndbox")
                       for t in ("xmin", "ymin", "xmax", "ymax"))
        objects.append((name_node.text.strip(), difficult, coords))
    return {"height": height, "width": width, "objects": objects}


def _check_folder(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DataFileNotFoundError(f"{path}: {what} folder does not exist")


def _read_split(root: str, split: str) -> tuple:
    """One year folder's split -> ``(split_file, stems, image paths, heights, widths, raw
    objects)`` (sizes from the XML, None where ``<size>`` is absent)."""
    split_file = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(split_file):
        raise DataFileNotFoundError(
            f"{split_file}: split file does not exist (split={split!r})")
    with open(split_file) as f:
        stems = [line.split()[0] for line in f if line.strip()]
    if stems:
        _check_folder(os.path.join(root, "Annotations"), "VOC 'Annotations'")
        _check_folder(os.path.join(root, "JPEGImages"), "VOC 'JPEGImages'")
    paths, heights, widths, raw = [], [], [], []
    for stem in stems:
        parsed = parse_voc_xml(os.path.join(root, "Annotations", f"{stem}.xml"))
        paths.append(os.path.join(root, "JPEGImages", f"{stem}.jpg"))
        heights.append(parsed["height"])
        widths.append(parsed["width"])
        raw.append(parsed["objects"])
    return split_file, stems, paths, heights, widths, raw


def _build_source(parts: list, *, class_names, use_difficult, check_images,
                  skipped: dict | None = None) -> DetectionSource:
    """Joins ``_read_split`` results into one source: image ids ``0..N-1`` in order,
    annotation ids ``1..M`` (pycocotools treats an annotation id 0 as "unmatched")."""
    class_index = {name: i for i, name in enumerate(class_names)}
    if len(class_index) != len(class_names):
        raise ConfigError(f"class_names has duplicates: {list(class_names)}")
    skipped = dict(skipped or {})
    xml_paths, paths, heights, widths, raw = [], [], [], [], []
    for split_file, stems, p, h, w, r in parts:
        root = os.path.dirname(os.path.dirname(os.path.dirname(split_file)))
        xml_paths.extend(os.path.join(root, "Annotations", f"{stem}.xml") for stem in stems)
        paths.extend(p)
        heights.extend(h)
        widths.extend(w)
        raw.extend(r)
    image_ids = list(range(len(paths)))
    if check_images:
        sizes = check_image_files(
            paths, [None if h is None else (h, w) for h, w in zip(heights, widths)],
            ids=image_ids, decode=check_images != "exists")
        if check_images != "exists":
            heights = [int(s[0]) for s in sizes]
            widths = [int(s[1]) for s in sizes]
    for i, h in enumerate(heights):
        if h is None:
            raise DataError(f"{xml_paths[i]}: missing field 'size' (pass check_images=True "
                            "to read the size from the image)")

    per_image = []
    ann_id = 1
    for i, objects in enumerate(raw):
        objs = []
        for name, difficult, (xmin, ymin, xmax, ymax) in objects:
            if name not in class_index:
                skipped["unknown_class"] = skipped.get("unknown_class", 0) + 1
                continue
            box, fault = clip_box_yxyx(ymin - 1.0, xmin - 1.0, ymax, xmax,
                                       heights[i], widths[i])
            if fault:
                skipped[fault] = skipped.get(fault, 0) + 1
                continue
            objs.append((box, class_index[name], difficult and not use_difficult, ann_id))
            ann_id += 1
        per_image.append(objs)
    what = " + ".join(part[0] for part in parts)
    report_skipped(skipped, what)
    boxes, classes, crowd, ann_ids = as_arrays(per_image)
    return DetectionSource(
        image_paths=paths, image_ids=image_ids, heights=heights, widths=widths,
        boxes=boxes, classes=classes, is_crowd=crowd, annotation_ids=ann_ids,
        category_ids=[i + 1 for i in range(len(class_names))],
        category_names=list(class_names), annotation_file=what, masks=None,
        skipped=skipped)


def load_voc(
    root: str,
    *,
    split: str = "trainval",
    class_names: Sequence[str] = VOC_CLASSES,
    use_difficult: bool = False,
    check_images: bool | str = True,
) -> DetectionSource:
    """Load one Pascal VOC year folder's split (see :func:`load_voc_sets` to join several).

    Args:
      root: the VOC year folder holding ``ImageSets``, ``Annotations``, ``JPEGImages``.
      split: name of ``ImageSets/Main/{split}.txt``.
      class_names: contiguous index -> class name; objects of other names are skipped
        (counted as ``unknown_class``).
      use_difficult: treat ``difficult`` objects as normal objects (default: ignored,
        ``is_crowd=True``).
      check_images: as in :func:`~kerasdet.data.coco.load_coco` (``True``: files must
        exist and decode completely with the annotated size; ``"exists"``; ``False``).

    Returns:
      A :class:`DetectionSource`: image ids ``0..N-1`` (order of the split file),
      annotation ids ``1..M``, category ids ``1..len(class_names)``, ``annotation_file``
      the split file.

    Raises:
      kerasdet.errors.DataFileNotFoundError: the split file, the ``Annotations`` /
        ``JPEGImages`` folder, an XML file or an image is missing (named).
      kerasdet.errors.DataError: malformed XML (file and field named), an unreadable
        image or one whose size differs from the XML's ``<size>``.
    """
    part = _read_split(os.fspath(root), split)
    return _build_source([part], class_names=class_names, use_difficult=use_difficult,
                         check_images=check_images)


def parse_voc_set(spec) -> tuple:
    """``"2007/trainval"`` (or ``"VOC2007/trainval"``, or ``("2007", "trainval")``) ->
    ``("VOC2007", "trainval")``: the year folder name and the split name."""
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        year, split = (str(v) for v in spec)
    elif isinstance(spec, str) and spec.count("/") == 1:
        year, split = spec.strip().split("/")
    else:
        raise ConfigError(f"VOC set {spec!r} must be 'YEAR/SPLIT', e.g. '2007/trainval'")
    year, split = year.strip(), split.strip()
    if not year or not split:
        raise ConfigError(f"VOC set {spec!r} must be 'YEAR/SPLIT', e.g. '2007/trainval'")
    return (year if year.upper().startswith("VOC") else f"VOC{year}"), split


def load_voc_sets(
    devkit_root: str,
    sets: str | Sequence = ("2007/trainval", "2012/trainval"),
    *,
    class_names: Sequence[str] = VOC_CLASSES,
    use_difficult: bool = False,
    check_images: bool | str = True,
) -> DetectionSource:
    """Join several Pascal VOC years/splits into one :class:`DetectionSource`.

    The default is the "07+12" training set of Fast/Faster R-CNN and SSD (VOC2007
    trainval + VOC2012 trainval, 16,551 images); evaluation is usually on
    ``"2007/test"``.

    Args:
      devkit_root: the ``VOCdevkit`` folder, holding ``VOC2007/``, ``VOC2012/``, ...
      sets: ``"YEAR/SPLIT"`` entries, each read from
        ``devkit_root/VOC{YEAR}/ImageSets/Main/{SPLIT}.txt`` (a single string may join
        several with ``+`` or ``,``: ``"2007/trainval+2012/trainval"``).
      class_names, use_difficult, check_images: as in :func:`load_voc`.

    Returns:
      A :class:`DetectionSource` with the images of ``sets`` in order: image ids
      ``0..N-1`` unique across the joined sets, annotation ids ``1..M``, category ids
      ``1..len(class_names)`` in ``class_names`` order, difficult objects ``is_crowd``
      (unless ``use_difficult``), objects of unknown class names skipped and counted in
      ``skipped["unknown_class"]`` (one warning). An image listed twice (the same file in
      two of ``sets``, or twice in one split file) is kept once and counted in
      ``skipped["duplicate_image"]``. ``annotation_file`` names the split files joined
      with ``" + "``.

    Raises:
      kerasdet.errors.DataFileNotFoundError: ``devkit_root``, a year folder, a split file,
        an ``Annotations`` / ``JPEGImages`` folder, an XML file or (with
        ``check_images``) an image is missing; the message names the path.
      kerasdet.errors.DataError: malformed XML or an unreadable image (named).
      kerasdet.errors.ConfigError: a malformed ``sets`` entry or no sets at all.
    """
    devkit_root = os.fspath(devkit_root)
    if isinstance(sets, str):
        sets = [s for s in sets.replace(",", "+").split("+") if s.strip()]
    sets = list(sets)
    if not sets:
        raise ConfigError("load_voc_sets: no VOC sets given (e.g. ['2007/trainval'])")
    parsed = [parse_voc_set(s) for s in sets]
    if not os.path.isdir(devkit_root):
        raise DataFileNotFoundError(
            f"{devkit_root}: VOCdevkit folder does not exist (it should hold "
            f"{', '.join(sorted({y + '/' for y, _ in parsed}))})")
    parts = []
    for year, split in parsed:
        year_root = os.path.join(devkit_root, year)
        if not os.path.isdir(year_root):
            found = sorted(d for d in os.listdir(devkit_root)
                           if d.upper().startswith("VOC")
                           and os.path.isdir(os.path.join(devkit_root, d)))
            hint = (f"; found {found}" if found else
                    "; give the VOCdevkit folder that holds the VOC<year> folders")
            raise DataFileNotFoundError(
                f"{year_root}: VOC year folder does not exist{hint}")
        parts.append(_read_split(year_root, split))

    # Keep each image once.
    seen, skipped, dedup = set(), {}, []
    for split_file, stems, paths, heights, widths, raw in parts:
        keep = [i for i, p in enumerate(paths) if not (p in seen or seen.add(p))]
        if len(keep) != len(paths):
            skipped["duplicate_image"] = skipped.get("duplicate_image", 0) + len(paths) - len(keep)
        dedup.append((split_file, [stems[i] for i in keep], [paths[i] for i in keep],
                      [heights[i] for i in keep], [widths[i] for i in keep],
                      [raw[i] for i in keep]))
    if skipped:
        logger.warning("%s: %d image(s) listed more than once, kept once",
                       " + ".join(p[0] for p in parts), skipped["duplicate_image"])
    return _build_source(dedup, class_names=class_names, use_difficult=use_difficult,
                         check_images=check_images, skipped=skipped)
