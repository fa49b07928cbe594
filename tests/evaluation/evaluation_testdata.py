"""Test data for tests/evaluation: a tiny COCO ground truth and a direct pycocotools
reference (no kerasdet code on the reference path)."""
import contextlib
import copy
import io

import keras
import numpy as np
import tensorflow as tf

# Sparse dataset ids, as COCO has; contiguous index c -> CATEGORY_IDS[c].
CATEGORY_IDS = [3, 7, 15]

# Original image sizes (width, height).
IMAGES = {11: (640, 480), 22: (320, 240), 33: (500, 400), 44: (200, 160)}

# (image_id, category_id, [x, y, w, h] original px, iscrowd). Areas: small < 32^2 = 1024,
# medium < 96^2 = 9216, large above. Image 44 has no objects.
ANNOTATIONS = [
    (11, 3, [10.0, 20.0, 200.0, 150.0], 0),   # large (30000)
    (11, 7, [300.0, 40.0, 60.0, 50.0], 0),    # medium (3000)
    (11, 15, [500.0, 300.0, 20.0, 16.0], 0),  # small (320)
    (11, 7, [400.0, 200.0, 120.0, 100.0], 1),  # crowd region
    (22, 3, [30.0, 30.0, 80.0, 60.0], 0),     # medium (4800)
    (22, 3, [200.0, 100.0, 24.0, 30.0], 0),   # small (720)
    (22, 15, [100.0, 120.0, 150.0, 100.0], 0),  # large (15000)
    (33, 7, [50.0, 60.0, 250.0, 200.0], 0),   # large (50000)
    (33, 15, [400.0, 300.0, 40.0, 36.0], 0),  # medium (1440)
]


def make_gt_dict():
    images = [{"id": i, "width": w, "height": h, "file_name": f"{i}.jpg"}
              for i, (w, h) in IMAGES.items()]
    anns = []
    for n, (image_id, cat, (x, y, w, h), crowd) in enumerate(ANNOTATIONS, start=1):
        anns.append({
            "id": n, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h],
            "area": w * h, "iscrowd": crowd,
            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
        })
    cats = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in CATEGORY_IDS]
    return {"info": {}, "images": images, "annotations": anns, "categories": cats}


def perfect_results():
    """One exact detection per non-crowd GT box (original px, dataset ids)."""
    return [{"image_id": i, "category_id": c, "bbox": list(b), "score": 0.9}
            for i, c, b, crowd in ANNOTATIONS if not crowd]


def perturbed_results(seed=0):
    """Jittered boxes, varied scores, false positives and a wrong class; coordinates are
    multiples of 0.25 so they survive float32 and power-of-two scaling exactly."""
    rng = np.random.default_rng(seed)
    out = []
    for i, c, (x, y, w, h), crowd in ANNOTATIONS:
        jit = rng.integers(-12, 13, size=4) * 0.25 * (1 + w / 100.0 // 1)
        box = [x + jit[0], y + jit[1], max(w + jit[2], 2.0), max(h + jit[3], 2.0)]
        out.append({"image_id": i, "category_id": c, "bbox": [float(v) for v in box],
                    "score": float(rng.integers(1, 100) / 100)})
        # a duplicate at lower score, a false positive elsewhere
        out.append({"image_id": i, "category_id": c,
                    "bbox": [x + 2.0, y + 1.0, w * 0.75, h],
                    "score": float(rng.integers(1, 100) / 100)})
        out.append({"image_id": i, "category_id": CATEGORY_IDS[int(rng.integers(0, 3))],
                    "bbox": [float(rng.integers(0, 100)), float(rng.integers(0, 100)),
                             30.0, 40.0],
                    "score": float(rng.integers(1, 100) / 100)})
    return out


def direct_cocoeval(gt_path, results, image_ids=None):
    """pycocotools used exactly as its README does (reference path)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats]




def to_network_batch(results, image_ids, scales, max_detections=16):
    """COCO results (original px, dataset ids) -> a detector's batched predict output for
    ``image_ids`` (yxyx network px = original * scale, contiguous classes, padded with -1).
    Written with plain loops on purpose: an independent path from the package's code."""
    b = len(image_ids)
    boxes = np.zeros((b, max_detections, 4), np.float32)
    scores = np.zeros((b, max_detections), np.float32)
    classes = np.full((b, max_detections), -1, np.int32)
    num = np.zeros((b,), np.int32)
    for row, (image_id, scale) in enumerate(zip(image_ids, scales)):
        mine = [r for r in results if r["image_id"] == image_id]
        assert len(mine) <= max_detections
        for k, r in enumerate(mine):
            x, y, w, h = r["bbox"]
            boxes[row, k] = [y * scale, x * scale, (y + h) * scale, (x + w) * scale]
            scores[row, k] = r["score"]
            classes[row, k] = CATEGORY_IDS.index(r["category_id"])
        num[row] = len(mine)
    return {"boxes": boxes, "scores": scores, "classes": classes, "num_detections": num}


class LookupDetector(keras.Model):
    """A fake detector: the image id is written in pixel (0, 0, 0) and the detections are
    looked up by it (fixed, deterministic), with one trainable scalar so `fit` runs."""

    def __init__(self, table):
        super().__init__()
        self._table = {k: np.asarray(v) for k, v in table.items()}
        self.w = self.add_weight(shape=(), initializer="zeros", name="w")

    def call(self, images, training=False):
        return tf.reduce_mean(images, axis=[1, 2, 3]) * self.w

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return tf.square(self.w - 1.0) + 0.0 * tf.reduce_sum(y_pred)

    def predict_step(self, data):
        images = data[0] if isinstance(data, (tuple, list)) else data
        ids = tf.cast(images[:, 0, 0, 0], tf.int32)
        return {k: tf.gather(tf.constant(v), ids) for k, v in self._table.items()}
