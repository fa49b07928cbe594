"""Hand-made ground truth with instance masks, and detections with masks on a network
canvas, for the segm and proposal-recall tests. The reference path (``direct_*``) uses
pycocotools only, on masks built at the original size (no kerasdet code).

Images (width, height) and scales (network px per original px): image 1 at scale 2
(its canvas masks are the original ones upsampled 2x by pixel repetition), image 2 at
scale 0.5 (every mask is made of aligned 2x2 blocks, so subsampling it is lossless and
bilinear upsampling with half-pixel centres gives it back), image 3 at scale 1 and
without objects. The canvas (248 x 328) is larger than every image's region; its padding
carries junk mask pixels that must not count.
"""
import contextlib
import copy
import io
import json

import numpy as np

CATEGORY_IDS = [3, 7]
IMAGES = {1: (160, 120), 2: (128, 96), 3: (64, 48)}  # id: (width, height)
SCALES = {1: 2.0, 2: 0.5, 3: 1.0}
CANVAS = (248, 328)  # (H, W)


def _blank(image_id):
    w, h = IMAGES[image_id]
    return np.zeros((h, w), np.uint8)


def _rect(image_id, x0, y0, x1, y1):
    m = _blank(image_id)
    m[y0:y1, x0:x1] = 1
    return m


def _ellipse(image_id, cx, cy, rx, ry):
    m = _blank(image_id)
    yy, xx = np.mgrid[:m.shape[0], :m.shape[1]]
    m[((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1.0] = 1
    return m


def gt_objects():
    """``[(image_id, category_id, mask [h, w] uint8, iscrowd)]``; areas (pixels): small <
    1024 <= medium < 9216 <= large."""
    ring = _rect(1, 5, 10, 115, 112)
    ring[40:70, 40:70] = 0                                        # large (10320)
    l_shape = _rect(2, 10, 20, 50, 60)
    l_shape[20:40, 30:50] = 0                                     # medium (1200), 2x2 blocks
    crowd = _rect(1, 118, 78, 160, 120)
    crowd[100:120, 140:160] = 0                                   # crowd region, as RLE
    return [
        (1, 3, ring, 0),
        (1, 7, _ellipse(1, 130, 40, 20, 25), 0),                  # medium (~1570)
        (1, 7, _rect(1, 60, 90, 80, 102), 0),                     # small (240)
        (1, 3, crowd, 1),
        (2, 3, l_shape, 0),
        (2, 7, _rect(2, 80, 10, 92, 20), 0),                      # small (120)
        (2, 3, _rect(2, 60, 40, 124, 94), 0),                     # medium (3456)
    ]


def uncompressed_rle(mask):
    """COCO's uncompressed RLE (what crowd annotations use): run lengths of the
    column-major flattening, starting with zeros."""
    flat = np.asarray(mask, np.uint8).flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def encode(mask):
    """Compressed RLE with str counts (JSON-ready), pycocotools only."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def make_gt_dict():
    from pycocotools import mask as mask_utils

    images = [{"id": i, "width": w, "height": h, "file_name": f"{i}.png"}
              for i, (w, h) in IMAGES.items()]
    anns = []
    for n, (image_id, cat, mask, crowd) in enumerate(gt_objects(), start=1):
        segm = uncompressed_rle(mask) if crowd else encode(mask)
        rle = mask_utils.encode(np.asfortranarray(mask))
        anns.append({"id": n, "image_id": image_id, "category_id": cat,
                     "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                     "area": float(mask.sum()), "iscrowd": crowd, "segmentation": segm})
    cats = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in CATEGORY_IDS]
    return {"info": {}, "images": images, "annotations": anns, "categories": cats}


def write_gt(path):
    path.write_text(json.dumps(make_gt_dict()))
    return path


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()),
            float(ys.max() + 1 - ys.min())]


def detections(seed=0, extra=0):
    """``[(image_id, category_id, mask [h, w] at the original size, score)]``: perturbed
    copies of the objects, a duplicate, detections on the crowd region and on the empty
    image, a wrong class; ``extra`` more random rectangles per image (proposal tests).
    Scores are multiples of 1/1024 (exact in float32); image 2's masks are 2x2-blocky."""
    rng = np.random.default_rng(seed)
    out = []
    for image_id, cat, mask, crowd in gt_objects():
        m = mask.copy()
        if image_id == 1:  # shift by a few pixels
            m = np.roll(m, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
        else:  # drop a 2x2-aligned band: still blocky
            ys = np.nonzero(m.any(axis=1))[0]
            m[ys[0]:ys[0] + 2 * int(rng.integers(0, 3))] = 0
        if m.any():
            out.append((image_id, cat, m, None))
        if not crowd:
            dup = np.zeros_like(mask)
            ys, xs = np.nonzero(mask)
            y0, x0 = (ys.min() // 2) * 2, (xs.min() // 2) * 2
            dup[y0:y0 + 8, x0:x0 + 8] = 1  # a poor duplicate
            out.append((image_id, cat, dup, None))
    out.append((1, 7, _rect(1, 20, 20, 40, 30), None))    # wrong place, class 7
    out.append((3, 3, _rect(3, 10, 10, 30, 30), None))    # on the image without objects
    out.append((2, 7, _rect(2, 10, 20, 50, 60), None))    # right place, wrong class
    for image_id in IMAGES:
        w, h = IMAGES[image_id]
        for _ in range(extra):
            x0, y0 = 2 * int(rng.integers(0, w // 2 - 4)), 2 * int(rng.integers(0, h // 2 - 4))
            x1 = min(w, x0 + 2 * int(rng.integers(2, w // 4)))
            y1 = min(h, y0 + 2 * int(rng.integers(2, h // 4)))
            out.append((image_id, CATEGORY_IDS[int(rng.integers(0, 2))],
                        _rect(image_id, x0, y0, x1, y1), None))
    scores = rng.permutation(len(out)) + 1
    return [(i, c, m, float(s) / 1024.0) for (i, c, m, _), s in zip(out, scores)]


def to_canvas(mask, image_id):
    """An original-size mask on the network canvas (exact, see the module docstring)."""
    s = SCALES[image_id]
    if s == 2.0:
        small = np.kron(mask, np.ones((2, 2), np.uint8))
    elif s == 0.5:
        small = mask[::2, ::2]
    else:
        small = mask
    canvas = np.zeros(CANVAS, np.float32)
    canvas[:small.shape[0], :small.shape[1]] = small
    canvas[-6:, -9:] = 1.0  # junk in the padding
    return canvas


def to_network_batch(dets, image_ids, max_detections, with_masks=True):
    """Detections -> a detector's batched ``predict`` output with ``masks`` (plain loops,
    independent of the package)."""
    b = len(image_ids)
    out = {"boxes": np.zeros((b, max_detections, 4), np.float32),
           "scores": np.zeros((b, max_detections), np.float32),
           "classes": np.full((b, max_detections), -1, np.int32),
           "num_detections": np.zeros((b,), np.int32),
           "masks": np.zeros((b, max_detections) + (CANVAS if with_masks else (1, 1)),
                             np.float32)}
    for row, image_id in enumerate(image_ids):
        mine = [d for d in dets if d[0] == image_id]
        assert len(mine) <= max_detections
        s = SCALES.get(image_id, 1.0)
        for k, (_, cat, mask, score) in enumerate(mine):
            x, y, w, h = _bbox(mask)
            out["boxes"][row, k] = [y * s, x * s, (y + h) * s, (x + w) * s]
            out["scores"][row, k] = score
            out["classes"][row, k] = CATEGORY_IDS.index(cat)
            if with_masks:
                out["masks"][row, k] = to_canvas(mask, image_id)
        out["num_detections"][row] = len(mine)
        # rows past num_detections are garbage that must be ignored
        out["classes"][row, len(mine):] = 0
        out["masks"][row, len(mine):] = 1.0
    return out


def reference_results(dets, iou_type):
    """COCO results at the original size, as pycocotools' README writes them."""
    if iou_type == "segm":
        return [{"image_id": i, "category_id": c, "segmentation": encode(m), "score": s}
                for i, c, m, s in dets]
    return [{"image_id": i, "category_id": c, "bbox": _bbox(m), "score": s}
            for i, c, m, s in dets]


def direct_cocoeval(gt_path, results, iou_type, *, image_ids=None, use_cats=True,
                    max_dets=None):
    """pycocotools used directly: ``summarize()``'s 12 stats."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, iou_type)
        ev.params.imgIds = sorted(image_ids or IMAGES)
        ev.params.useCats = int(use_cats)
        if max_dets is not None:
            ev.params.maxDets = list(max_dets)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]
