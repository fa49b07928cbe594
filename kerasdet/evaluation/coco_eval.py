"""COCO-style box evaluation through pycocotools.

The scoring itself is pycocotools' ``COCOeval`` (the reference implementation of the COCO
metrics); this module only converts a detector's batched ``predict`` output into COCO
results entries and drives ``COCOeval`` quietly.

Conventions (see the package README):

* A detector's ``predict`` output is ``{"boxes": [B, K, 4] yxyx in network-input pixels,
  "scores": [B, K], "classes": [B, K] int32 contiguous (-1 = padding), "num_detections":
  [B]}``; the first ``num_detections[b]`` rows of image ``b`` are valid.
* ``image_scales`` are *network pixels per original pixel* (what a loader applied when it
  resized the image): ``original = network / scale``. A scale may be one number per image
  (``[B]``, aspect-preserving resize) or a ``(scale_y, scale_x)`` pair (``[B, 2]``).
* ``category_ids`` maps a contiguous class index to the dataset's own category id
  (``category_ids[c]``), e.g. COCO's sparse ids 1..90.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from typing import Iterable, Mapping, Sequence

import numpy as np

from kerasdet.errors import DataError, DataFileNotFoundError

#: The 12 numbers ``COCOeval.summarize`` prints, in its order.
STAT_KEYS = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)

# (metric, IoU, area, maxDets) of each stat, as pycocotools' summary prints them.
_STAT_DESCRIPTIONS = {
    "AP": ("Average Precision", "0.50:0.95", "all", 100),
    "AP50": ("Average Precision", "0.50", "all", 100),
    "AP75": ("Average Precision", "0.75", "all", 100),
    "APs": ("Average Precision", "0.50:0.95", "small", 100),
    "APm": ("Average Precision", "0.50:0.95", "medium", 100),
    "APl": ("Average Precision", "0.50:0.95", "large", 100),
    "AR1": ("Average Recall", "0.50:0.95", "all", 1),
    "AR10": ("Average Recall", "0.50:0.95", "all", 10),
    "AR100": ("Average Recall", "0.50:0.95", "all", 100),
    "ARs": ("Average Recall", "0.50:0.95", "small", 100),
    "ARm": ("Average Recall", "0.50:0.95", "medium", 100),
    "ARl": ("Average Recall", "0.50:0.95", "large", 100),
}


@contextlib.contextmanager
def quiet(verbose: bool):
    """Swallow pycocotools' progress prints unless ``verbose``."""
    if verbose:
        yield
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def _as_numpy(x) -> np.ndarray:
    """Tensor / array / list -> numpy (``np.asarray`` handles eager tensors)."""
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):
        x = x.numpy()
    return np.asarray(x)


def detections_to_coco_results(
    *,
    image_ids,
    boxes,
    scores,
    classes,
    num_detections,
    image_scales,
    category_ids: Sequence[int],
) -> list[dict]:
    """Converts a batch of detector outputs into COCO results entries.

    Args:
      image_ids: ``[B]`` integer dataset image ids.
      boxes: ``[B, K, 4]`` float ``[ymin, xmin, ymax, xmax]`` in network-input pixels.
      scores: ``[B, K]`` float.
      classes: ``[B, K]`` int contiguous class indices; ``-1`` marks padding. Rows with a
        negative class inside ``num_detections`` are dropped as padding too.
      num_detections: ``[B]`` int, number of valid leading rows per image.
      image_scales: ``[B]`` (or ``[B, 2]`` as ``(scale_y, scale_x)``) network pixels per
        original pixel; boxes are divided by it to get original-image pixels.
      category_ids: contiguous index -> dataset category id.

    Returns:
      A list of ``{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score":
      float}`` with ``bbox`` in original image pixels, plain Python types (JSON-ready).
      Boxes are not clipped to the image (pycocotools does not need it; a detector's
      post-processing already clips to the network input).

    Raises:
      ValueError: on inconsistent shapes or a class index outside ``category_ids``.
    """
    image_ids = _as_numpy(image_ids).reshape(-1)
    boxes = _as_numpy(boxes).astype(np.float64)
    scores = _as_numpy(scores).astype(np.float64)
    classes = _as_numpy(classes).astype(np.int64)
    num_detections = _as_numpy(num_detections).reshape(-1).astype(np.int64)
    image_scales = _as_numpy(image_scales).astype(np.float64)
    category_ids = np.asarray(list(category_ids), dtype=np.int64)

    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"detections: 'boxes' must be [B, K, 4], got shape {boxes.shape}")
    batch, k = boxes.shape[:2]
    for name, arr in (("scores", scores), ("classes", classes)):
        if arr.shape != (batch, k):
            raise ValueError(
                f"detections: '{name}' must be [B, K] = {(batch, k)}, got shape {arr.shape}")
    for name, arr in (("image_ids", image_ids), ("num_detections", num_detections)):
        if arr.shape != (batch,):
            raise ValueError(f"detections: '{name}' must be [B] = [{batch}], got {arr.shape}")
    if image_scales.ndim == 0:
        image_scales = np.full((batch,), float(image_scales))
    if image_scales.ndim == 2 and image_scales.shape[1] == 1:
        image_scales = image_scales[:, 0]
    if image_scales.shape == (batch,):
        scale_y = scale_x = image_scales
    elif image_scales.shape == (batch, 2):
        scale_y, scale_x = image_scales[:, 0], image_scales[:, 1]
    else:
        raise ValueError(
            f"detections: 'image_scales' must be [B] or [B, 2] with B={batch}, "
            f"got shape {image_scales.shape}")
    if np.any(~np.isfinite(image_scales)) or np.any(image_scales <= 0):
        raise ValueError(f"detections: 'image_scales' must be finite and > 0, got {image_scales}")

    valid = (np.arange(k)[None, :] < num_detections[:, None]) & (classes >= 0)
    bad = valid & (classes >= len(category_ids))
    if np.any(bad):
        raise ValueError(
            f"detections: 'classes' holds index {int(classes[bad].max())} but category_ids "
            f"has only {len(category_ids)} entries")

    b_idx, k_idx = np.nonzero(valid)
    sel_boxes = boxes[b_idx, k_idx]  # [M, 4] yxyx network px
    sy = scale_y[b_idx]
    sx = scale_x[b_idx]
    x = sel_boxes[:, 1] / sx
    y = sel_boxes[:, 0] / sy
    w = (sel_boxes[:, 3] - sel_boxes[:, 1]) / sx
    h = (sel_boxes[:, 2] - sel_boxes[:, 0]) / sy
    xywh = np.stack([x, y, w, h], axis=-1).tolist()
    out_image_ids = image_ids[b_idx].astype(np.int64).tolist()
    out_cats = category_ids[classes[b_idx, k_idx]].tolist()
    out_scores = scores[b_idx, k_idx].tolist()
    return [
        {"image_id": i, "category_id": c, "bbox": bb, "score": s}
        for i, c, bb, s in zip(out_image_ids, out_cats, xywh, out_scores)
    ]


def _is_source(obj) -> bool:
    from kerasdet.data.coco import DetectionSource

    return isinstance(obj, DetectionSource)


def load_coco_gt(coco_gt, verbose: bool = False):
    """A pycocotools ``COCO`` from a ``COCO``, a JSON path or a
    :class:`~kerasdet.data.coco.DetectionSource` (its COCO JSON when it was loaded from
    one, else built in memory: :func:`kerasdet.data.convert.coco_ground_truth`).

    Raises :class:`~kerasdet.errors.DataFileNotFoundError` for a missing file and
    :class:`~kerasdet.errors.DataError` for a file that is not COCO JSON.
    """
    from pycocotools.coco import COCO

    if _is_source(coco_gt):
        from kerasdet.data.convert import coco_ground_truth

        coco_gt = coco_ground_truth(coco_gt)
    if isinstance(coco_gt, COCO):
        return coco_gt
    path = os.fspath(coco_gt)
    if not os.path.isfile(path):
        raise DataFileNotFoundError(f"COCO annotation file not found: {path}")
    try:
        with quiet(verbose):
            coco = COCO(path)
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise DataError(f"{path}: not valid JSON ({e})") from None
    except (AssertionError, TypeError, KeyError, AttributeError) as e:  # a list, no "id"
        raise DataError(f"{path}: not a COCO annotation file ({type(e).__name__}: {e})") from None
    for field in ("images", "annotations", "categories"):
        if field not in coco.dataset:
            raise DataError(f"{path}: COCO annotation file has no '{field}' field")
    return coco


def empty_results(coco_gt):
    """A results ``COCO`` object with no detections (``loadRes([])`` would crash)."""
    from pycocotools.coco import COCO

    res = COCO()
    res.dataset = {
        "info": copy.deepcopy(coco_gt.dataset.get("info", {})),
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    with quiet(False):
        res.createIndex()
    return res


def run_cocoeval(
    coco_gt,
    results: list[dict],
    *,
    image_ids: Iterable[int] | None = None,
    iou_type: str = "bbox",
    verbose: bool = False,
) -> dict[str, float]:
    """Runs pycocotools' ``COCOeval`` (loadRes, evaluate, accumulate, summarize).

    Args:
      coco_gt: pycocotools ``COCO`` ground truth, a path to its JSON, or a DetectionSource
        (see :func:`load_coco_gt`).
      results: COCO results entries (not modified: pycocotools' ``loadRes`` mutates its
        input, so a deep copy is handed to it).
      image_ids: restricts ``params.imgIds`` to these images (images without any
        detection count as misses). ``None`` keeps pycocotools' default: every GT image.
      iou_type: only ``"bbox"`` is supported.
      verbose: let pycocotools print its progress and summary.

    Returns:
      ``{key: float}`` for :data:`STAT_KEYS`. pycocotools' ``-1`` (no ground truth in that
      area range) is kept as ``-1``. With no detections at all the stats are computed
      against an empty results set: ``0.0`` wherever ground truth exists.
    """
    from pycocotools.cocoeval import COCOeval

    if iou_type != "bbox":
        raise ValueError(f"iou_type={iou_type!r} is not supported (only 'bbox')")
    coco_gt = load_coco_gt(coco_gt, verbose)
    gt_image_ids = set(coco_gt.getImgIds())
    if image_ids is not None:
        image_ids = sorted({int(i) for i in image_ids})
        if not image_ids:
            raise ValueError("COCO evaluation: no images to evaluate (image_ids is empty)")
        unknown = sorted(set(image_ids) - gt_image_ids)
        if unknown:
            raise DataError(
                f"COCO evaluation: image ids {unknown[:10]} (of {len(unknown)}) are not in "
                "the ground-truth annotation 'images'")
    res_ids = {int(r["image_id"]) for r in results}
    unknown = sorted(res_ids - gt_image_ids)
    if unknown:
        raise DataError(
            f"COCO results: 'image_id' values {unknown[:10]} are not in the ground truth")

    with quiet(verbose):
        if results:
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        else:
            coco_dt = empty_results(coco_gt)
        coco_eval = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if image_ids is not None:
            coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {key: float(v) for key, v in zip(STAT_KEYS, coco_eval.stats)}


def format_table(stats: Mapping[str, float]) -> str:
    """A readable table of the COCO stats (the rows pycocotools' summary prints)."""
    header = f"{'Metric':<8} {'Measure':<18} {'IoU':<10} {'Area':<7} {'MaxDets':>7} {'Value':>8}"
    lines = [header, "-" * len(header)]
    for key in STAT_KEYS:
        if key not in stats:
            continue
        measure, iou, area, max_dets = _STAT_DESCRIPTIONS[key]
        value = float(stats[key])
        shown = "   n/a" if value < 0 else f"{value:8.4f}"
        lines.append(
            f"{key:<8} {measure:<18} {iou:<10} {area:<7} {max_dets:>7} {shown:>8}")
    return "\n".join(lines)


class CocoEvaluator:
    """Accumulates batched detections and scores them with pycocotools.

    Usage::

        evaluator = CocoEvaluator("instances_val.json", category_ids=loader.category_ids)
        for images, labels in dataset:
            out = model.predict_on_batch(images)
            evaluator.update(labels["image_id"], out["boxes"], out["scores"],
                             out["classes"], out["num_detections"], labels["image_scale"])
        stats = evaluator.evaluate()
        print(format_table(stats))

    Only the images passed to :meth:`update` are scored (``params.imgIds``), so evaluating
    a subset of a split is meaningful; an image passed with zero detections counts as all
    misses.

    Args:
      coco_gt: pycocotools ``COCO``, the path to a COCO annotation JSON, or a
        :class:`~kerasdet.data.coco.DetectionSource` (see :func:`load_coco_gt`: a VOC
        source is scored against an in-memory COCO with difficult objects as crowds).
      category_ids: contiguous class index -> dataset category id. Every id must be a
        category of ``coco_gt``; default (``None``) the source's ``category_ids``
        (required when ``coco_gt`` is not a source). AP is averaged over all GT
        categories (pycocotools' default), as the official COCO numbers are.
      iou_type: ``"bbox"`` (the only supported type).
    """

    def __init__(self, coco_gt, *, category_ids: Sequence[int] | None = None,
                 iou_type: str = "bbox"):
        if iou_type != "bbox":
            raise ValueError(f"iou_type={iou_type!r} is not supported (only 'bbox')")
        if category_ids is None:
            if not _is_source(coco_gt):
                raise ValueError("CocoEvaluator: category_ids is required unless coco_gt "
                                 "is a DetectionSource")
            category_ids = coco_gt.category_ids
        self.coco_gt = load_coco_gt(coco_gt)
        self.category_ids = [int(c) for c in category_ids]
        if not self.category_ids:
            raise ValueError("category_ids is empty")
        gt_cats = set(self.coco_gt.getCatIds())
        unknown = sorted(set(self.category_ids) - gt_cats)
        if unknown:
            raise DataError(
                f"category_ids {unknown} are not in the ground truth 'categories' "
                f"(which has ids {sorted(gt_cats)[:20]}...)")
        self.iou_type = iou_type
        self.reset()

    def reset(self) -> None:
        """Forgets every accumulated detection and image id."""
        self.results: list[dict] = []
        self.image_ids: set[int] = set()

    def update(self, image_ids, boxes, scores, classes, num_detections, image_scales) -> None:
        """Adds one batch (see :func:`detections_to_coco_results` for the formats)."""
        self.results.extend(
            detections_to_coco_results(
                image_ids=image_ids,
                boxes=boxes,
                scores=scores,
                classes=classes,
                num_detections=num_detections,
                image_scales=image_scales,
                category_ids=self.category_ids,
            ))
        self.image_ids.update(int(i) for i in _as_numpy(image_ids).reshape(-1))

    def write_results(self, path) -> str:
        """Writes the accumulated results as a COCO results JSON; returns the path."""
        path = os.fspath(path)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.results, f)
        return path

    def evaluate(self, verbose: bool = False) -> dict[str, float]:
        """Scores the accumulated detections on the images seen so far.

        Returns the 12 stats of :data:`STAT_KEYS` (``-1`` where pycocotools has no ground
        truth for an area range). Raises ``ValueError`` if :meth:`update` was never called.
        """
        if not self.image_ids:
            raise ValueError("CocoEvaluator.evaluate: no images were added with update()")
        return run_cocoeval(
            self.coco_gt,
            self.results,
            image_ids=self.image_ids,
            iou_type=self.iou_type,
            verbose=verbose,
        )

    format_table = staticmethod(format_table)


def evaluate_results_file(
    annotation_file,
    results_file,
    *,
    image_ids: Iterable[int] | None = None,
    verbose: bool = False,
) -> dict[str, float]:
    """Scores a COCO results JSON against a COCO annotation JSON.

    ``image_ids=None`` evaluates every image of the annotation file (pycocotools'
    default); pass the ids actually run to score a subset. An empty results list is
    scored as no detections (zeros), not a crash.
    """
    results_file = os.fspath(results_file)
    if not os.path.isfile(results_file):
        raise DataFileNotFoundError(f"COCO results file not found: {results_file}")
    with open(results_file) as f:
        try:
            results = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{results_file}: not valid JSON ({e})") from None
    if not isinstance(results, list):
        raise DataError(f"{results_file}: a COCO results file must hold a JSON list")
    for k, entry in enumerate(results):
        if not isinstance(entry, dict):
            raise DataError(f"{results_file}: results[{k}] must be an object")
        for field in ("image_id", "category_id", "bbox", "score"):
            if field not in entry:
                raise DataError(f"{results_file}: results[{k}] has no '{field}' field")
    return run_cocoeval(
        annotation_file, results, image_ids=image_ids, verbose=verbose)


__all__ = [
    "STAT_KEYS",
    "CocoEvaluator",
    "detections_to_coco_results",
    "empty_results",
    "evaluate_results_file",
    "format_table",
    "load_coco_gt",
    "quiet",
    "run_cocoeval",
]
