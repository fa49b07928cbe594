"""Class-agnostic proposal recall (box and segment AR) through pycocotools.

The protocol of "Detecting Common Objects in Context" (T.-Y. Lin, Cornell 2017): average
recall (AR) over IoU 0.50:0.95 for a fixed number of proposals per image (§3.5, after
Hosang et al.), at 10, 100 and 1000 proposals, and for small / medium / large objects at
1000 proposals (§4.5.1, §4.6.1: "always for 1000 proposals"), with COCO's area ranges and
crowd regions ignored (chapter 2, §2.4.3). Proposals are class-agnostic: pycocotools'
``COCOeval`` with ``params.useCats = 0`` (every proposal may match every ground-truth
object of its image) and ``params.maxDets = [10, 100, 1000]``.

The numbers are read off ``COCOeval.eval["recall"]`` (``[IoU, category, area, maxDets]``,
the single class-agnostic category) by :func:`average_recall`, the mean over IoU
thresholds of the entries ``> -1`` exactly as ``COCOeval.summarize`` averages them, so any
``max_dets`` works (``summarize`` reads fixed positions of ``maxDets``).

Stat names (:func:`recall_keys`): boxes ``AR10``, ``AR100``, ``AR1000``, ``ARs1000``,
``ARm1000``, ``ARl1000`` (:data:`PROPOSAL_STAT_KEYS`); segments the same prefixed
``mask_`` (:data:`MASK_PROPOSAL_STAT_KEYS`). ``-1`` where the evaluated images have no
ground truth in an area range (pycocotools' convention). Segment proposals are the
detections' ``masks``, converted as in :mod:`kerasdet.evaluation.coco_eval`.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from kerasdet.evaluation.coco_eval import (
    MASK_PREFIX,
    CocoEvaluator,
    coco_evaluate,
    register_stat_descriptions,
)

#: Proposals per image at which AR is reported; the area split uses the last.
MAX_DETS = (10, 100, 1000)
_AREAS = (("s", "small"), ("m", "medium"), ("l", "large"))


def recall_keys(max_dets: Sequence[int] = MAX_DETS, *, prefix: str = "") -> tuple:
    """``AR<n>`` for each ``n`` of ``max_dets``, then ``ARs<last>``, ``ARm<last>``,
    ``ARl<last>``, each prefixed with ``prefix`` (default ``""``; ``"mask_"`` for
    segments)."""
    last = int(max_dets[-1])
    return (tuple(f"{prefix}AR{int(m)}" for m in max_dets)
            + tuple(f"{prefix}AR{a}{last}" for a, _ in _AREAS))


#: Box proposal stats at :data:`MAX_DETS`.
PROPOSAL_STAT_KEYS = recall_keys()
#: Segment proposal stats at :data:`MAX_DETS`.
MASK_PROPOSAL_STAT_KEYS = recall_keys(prefix=MASK_PREFIX)

register_stat_descriptions({
    **{k: ("Proposal Recall", "0.50:0.95", "all", m)
       for k, m in zip(PROPOSAL_STAT_KEYS, MAX_DETS)},
    **{k: ("Proposal Recall", "0.50:0.95", area, MAX_DETS[-1])
       for k, (_, area) in zip(PROPOSAL_STAT_KEYS[3:], _AREAS)},
    **{k: ("Segment Proposal Recall", "0.50:0.95", "all", m)
       for k, m in zip(MASK_PROPOSAL_STAT_KEYS, MAX_DETS)},
    **{k: ("Segment Proposal Recall", "0.50:0.95", area, MAX_DETS[-1])
       for k, (_, area) in zip(MASK_PROPOSAL_STAT_KEYS[3:], _AREAS)},
})


def average_recall(coco_eval, *, area: str = "all", max_dets: int = 100) -> float:
    """AR of an accumulated ``COCOeval`` for one area range and ``maxDets`` value: the
    mean of ``eval["recall"][:, :, area, maxDets]`` over IoU thresholds and categories,
    entries ``-1`` (no ground truth) left out, ``-1`` if all are (``summarize``'s rule).

    Args:
      coco_eval: a ``COCOeval`` after ``accumulate()``.
      area: one of its ``params.areaRngLbl`` (default ``"all"``).
      max_dets: one of its ``params.maxDets`` (default 100).
    """
    p = coco_eval.params
    if area not in p.areaRngLbl:
        raise ValueError(f"area {area!r} is not one of {list(p.areaRngLbl)}")
    if int(max_dets) not in p.maxDets:
        raise ValueError(f"max_dets {max_dets} is not one of params.maxDets {list(p.maxDets)}")
    recall = coco_eval.eval["recall"]  # [T, K, A, M]
    s = recall[:, :, list(p.areaRngLbl).index(area), list(p.maxDets).index(int(max_dets))]
    s = s[s > -1]
    return float(np.mean(s)) if s.size else -1.0


def recall_stats(coco_eval, *, prefix: str = "") -> dict[str, float]:
    """:func:`recall_keys` of ``coco_eval.params.maxDets`` -> AR (:func:`average_recall`)."""
    max_dets = [int(m) for m in coco_eval.params.maxDets]
    keys = recall_keys(max_dets, prefix=prefix)
    values = [average_recall(coco_eval, max_dets=m) for m in max_dets]
    values += [average_recall(coco_eval, area=area, max_dets=max_dets[-1]) for _, area in _AREAS]
    return dict(zip(keys, values))


def run_proposal_recall(
    coco_gt,
    results: list[dict],
    *,
    image_ids: Iterable[int] | None = None,
    iou_type: str = "bbox",
    max_dets: Sequence[int] = MAX_DETS,
    verbose: bool = False,
) -> dict[str, float]:
    """Class-agnostic AR of COCO results (``useCats=0``, ``maxDets=max_dets``).

    Args:
      coco_gt: ground truth as for :func:`~kerasdet.evaluation.coco_eval.coco_evaluate`.
      results: COCO results entries (``category_id`` must be a ground-truth category but
        is not used for matching); ``"segmentation"`` in each for ``iou_type="segm"``.
      image_ids: the images scored (default ``None``: every ground-truth image).
      iou_type: ``"bbox"`` (default) or ``"segm"``.
      max_dets: proposals per image (default :data:`MAX_DETS`); increasing.
      verbose: let pycocotools print.

    Returns:
      ``{key: AR}`` for :func:`recall_keys` (``mask_``-prefixed for ``"segm"``).
    """
    max_dets = [int(m) for m in max_dets]
    if not max_dets or sorted(max_dets) != max_dets:
        raise ValueError(f"max_dets must be a non-empty increasing sequence, got {max_dets}")
    coco_eval = coco_evaluate(coco_gt, results, image_ids=image_ids, iou_type=iou_type,
                              use_cats=False, max_dets=max_dets, summarize=False,
                              verbose=verbose)
    return recall_stats(coco_eval, prefix=MASK_PREFIX if iou_type == "segm" else "")


class ProposalRecallEvaluator(CocoEvaluator):
    """Accumulates batched proposals and scores their class-agnostic recall.

    The interface of :class:`~kerasdet.evaluation.coco_eval.CocoEvaluator` (``reset``,
    ``update(..., masks=None)``, ``write_results``, ``evaluate``), so the evaluation
    callback drives it unchanged. A proposal's ``classes`` entry only marks padding
    (``-1``); any class index of ``category_ids`` counts the same. Each image's proposals
    should come sorted by score and number up to ``max_dets[-1]``; pycocotools keeps the
    ``maxDets`` highest-scoring ones.

    Args:
      coco_gt, category_ids: as for ``CocoEvaluator``.
      iou_type: ``"bbox"`` (default: box AR), ``"segm"`` (segment AR, ``mask_`` keys) or
        ``("bbox", "segm")``.
      max_dets: proposals per image of the reported ARs (default :data:`MAX_DETS`).
    """

    def __init__(self, coco_gt, *, category_ids: Sequence[int] | None = None,
                 iou_type="bbox", max_dets: Sequence[int] = MAX_DETS):
        super().__init__(coco_gt, category_ids=category_ids, iou_type=iou_type)
        self.max_dets = tuple(int(m) for m in max_dets)

    def evaluate(self, verbose: bool = False) -> dict[str, float]:
        """AR stats over the images seen so far (:func:`run_proposal_recall` per type)."""
        if not self.image_ids:
            raise ValueError("ProposalRecallEvaluator.evaluate: no images were added with "
                             "update()")
        stats = {}
        for iou_type in self.iou_types:
            stats.update(run_proposal_recall(
                self.coco_gt, self.results, image_ids=self.image_ids, iou_type=iou_type,
                max_dets=self.max_dets, verbose=verbose))
        return stats


__all__ = [
    "MASK_PROPOSAL_STAT_KEYS",
    "MAX_DETS",
    "PROPOSAL_STAT_KEYS",
    "ProposalRecallEvaluator",
    "average_recall",
    "recall_keys",
    "recall_stats",
    "run_proposal_recall",
]
