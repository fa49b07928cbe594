"""The box format of a source at the public edge: any Keras ``bounding_box_format`` in,
kerasdet's ``yxyx`` pixels inside.

A :class:`~kerasdet.data.coco.DetectionSource` built by the loaders (``load_coco``,
``load_voc``) holds ``[ymin, xmin, ymax, xmax]`` boxes in original-image pixels. A source
built in memory may hold its boxes in any of Keras' formats
(:data:`kerasdet.boxes.BOX_FORMATS`: ``xyxy``, ``yxyx``, ``xywh``, ``center_xywh``,
``center_yxhw``, ``rel_xyxy``, ``rel_yxyx``, ``rel_xywh``, ``rel_center_xywh``);
:func:`to_yxyx_source` converts it once, with :func:`kerasdet.boxes.convert_format`
(Keras' own conversion), and ``make_dataset(bounding_box_format=...)`` calls it.
``rel_*`` coordinates are fractions of each image's *own* ``(height, width)``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from kerasdet import boxes as box_ops

from .coco import DetectionSource

__all__ = ["to_yxyx_source"]


def to_yxyx_source(source: DetectionSource, *, bounding_box_format: str = "yxyx") -> DetectionSource:
    """``source`` with its boxes converted from ``bounding_box_format`` to yxyx pixels.

    Args:
      source: a :class:`DetectionSource` whose ``boxes`` (per image ``[n, 4]``) are in
        ``bounding_box_format``.
      bounding_box_format: a Keras format name (:data:`kerasdet.boxes.BOX_FORMATS`);
        ``rel_*`` formats are relative to each image's ``heights[i]`` / ``widths[i]``.
        Default ``"yxyx"``: ``source`` is returned as is.

    Returns:
      A copy of ``source`` (``dataclasses.replace``; everything but ``boxes`` shared)
      whose boxes are float32 ``[n, 4]`` ``[ymin, xmin, ymax, xmax]`` pixels.

    Raises:
      ValueError: for an unknown format name, boxes that are not ``[n, 4]``, or a
        ``rel_*`` format on a source with an image of unknown size.
    """
    if bounding_box_format not in box_ops.BOX_FORMATS:
        raise ValueError(f"Unknown bounding_box_format {bounding_box_format!r}; expected "
                         f"one of {box_ops.BOX_FORMATS}.")
    if bounding_box_format == "yxyx" or len(source.boxes) == 0:
        return source
    per_image = []
    for i, b in enumerate(source.boxes):
        b = np.asarray(b, np.float32)
        if b.size and (b.ndim != 2 or b.shape[1] != 4):
            raise ValueError(f"boxes of image {source.image_paths[i]} must be [n, 4], got "
                             f"shape {b.shape}")
        per_image.append(b.reshape(-1, 4))
    counts = np.asarray([len(b) for b in per_image], np.int64)
    flat = np.concatenate(per_image) if per_image else np.zeros((0, 4), np.float32)
    height = width = None
    if bounding_box_format.startswith("rel_"):
        if any(h is None or w is None for h, w in zip(source.heights, source.widths)):
            raise ValueError(f"bounding_box_format={bounding_box_format!r} needs every "
                             "image's height and width")
        # One call for all boxes: each box row gets its own image's size.
        height = np.repeat(np.asarray(source.heights, np.float32), counts)[:, None]
        width = np.repeat(np.asarray(source.widths, np.float32), counts)[:, None]
    yxyx = np.asarray(box_ops.convert_format(flat, source=bounding_box_format, target="yxyx",
                                             height=height, width=width), np.float32)
    return dataclasses.replace(source, boxes=np.split(yxyx, np.cumsum(counts)[:-1]))
