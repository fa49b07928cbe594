"""Any :class:`~kerasdet.data.coco.DetectionSource` as COCO ground truth (a dict, a
pycocotools ``COCO`` in memory, a JSON file), and ``voc2coco``.

The COCO format is the one of Lin et al., "Microsoft COCO: Common Objects in Context"
(ECCV 2014), as read by pycocotools: ``images`` (``id``, ``file_name``, ``height``,
``width``), ``annotations`` (``id``, ``image_id``, ``category_id``, ``bbox`` ``[x, y, w,
h]`` in pixels, ``area``, ``iscrowd``), ``categories`` (``id``, ``name``).

Conversion choices:

* ``bbox`` is the source's pixel-edge box: ``[ymin, xmin, ymax, xmax]`` ->
  ``[xmin, ymin, xmax - xmin, ymax - ymin]``; for VOC this is the XML box
  ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`` (1-based inclusive pixels, as
  the VOC devkit measures them), so IoUs match the devkit's ``+1`` convention. ``area``
  is ``w * h`` (the box area: a VOC source has no masks).
* ``iscrowd`` is the source's ``is_crowd``: VOC *difficult* objects (unless loaded with
  ``use_difficult``) become ``iscrowd=1``, pycocotools' way to ignore a box (a detection
  on it is neither a true nor a false positive). pycocotools matches crowd boxes by
  intersection over the *detection's* area, not IoU, so COCO metrics on a VOC set are not
  VOC metrics; use :mod:`kerasdet.evaluation.metrics` (``"voc07"``/``"voc12"``) for those.
* Annotation ids are the source's when they are all positive and unique, else ``1..M``
  (pycocotools' ``COCOeval`` reads a matched ground-truth id ``0`` as "no match").
* Only what the source holds is written: boxes skipped by the loader (unknown class,
  degenerate) are not in the JSON.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Sequence

import numpy as np

from kerasdet.errors import DataError

from .coco import DetectionSource
from .voc import VOC_CLASSES, load_voc_sets


def source_to_coco_dict(source: DetectionSource, *, image_root: str | None = None) -> dict:
    """A COCO ground-truth dict from ``source`` (see the module docstring).

    Args:
      source: any :class:`DetectionSource` (``load_voc``, ``load_voc_sets``, ``load_coco``).
      image_root: ``file_name`` is the image path relative to this folder (so that
        ``load_coco(json, image_dir=image_root)`` finds the images); ``None`` writes the
        paths as the source holds them.

    Raises:
      kerasdet.errors.DataError: duplicate image ids, or an image id that is not an
        integer (COCO ids are integers).
    """
    images, annotations = [], []
    seen = set()
    for i, image_id in enumerate(source.image_ids):
        if isinstance(image_id, (bool, np.bool_)) or not isinstance(image_id, (int, np.integer)):
            raise DataError(f"{source.annotation_file}: image id {image_id!r} (image "
                            f"{source.image_paths[i]}) is not an integer")
        if int(image_id) in seen:
            raise DataError(f"{source.annotation_file}: duplicate image id {int(image_id)}")
        seen.add(int(image_id))
        path = source.image_paths[i]
        file_name = path if image_root is None else os.path.relpath(path, image_root)
        images.append({"id": int(image_id), "file_name": file_name.replace(os.sep, "/"),
                       "height": int(source.heights[i]), "width": int(source.widths[i])})

    ann_ids = [int(a) for ids in source.annotation_ids for a in np.asarray(ids).reshape(-1)]
    keep_ids = all(a > 0 for a in ann_ids) and len(set(ann_ids)) == len(ann_ids)
    category_ids = [int(c) for c in source.category_ids]
    next_id = 1
    for i, image_id in enumerate(source.image_ids):
        boxes = np.asarray(source.boxes[i], np.float64).reshape(-1, 4)
        classes = np.asarray(source.classes[i]).reshape(-1)
        crowd = np.asarray(source.is_crowd[i], bool).reshape(-1)
        ids = np.asarray(source.annotation_ids[i]).reshape(-1)
        for j, (y0, x0, y1, x1) in enumerate(boxes.tolist()):
            w, h = x1 - x0, y1 - y0
            annotations.append({
                "id": int(ids[j]) if keep_ids else next_id,
                "image_id": int(image_id),
                "category_id": category_ids[int(classes[j])],
                "bbox": [x0, y0, w, h],
                "area": w * h,
                "iscrowd": int(crowd[j]),
            })
            next_id += 1
    categories = [{"id": c, "name": str(n), "supercategory": "none"}
                  for c, n in zip(category_ids, source.category_names)]
    return {
        "info": {"description": f"converted by kerasdet from {source.annotation_file}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def coco_from_source(source: DetectionSource):
    """A pycocotools ``COCO`` built in memory from ``source`` (no file written): the
    ground truth :class:`~kerasdet.evaluation.coco_eval.CocoEvaluator` uses for sources
    without a COCO JSON (VOC)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = source_to_coco_dict(source)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress prints
        coco.createIndex()
    return coco


def coco_ground_truth(source: DetectionSource):
    """What COCO evaluation of ``source`` scores against: its annotation file when the
    source was loaded from a COCO JSON (the file is the reference: it keeps the
    ``area`` of masks and any annotation the loader skipped), else an in-memory
    :func:`coco_from_source` (VOC sources)."""
    path = source.annotation_file
    if isinstance(path, str) and path.lower().endswith(".json") and os.path.isfile(path):
        return path
    return coco_from_source(source)


def write_coco_json(source: DetectionSource, output_json: str, *,
                    image_root: str | None = None) -> str:
    """Writes :func:`source_to_coco_dict` to ``output_json`` (folders created); returns
    the path. ``image_root`` as in :func:`source_to_coco_dict`."""
    output_json = os.fspath(output_json)
    data = source_to_coco_dict(source, image_root=image_root)
    parent = os.path.dirname(output_json)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = output_json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, output_json)
    return output_json


def voc_to_coco(
    voc_root,
    output_json: str,
    *,
    sets: str | Sequence = ("2007/test",),
    class_names: Sequence[str] = VOC_CLASSES,
    use_difficult: bool = False,
    check_images: bool | str = "exists",
) -> str:
    """Writes Pascal VOC annotations as one COCO JSON (``kerasdet convert voc2coco``).

    Args:
      voc_root: the ``VOCdevkit`` folder (holding ``VOC2007/``, ``VOC2012/``), or an
        already loaded :class:`DetectionSource` (then ``sets``, ``class_names``,
        ``use_difficult``, ``check_images`` are not used and ``file_name`` is the path
        the source holds).
      output_json: the COCO JSON to write.
      sets: ``"YEAR/SPLIT"`` entries joined as in :func:`~kerasdet.data.voc.load_voc_sets`.
      class_names: contiguous index -> class name; category ids are ``1..len``.
      use_difficult: write difficult objects as normal objects (default: ``iscrowd=1``,
        ignored by pycocotools).
      check_images: as in :func:`~kerasdet.data.voc.load_voc_sets`; the default only
        checks that the images exist (sizes come from the XML ``<size>``).

    Returns:
      ``output_json``. ``file_name`` is relative to ``voc_root``
      (``"VOC2007/JPEGImages/000001.jpg"``), so ``load_coco(output_json,
      image_dir=voc_root)`` loads the same images and boxes; image ids are ``0..N-1`` in
      the order of ``sets``, category ids ``1..20`` in ``VOC_CLASSES`` order.

    Raises:
      kerasdet.errors.DataFileNotFoundError / DataError: as :func:`load_voc_sets`.
    """
    if isinstance(voc_root, DetectionSource):
        return write_coco_json(voc_root, output_json)
    voc_root = os.fspath(voc_root)
    source = load_voc_sets(voc_root, sets, class_names=class_names,
                           use_difficult=use_difficult, check_images=check_images)
    return write_coco_json(source, output_json, image_root=voc_root)


__all__ = ["coco_from_source", "coco_ground_truth", "source_to_coco_dict", "voc_to_coco",
           "write_coco_json"]
