"""Evaluation chosen by a ``metric`` string: ``"coco"``, ``"coco_segm"``, ``"proposals"``,
``"proposals_segm"``, ``"voc07"``, ``"voc12"``.

* ``"coco"``: pycocotools' ``COCOeval`` (AP averaged over IoU 0.50:0.95, the 12 numbers of
  :data:`~kerasdet.evaluation.coco_eval.STAT_KEYS`; Lin et al., ECCV 2014), through
  :class:`~kerasdet.evaluation.coco_eval.CocoEvaluator`.
* ``"coco_segm"``: the same for boxes *and* masks (``iouType="segm"``, the model's
  ``predict`` ``"masks"`` as RLE at the original image size): the ``"coco"`` keys plus
  :data:`~kerasdet.evaluation.coco_eval.MASK_STAT_KEYS` (``mask_AP``, ``mask_AP50``,
  ...); headline ``mask_AP``.
* ``"proposals"`` / ``"proposals_segm"``: class-agnostic proposal recall
  (:mod:`kerasdet.evaluation.proposal_recall`: ``useCats=0``, AR at 10 / 100 / 1000
  proposals and for small / medium / large objects at 1000) of the boxes, resp. of the
  boxes and the masks (``mask_`` keys); headline ``AR1000`` resp. ``mask_AR1000``
  ("Detecting Common Objects in Context", T.-Y. Lin, 2017, §4.5.1 and §4.6.1).
* ``"voc07"``: Pascal VOC2007 mAP at IoU 0.5, 11-point interpolated AP, *difficult*
  objects ignored (Everingham et al., "The PASCAL Visual Object Classes (VOC)
  Challenge", IJCV 2010; the VOC2007 devkit's ``VOCevaldet.m``), the number the VOC07
  tables of Faster R-CNN / SSD report.
* ``"voc12"``: the same with the VOC2010+ all-point AP (area under the monotone
  precision envelope, devkit ``VOCap.m``).

Every evaluator has the interface of ``CocoEvaluator`` (``reset``, ``update``,
``write_results``, ``evaluate``, ``needs_masks``: pass ``update(..., masks=...)``), so :func:`kerasdet.evaluation.callback.evaluate_model`
and the callback drive any of them the same way. VOC stats are ``{"mAP": float,
"AP/<class name>": float}``; a class without non-difficult ground truth in the evaluated
images has AP ``nan`` and is left out of ``mAP`` (as the devkit leaves it undefined).

Ground truth for the VOC metrics comes from a
:class:`~kerasdet.data.coco.DetectionSource` (``is_crowd`` = difficult for VOC sources,
``iscrowd`` for COCO sources), or a COCO JSON path (loaded with
:func:`~kerasdet.data.coco.load_coco`, no image checks).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from kerasdet.errors import ConfigError, DataError
from kerasdet.evaluation.coco_eval import (
    MASK_STAT_KEYS,
    STAT_DESCRIPTIONS,
    STAT_KEYS,
    CocoEvaluator,
    _as_numpy,
    detections_to_coco_results,
    format_table,
)
from kerasdet.evaluation.proposal_recall import (
    MASK_PROPOSAL_STAT_KEYS,
    PROPOSAL_STAT_KEYS,
    ProposalRecallEvaluator,
)

#: metric name -> the stat a checkpoint monitors (logged as ``val_`` + this key).
PRIMARY_KEYS = {"coco": "AP", "coco_segm": "mask_AP", "proposals": "AR1000",
                "proposals_segm": "mask_AR1000", "voc07": "mAP", "voc12": "mAP"}
METRICS = tuple(PRIMARY_KEYS)
#: The metrics that score the model's ``predict`` ``"masks"``.
MASK_METRICS = ("coco_segm", "proposals_segm")


def check_metric(metric: str) -> str:
    """The normalised metric name; :class:`~kerasdet.errors.ConfigError` if unknown."""
    name = str(metric).strip().lower() if isinstance(metric, str) else None
    if name not in PRIMARY_KEYS:
        raise ConfigError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    return name


def primary_key(metric: str) -> str:
    """The main stat of ``metric``: ``"AP"`` (coco), ``"mask_AP"`` (coco_segm),
    ``"AR1000"`` (proposals), ``"mask_AR1000"`` (proposals_segm) or ``"mAP"``
    (voc07/voc12)."""
    return PRIMARY_KEYS[check_metric(metric)]


def needs_masks(metric: str) -> bool:
    """Whether ``metric`` scores the model's ``predict`` ``"masks"``."""
    return check_metric(metric) in MASK_METRICS


def stat_keys(metric: str) -> tuple:
    """The fixed stat names ``metric`` returns, in order (VOC: ``("mAP",)``; its
    ``AP/<class name>`` keys depend on the data)."""
    metric = check_metric(metric)
    return {"coco": STAT_KEYS, "coco_segm": STAT_KEYS + MASK_STAT_KEYS,
            "proposals": PROPOSAL_STAT_KEYS,
            "proposals_segm": PROPOSAL_STAT_KEYS + MASK_PROPOSAL_STAT_KEYS}.get(metric, ("mAP",))


def _is_source(obj) -> bool:
    from kerasdet.data.coco import DetectionSource

    return isinstance(obj, DetectionSource)


class VocEvaluator:
    """Accumulates batched detections and scores them with the VOC protocol
    (:func:`~kerasdet.evaluation.voc_ap.voc_eval`).

    Args:
      source: the ground truth, a :class:`~kerasdet.data.coco.DetectionSource` (boxes in
        original-image pixels, ``is_crowd`` read as *difficult*), or a COCO JSON path.
      use_07_metric: VOC2007 11-point AP (``"voc07"``) instead of all-point (``"voc12"``).
      iou_threshold: a detection is a true positive at IoU ``>=`` this (VOC: 0.5).
      category_ids: contiguous class index -> dataset category id of the detections'
        ``classes``; default ``source.category_ids``.

    Only the images passed to :meth:`update` are scored. IoU is computed on continuous
    pixel-edge boxes; the VOC loaders convert the XML's 1-based inclusive pixels to
    those, so the devkit's ``+1`` widths come out the same.
    """

    def __init__(self, source, *, use_07_metric: bool, iou_threshold: float = 0.5,
                 category_ids: Sequence[int] | None = None):
        if not _is_source(source):
            from kerasdet.data.coco import load_coco

            source = load_coco(source, None, category_ids=category_ids, check_images=False)
        self.source = source
        self.use_07_metric = bool(use_07_metric)
        self.iou_threshold = float(iou_threshold)
        self.category_ids = [int(c) for c in (source.category_ids if category_ids is None
                                              else category_ids)]
        if not self.category_ids:
            raise ValueError("category_ids is empty")
        unknown = sorted(set(self.category_ids) - {int(c) for c in source.category_ids})
        if unknown:
            raise DataError(f"category_ids {unknown} are not categories of "
                            f"{source.annotation_file} (ids {list(source.category_ids)})")
        self._position = {int(i): k for k, i in enumerate(source.image_ids)}
        self.reset()

    #: VOC scores boxes only (the callback passes no ``masks``).
    needs_masks = False

    def reset(self) -> None:
        """Forgets every accumulated detection and image id."""
        self.results: list[dict] = []
        self.image_ids: set[int] = set()

    def update(self, image_ids, boxes, scores, classes, num_detections, image_scales) -> None:
        """Adds one batch (formats as in
        :func:`~kerasdet.evaluation.coco_eval.detections_to_coco_results`)."""
        self.results.extend(detections_to_coco_results(
            image_ids=image_ids, boxes=boxes, scores=scores, classes=classes,
            num_detections=num_detections, image_scales=image_scales,
            category_ids=self.category_ids))
        self.image_ids.update(int(i) for i in _as_numpy(image_ids).reshape(-1))

    write_results = CocoEvaluator.write_results

    def ground_truths(self, image_ids=None) -> dict:
        """``image_id -> {"boxes" yxyx, "classes" (contiguous), "difficult"}`` of the
        evaluated images (default: those passed to :meth:`update`)."""
        ids = sorted(self.image_ids if image_ids is None else {int(i) for i in image_ids})
        unknown = [i for i in ids if i not in self._position]
        if unknown:
            raise DataError(f"VOC evaluation: image ids {unknown[:10]} (of {len(unknown)}) "
                            f"are not in the ground truth {self.source.annotation_file}")
        out = {}
        for i in ids:
            k = self._position[i]
            out[i] = {"boxes": np.asarray(self.source.boxes[k], np.float64).reshape(-1, 4),
                      "classes": np.asarray(self.source.classes[k], np.int64).reshape(-1),
                      "difficult": np.asarray(self.source.is_crowd[k], bool).reshape(-1)}
        return out

    def detections(self) -> dict:
        """``image_id -> {"boxes" yxyx original px, "scores", "classes"}`` (contiguous
        indices of the source) from the accumulated results."""
        index = self.source.category_id_to_index
        grouped: dict = {i: ([], [], []) for i in self.image_ids}
        for r in self.results:
            x, y, w, h = r["bbox"]
            b, s, c = grouped.setdefault(int(r["image_id"]), ([], [], []))
            b.append([y, x, y + h, x + w])
            s.append(r["score"])
            c.append(index[int(r["category_id"])])
        return {i: {"boxes": np.asarray(b, np.float64).reshape(-1, 4),
                    "scores": np.asarray(s, np.float64), "classes": np.asarray(c, np.int64)}
                for i, (b, s, c) in grouped.items()}

    def evaluate(self, verbose: bool = False) -> dict[str, float]:
        """``{"mAP": ..., "AP/<class name>": ...}`` over the images seen so far
        (``nan`` for a class without non-difficult ground truth there)."""
        from kerasdet.evaluation.voc_ap import voc_eval

        if not self.image_ids:
            raise ValueError("VocEvaluator.evaluate: no images were added with update()")
        gts = self.ground_truths()
        if not any(np.any(~g["difficult"]) for g in gts.values()):
            raise DataError(
                f"VOC evaluation on {len(gts)} image(s) of {self.source.annotation_file}: "
                "no non-difficult ground-truth box, mAP is undefined")
        out = voc_eval(self.detections(), gts, iou_threshold=self.iou_threshold,
                       use_07_metric=self.use_07_metric, bounding_box_format="yxyx")
        stats = {"mAP": float(out["mAP"])}
        for k, name in enumerate(self.source.category_names):
            stats[f"AP/{name}"] = float(out["per_class_ap"].get(k, math.nan))
        if verbose:
            print(format_stats(stats))
        return stats


def make_evaluator(metric: str, ground_truth, *, category_ids: Sequence[int] | None = None):
    """The evaluator for ``metric``.

    Args:
      metric: one of :data:`METRICS`.
      ground_truth: a :class:`~kerasdet.data.coco.DetectionSource` (any metric; COCO
        evaluation of a source without a COCO JSON, e.g. VOC, uses an in-memory COCO
        built by :func:`kerasdet.data.convert.coco_from_source`), a COCO JSON path (any
        metric) or a pycocotools ``COCO`` (not ``"voc07"``/``"voc12"``). The ``_segm``
        metrics need a ``segmentation`` on every annotation.
      category_ids: contiguous class index -> dataset category id; default the source's
        (required for a path / ``COCO`` with the COCO metrics).
    """
    metric = check_metric(metric)
    if metric in ("coco", "coco_segm"):
        return CocoEvaluator(ground_truth, category_ids=category_ids,
                             iou_type=("bbox", "segm") if metric == "coco_segm" else "bbox")
    if metric in ("proposals", "proposals_segm"):
        return ProposalRecallEvaluator(
            ground_truth, category_ids=category_ids,
            iou_type=("bbox", "segm") if metric == "proposals_segm" else "bbox")
    if not _is_source(ground_truth) and not isinstance(ground_truth, (str, bytes)) \
            and not hasattr(ground_truth, "__fspath__"):
        raise ValueError(f"metric={metric!r} needs a DetectionSource or a COCO JSON path as "
                         f"ground truth, got {type(ground_truth).__name__}")
    return VocEvaluator(ground_truth, use_07_metric=metric == "voc07",
                        category_ids=category_ids)


def format_stats(stats: Mapping[str, float]) -> str:
    """A readable table of COCO / proposal-recall stats
    (:func:`~kerasdet.evaluation.coco_eval.format_table`) or VOC stats (``mAP`` then one
    row per class)."""
    if any(k in stats for k in STAT_DESCRIPTIONS):
        return format_table(stats)
    rows = [(k[3:], float(v)) for k, v in stats.items() if k.startswith("AP/")]
    width = max([len("mAP")] + [len(n) for n, _ in rows])
    lines = [f"{'Class':<{width}} {'AP@0.5':>8}", "-" * (width + 9)]
    for name, value in rows:
        lines.append(f"{name:<{width}} {'n/a' if math.isnan(value) else f'{value:.4f}':>8}")
    if rows:
        lines.append("-" * (width + 9))
    lines.append(f"{'mAP':<{width}} {float(stats.get('mAP', math.nan)):8.4f}")
    return "\n".join(lines)


__all__ = ["MASK_METRICS", "METRICS", "PRIMARY_KEYS", "VocEvaluator", "check_metric",
           "format_stats", "make_evaluator", "needs_masks", "primary_key", "stat_keys"]
