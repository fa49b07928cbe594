"""COCO-style box and mask evaluation through pycocotools.

The scoring itself is pycocotools' ``COCOeval`` (the reference implementation of the COCO
metrics: "Detecting Common Objects in Context", T.-Y. Lin, Cornell 2017, chapter 2: crowd
regions are ignored, §2.4.3; instances are scored by their segmentation masks as well as
by boxes, §2.7); this module only converts a detector's batched ``predict`` output into
COCO results entries and drives ``COCOeval`` quietly.

Conventions (see the package README):

* A detector's ``predict`` output is ``{"boxes": [B, K, 4] yxyx in network-input pixels,
  "scores": [B, K], "classes": [B, K] int32 contiguous (-1 = padding), "num_detections":
  [B]}``; the first ``num_detections[b]`` rows of image ``b`` are valid.
* ``image_scales`` are *network pixels per original pixel* (what a loader applied when it
  resized the image): ``original = network / scale``. A scale may be one number per image
  (``[B]``, aspect-preserving resize) or a ``(scale_y, scale_x)`` pair (``[B, 2]``).
* ``category_ids`` maps a contiguous class index to the dataset's own category id
  (``category_ids[c]``), e.g. COCO's sparse ids 1..90.
* Masks (``iou_type="segm"``): ``predict``'s ``"masks"`` ``[B, K, H, W]`` (0/1 or
  probabilities) on the network canvas, row ``k`` the mask of detection ``k``. The image
  occupies the canvas' top-left ``round(h * scale_y) x round(w * scale_x)`` pixels (the
  loaders' resize, then padding bottom/right); that region is resized back to the
  original ``h x w`` (from the ground truth's ``images`` entry) bilinearly with
  half-pixel centres (OpenCV ``INTER_LINEAR``, what ``tf.image.resize`` does) and
  binarized at ``>= 0.5`` (:func:`canvas_masks_to_original`), then RLE-encoded with
  ``pycocotools.mask.encode`` (``counts`` as ``str``, JSON-ready). The segm results carry
  no ``bbox`` when scored: ``loadRes`` would take a result's area from its box otherwise,
  and the small/medium/large split of mask AP must use the mask's area.
* Stat names: box stats are :data:`STAT_KEYS` (``AP``, ``AP50``, ...), mask stats the same
  names prefixed ``mask_`` (:data:`MASK_STAT_KEYS`: ``mask_AP``, ``mask_AP50``, ...).
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

#: Prefix of the stats of ``iou_type="segm"`` (mask AP): ``mask_AP``, ``mask_AP50``, ...
MASK_PREFIX = "mask_"
#: The 12 ``COCOeval.summarize`` numbers of ``iou_type="segm"``, in its order.
MASK_STAT_KEYS = tuple(MASK_PREFIX + k for k in STAT_KEYS)
#: The IoU types :class:`CocoEvaluator` scores (pycocotools' ``iouType``).
IOU_TYPES = ("bbox", "segm")

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


#: key -> (measure, IoU, area, maxDets) of every row :func:`format_table` knows; other
#: modules (proposal recall) add theirs with :func:`register_stat_descriptions`.
STAT_DESCRIPTIONS = dict(_STAT_DESCRIPTIONS)
STAT_DESCRIPTIONS.update({
    MASK_PREFIX + k: ("Mask " + measure, iou, area, max_dets)
    for k, (measure, iou, area, max_dets) in _STAT_DESCRIPTIONS.items()})


def register_stat_descriptions(descriptions: Mapping[str, tuple]) -> None:
    """Adds ``{key: (measure, IoU, area, maxDets)}`` rows to :func:`format_table`."""
    STAT_DESCRIPTIONS.update(descriptions)


def iou_types_of(iou_type) -> tuple:
    """``"bbox"``, ``"segm"`` or a sequence of them -> a tuple in :data:`IOU_TYPES` order
    (``ValueError`` otherwise)."""
    given = (iou_type,) if isinstance(iou_type, str) else tuple(iou_type)
    bad = [t for t in given if t not in IOU_TYPES]
    if bad or not given:
        raise ValueError(f"iou_type must be 'bbox', 'segm' or a sequence of them, got {iou_type!r}")
    return tuple(t for t in IOU_TYPES if t in given)


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
    masks=None,
    image_sizes=None,
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
      masks: default ``None`` (boxes only); else ``[B, K, H, W]`` masks on the network
        canvas (0/1 or probabilities), encoded per valid row at the original image size
        (:func:`canvas_masks_to_original`, then ``pycocotools.mask.encode``).
      image_sizes: ``[B, 2]`` original ``(height, width)`` of each image; required with
        ``masks`` (default ``None``).

    Returns:
      A list of ``{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score":
      float}`` with ``bbox`` in original image pixels, plain Python types (JSON-ready);
      with ``masks`` each entry also has ``"segmentation"``: an RLE ``{"size": [h, w],
      "counts": str}`` at the original size.
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
    results = [
        {"image_id": i, "category_id": c, "bbox": bb, "score": s}
        for i, c, bb, s in zip(out_image_ids, out_cats, xywh, out_scores)
    ]
    if masks is not None:
        for entry, rle in zip(results, _encode_masks(masks, image_sizes, b_idx, k_idx,
                                                     scale_y, scale_x, batch, k)):
            entry["segmentation"] = rle
    return results


def canvas_masks_to_original(masks, *, scale_y: float, scale_x: float, height: int,
                             width: int, threshold: float = 0.5) -> np.ndarray:
    """One image's canvas masks -> binary masks at its original size.

    Args:
      masks: ``[N, H, W]`` masks on the network canvas (0/1 or probabilities).
      scale_y, scale_x: network pixels per original pixel of the image.
      height, width: the original image size.
      threshold: a pixel is in the mask where the resized value is ``>= threshold``
        (default 0.5).

    Returns:
      uint8 ``[height, width, N]`` 0/1 in Fortran order (what ``pycocotools.mask.encode``
      takes). The image's region of the canvas, its top-left ``round(height * scale_y) x
      round(width * scale_x)`` pixels (clipped to the canvas), is resized to ``(height,
      width)`` bilinearly with half-pixel centres (OpenCV ``INTER_LINEAR``); an exactly
      nearest-upsampled mask comes back exactly.
    """
    import cv2

    masks = np.asarray(masks, np.float32)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {masks.shape}")
    n, canvas_h, canvas_w = masks.shape
    height, width = int(height), int(width)
    vh = min(canvas_h, max(1, int(round(height * float(scale_y)))))
    vw = min(canvas_w, max(1, int(round(width * float(scale_x)))))
    out = np.zeros((height, width, n), np.uint8, order="F")
    for j in range(n):
        region = masks[j, :vh, :vw]
        if region.shape != (height, width):
            region = cv2.resize(region, (width, height), interpolation=cv2.INTER_LINEAR)
        out[:, :, j] = region >= threshold
    return out


def _encode_masks(masks, image_sizes, b_idx, k_idx, scale_y, scale_x, batch, k):
    """RLEs (``counts`` as str) of the selected rows ``(b_idx, k_idx)``, in their order."""
    from pycocotools import mask as mask_utils

    masks = _as_numpy(masks)
    if masks.ndim != 4 or masks.shape[:2] != (batch, k):
        raise ValueError(
            f"detections: 'masks' must be [B, K, H, W] with (B, K) = {(batch, k)}, got "
            f"shape {masks.shape}")
    if image_sizes is None:
        raise ValueError("detections: 'image_sizes' (original (height, width) per image) is "
                         "required with 'masks'")
    image_sizes = _as_numpy(image_sizes).astype(np.int64).reshape(batch, 2)
    rles = []
    for b in np.unique(b_idx):
        rows = k_idx[b_idx == b]
        binary = canvas_masks_to_original(
            masks[b, rows], scale_y=scale_y[b], scale_x=scale_x[b],
            height=image_sizes[b, 0], width=image_sizes[b, 1])
        for rle in mask_utils.encode(binary):
            rles.append({"size": [int(v) for v in rle["size"]],
                         "counts": rle["counts"].decode("ascii")})
    return rles


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


def check_segmentations(coco_gt, image_ids=None) -> None:
    """:class:`~kerasdet.errors.DataError` naming the first ground-truth annotation (of
    ``image_ids``, default all) without a usable ``segmentation`` (``iou_type="segm"``
    scores masks, so box-only ground truth cannot be scored)."""
    ids = coco_gt.getAnnIds(imgIds=sorted(image_ids)) if image_ids is not None \
        else coco_gt.getAnnIds()
    for ann in coco_gt.loadAnns(ids):
        segm = ann.get("segmentation")
        if not segm or (isinstance(segm, dict) and "counts" not in segm):
            raise DataError(
                f"COCO segm evaluation: ground-truth annotation {ann.get('id')} (image "
                f"{ann.get('image_id')}) has no 'segmentation'; mask AP needs instance masks")


def coco_evaluate(
    coco_gt,
    results: list[dict],
    *,
    image_ids: Iterable[int] | None = None,
    iou_type: str = "bbox",
    use_cats: bool = True,
    max_dets: Sequence[int] | None = None,
    summarize: bool = True,
    verbose: bool = False,
):
    """pycocotools' ``COCOeval`` after ``evaluate``, ``accumulate`` and ``summarize``.

    Args:
      coco_gt: pycocotools ``COCO`` ground truth, a path to its JSON, or a DetectionSource
        (see :func:`load_coco_gt`).
      results: COCO results entries (not modified: pycocotools' ``loadRes`` mutates its
        input, so a deep copy is handed to it). ``iou_type="segm"`` needs a
        ``"segmentation"`` in each; their ``"bbox"`` is dropped from the copy (the
        result's area is then its mask's, see the module docstring).
      image_ids: restricts ``params.imgIds`` to these images (images without any
        detection count as misses). ``None`` keeps pycocotools' default: every GT image.
      iou_type: ``"bbox"`` (default) or ``"segm"``.
      use_cats: ``params.useCats`` (default True; False: class-agnostic, every result
        may match every ground-truth object of its image, as for proposals).
      max_dets: ``params.maxDets`` (default ``None``: pycocotools' ``[1, 10, 100]``).
      summarize: also run ``summarize()`` (default True; it fills ``.stats`` and needs
        at least three ``maxDets``).
      verbose: let pycocotools print its progress and summary.

    Returns:
      The ``COCOeval`` object (``.eval["precision"]``, ``.eval["recall"]``, ``.stats``).
      With no detections at all it is run against an empty results set.
    """
    from pycocotools.cocoeval import COCOeval

    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
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
    results = copy.deepcopy(results)
    if iou_type == "segm":
        check_segmentations(coco_gt, image_ids)
        for k, r in enumerate(results):
            if "segmentation" not in r:
                raise ValueError(f"COCO segm evaluation: results[{k}] has no 'segmentation'")
            r.pop("bbox", None)

    with quiet(verbose):
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:
            coco_dt = empty_results(coco_gt)
        coco_eval = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if image_ids is not None:
            coco_eval.params.imgIds = image_ids
        coco_eval.params.useCats = int(bool(use_cats))
        if max_dets is not None:
            coco_eval.params.maxDets = [int(m) for m in max_dets]
        coco_eval.evaluate()
        coco_eval.accumulate()
        if summarize:
            coco_eval.summarize()
    return coco_eval


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
      results: COCO results entries (not modified; see :func:`coco_evaluate`).
      image_ids: restricts ``params.imgIds`` to these images (images without any
        detection count as misses). ``None`` keeps pycocotools' default: every GT image.
      iou_type: ``"bbox"`` (default) or ``"segm"`` (mask AP: each result needs a
        ``"segmentation"``, each ground-truth annotation one too).
      verbose: let pycocotools print its progress and summary.

    Returns:
      ``{key: float}`` for :data:`STAT_KEYS` (``"bbox"``) or :data:`MASK_STAT_KEYS`
      (``"segm"``). pycocotools' ``-1`` (no ground truth in that area range) is kept as
      ``-1``. With no detections at all the stats are computed against an empty results
      set: ``0.0`` wherever ground truth exists.
    """
    coco_eval = coco_evaluate(coco_gt, results, image_ids=image_ids, iou_type=iou_type,
                              verbose=verbose)
    keys = MASK_STAT_KEYS if iou_type == "segm" else STAT_KEYS
    return {key: float(v) for key, v in zip(keys, coco_eval.stats)}


def format_table(stats: Mapping[str, float]) -> str:
    """A readable table of the COCO stats (the rows pycocotools' summary prints), in the
    order of ``stats``; keys without a :data:`STAT_DESCRIPTIONS` row are left out."""
    keys = [k for k in stats if k in STAT_DESCRIPTIONS]
    kw = max([8] + [len(k) for k in keys])
    mw = max([18] + [len(STAT_DESCRIPTIONS[k][0]) for k in keys])
    header = (f"{'Metric':<{kw}} {'Measure':<{mw}} {'IoU':<10} {'Area':<7} {'MaxDets':>7} "
              f"{'Value':>8}")
    lines = [header, "-" * len(header)]
    for key in keys:
        measure, iou, area, max_dets = STAT_DESCRIPTIONS[key]
        value = float(stats[key])
        shown = "   n/a" if value < 0 else f"{value:8.4f}"
        lines.append(
            f"{key:<{kw}} {measure:<{mw}} {iou:<10} {area:<7} {max_dets:>7} {shown:>8}")
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

    With ``iou_type="segm"`` (or ``("bbox", "segm")``) :meth:`update` also takes
    ``masks=out["masks"]`` (``[B, K, H, W]`` on the canvas), encoded as RLE at each
    image's original size (module docstring; sizes from the ground truth's ``images``).

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
      iou_type: ``"bbox"`` (default: box AP, :data:`STAT_KEYS`), ``"segm"`` (mask AP,
        :data:`MASK_STAT_KEYS`) or ``("bbox", "segm")`` (both, one set of detections).
        ``"segm"`` needs a ``segmentation`` on every ground-truth annotation.

    Attributes:
      needs_masks: True when :meth:`update` must be given ``masks`` (``"segm"`` scored).
    """

    def __init__(self, coco_gt, *, category_ids: Sequence[int] | None = None,
                 iou_type="bbox"):
        self.iou_types = iou_types_of(iou_type)
        if category_ids is None:
            if not _is_source(coco_gt):
                raise ValueError(f"{type(self).__name__}: category_ids is required unless "
                                 "coco_gt is a DetectionSource")
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
        if "segm" in self.iou_types:
            check_segmentations(self.coco_gt)
        self.iou_type = iou_type if isinstance(iou_type, str) else self.iou_types
        self.reset()

    @property
    def needs_masks(self) -> bool:
        return "segm" in self.iou_types

    def reset(self) -> None:
        """Forgets every accumulated detection and image id."""
        self.results: list[dict] = []
        self.image_ids: set[int] = set()

    def image_sizes(self, image_ids) -> np.ndarray:
        """``[B, 2]`` original ``(height, width)`` of ``image_ids`` from the ground truth."""
        ids = _as_numpy(image_ids).reshape(-1)
        try:
            infos = [self.coco_gt.imgs[int(i)] for i in ids]
        except KeyError as e:
            raise DataError(f"COCO evaluation: image id {e.args[0]} is not in the ground "
                            "truth 'images'") from None
        return np.array([[int(im["height"]), int(im["width"])] for im in infos], np.int64)

    def update(self, image_ids, boxes, scores, classes, num_detections, image_scales, *,
               masks=None) -> None:
        """Adds one batch (see :func:`detections_to_coco_results` for the formats);
        ``masks`` (default ``None``) is required when :attr:`needs_masks` and ignored
        otherwise."""
        if self.needs_masks and masks is None:
            raise ValueError(f"{type(self).__name__}(iou_type={self.iou_type!r}).update: "
                             "'masks' are required (the model's predict 'masks')")
        with_masks = masks is not None and self.needs_masks
        self.results.extend(
            detections_to_coco_results(
                image_ids=image_ids,
                boxes=boxes,
                scores=scores,
                classes=classes,
                num_detections=num_detections,
                image_scales=image_scales,
                category_ids=self.category_ids,
                masks=masks if with_masks else None,
                image_sizes=self.image_sizes(image_ids) if with_masks else None,
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

        Returns the 12 stats of :data:`STAT_KEYS` per box type and/or of
        :data:`MASK_STAT_KEYS` (``-1`` where pycocotools has no ground truth for an area
        range). Raises ``ValueError`` if :meth:`update` was never called.
        """
        if not self.image_ids:
            raise ValueError(f"{type(self).__name__}.evaluate: no images were added with "
                             "update()")
        stats = {}
        for iou_type in self.iou_types:
            stats.update(run_cocoeval(
                self.coco_gt,
                self.results,
                image_ids=self.image_ids,
                iou_type=iou_type,
                verbose=verbose,
            ))
        return stats

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
    "IOU_TYPES",
    "MASK_PREFIX",
    "MASK_STAT_KEYS",
    "STAT_DESCRIPTIONS",
    "STAT_KEYS",
    "CocoEvaluator",
    "canvas_masks_to_original",
    "check_segmentations",
    "coco_evaluate",
    "detections_to_coco_results",
    "iou_types_of",
    "register_stat_descriptions",
    "empty_results",
    "evaluate_results_file",
    "format_table",
    "load_coco_gt",
    "quiet",
    "run_cocoeval",
]
