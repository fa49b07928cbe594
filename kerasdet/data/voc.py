"""Pascal VOC (XML) loading into a :class:`~kerasdet.data.coco.DetectionSource`.

Layout read (the VOCdevkit year folder, e.g. ``VOCdevkit/VOC2007``)::

    root/ImageSets/Main/{split}.txt     one image id (file stem) per line
    root/Annotations/{id}.xml
    root/JPEGImages/{id}.jpg

Choices made here (documented for the README):

* **Coordinates.** VOC boxes are 1-based *inclusive* pixel indices. They become 0-based
  pixel-edge boxes: ``[ymin - 1, xmin - 1, ymax, xmax]`` (``xmin - 1`` is the left edge
  of the first pixel, ``xmax`` the right edge of the last one), so a box covering pixels
  1..10 is 10 px wide.
* **Difficult objects** become ``is_crowd=True`` (ignored in matching and evaluation, as
  in the VOC protocol) unless ``use_difficult=True``, which makes them normal objects.
* **Ids.** Image ids are the index of the image in the split file; category ids are
  ``index + 1`` (1-based, as in the usual VOC label maps; 0 is background elsewhere).
* Unknown class names are skipped and counted (``unknown_class``); malformed XML (not
  parseable, missing/non-numeric ``bndbox`` or ``size`` fields) is a ValueError naming
  the file and the field.
"""
from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from typing import Sequence

from .coco import DetectionSource, _as_arrays, check_image_files, clip_box_yxyx, report_skipped

logger = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


def _number(node, tag: str, xml_path: str, where: str) -> float:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(f"{xml_path}: missing field '{where}/{tag}'")
    try:
        return float(child.text.strip())
    except ValueError:
        raise ValueError(f"{xml_path}: field '{where}/{tag}' is not a number: "
                         f"{child.text.strip()!r}") from None


def parse_voc_xml(xml_path: str) -> dict:
    """One VOC annotation file -> ``{"height", "width", "objects": [(name, difficult,
    (xmin, ymin, xmax, ymax)) ...]}`` with the raw 1-based coordinates.

    ``height``/``width`` are None when ``<size>`` is absent.
    """
    try:
        root = ET.parse(xml_path).getroot()
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {xml_path}") from None
    except ET.ParseError as e:
        raise ValueError(f"{xml_path}: not valid XML ({e})") from None
    if root.tag != "annotation":
        raise ValueError(f"{xml_path}: root element is <{root.tag}>, expected <annotation>")
    size = root.find("size")
    height = width = None
    if size is not None:
        height = _number(size, "height", xml_path, "size")
        width = _number(size, "width", xml_path, "size")
        if height <= 0 or width <= 0 or height != int(height) or width != int(width):
            raise ValueError(f"{xml_path}: field 'size' must hold positive integers, got "
                             f"height={height}, width={width}")
        height, width = int(height), int(width)
    objects = []
    for k, obj in enumerate(root.findall("object")):
        where = f"object[{k}]"
        name_node = obj.find("name")
        if name_node is None or not (name_node.text or "").strip():
            raise ValueError(f"{xml_path}: missing field '{where}/name'")
        difficult_node = obj.find("difficult")
        difficult = False
        if difficult_node is not None and (difficult_node.text or "").strip():
            try:
                difficult = bool(int(float(difficult_node.text.strip())))
            except ValueError:
                raise ValueError(f"{xml_path}: field '{where}/difficult' is not 0/1: "
                                 f"{difficult_node.text.strip()!r}") from None
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise ValueError(f"{xml_path}: missing field '{where}/bndbox'")
        coords = tuple(_number(bndbox, t, xml_path, f"{where}/bndbox")
                       for t in ("xmin", "ymin", "xmax", "ymax"))
        objects.append((name_node.text.strip(), difficult, coords))
    return {"height": height, "width": width, "objects": objects}


def load_voc(
    root: str,
    *,
    split: str = "trainval",
    class_names: Sequence[str] = VOC_CLASSES,
    use_difficult: bool = False,
    check_images: bool | str = True,
) -> DetectionSource:
    """Load a Pascal VOC split.

    Args:
      root: the VOC year folder holding ``ImageSets``, ``Annotations``, ``JPEGImages``.
      split: name of ``ImageSets/Main/{split}.txt``.
      class_names: contiguous index -> class name; objects of other names are skipped.
      use_difficult: treat ``difficult`` objects as normal objects (default: ignored,
        ``is_crowd=True``).
      check_images: as in :func:`~kerasdet.data.coco.load_coco` (``True``: files must
        exist and decode completely with the annotated size; ``"exists"``; ``False``).
    """
    root = os.fspath(root)
    split_file = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(split_file):
        raise ValueError(f"{split_file}: split file does not exist (split={split!r})")
    with open(split_file) as f:
        stems = [line.split()[0] for line in f if line.strip()]
    class_index = {name: i for i, name in enumerate(class_names)}
    if len(class_index) != len(class_names):
        raise ValueError(f"class_names has duplicates: {list(class_names)}")

    paths, heights, widths, raw = [], [], [], []
    for stem in stems:
        parsed = parse_voc_xml(os.path.join(root, "Annotations", f"{stem}.xml"))
        paths.append(os.path.join(root, "JPEGImages", f"{stem}.jpg"))
        heights.append(parsed["height"])
        widths.append(parsed["width"])
        raw.append(parsed["objects"])
    image_ids = list(range(len(stems)))
    if check_images:
        sizes = check_image_files(
            paths, [None if h is None else (h, w) for h, w in zip(heights, widths)],
            ids=image_ids, decode=check_images != "exists")
        if check_images != "exists":
            heights = [int(s[0]) for s in sizes]
            widths = [int(s[1]) for s in sizes]
    for i, h in enumerate(heights):
        if h is None:
            raise ValueError(f"{os.path.join(root, 'Annotations', stems[i] + '.xml')}: "
                             "missing field 'size' (pass check_images=True to read the "
                             "size from the image)")

    skipped: dict = {}
    per_image = []
    ann_id = 0
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
    report_skipped(skipped, split_file)
    boxes, classes, crowd, ann_ids = _as_arrays(per_image)
    return DetectionSource(
        image_paths=paths, image_ids=image_ids, heights=heights, widths=widths,
        boxes=boxes, classes=classes, is_crowd=crowd, annotation_ids=ann_ids,
        category_ids=[i + 1 for i in range(len(class_names))],
        category_names=list(class_names), annotation_file=split_file, masks=None,
        skipped=skipped)
