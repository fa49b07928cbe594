"""Shared fixtures for the kerasdet.data tests: a tiny digits set and a tiny COCO set."""
import json
import os

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from kerasdet.data.digits import generate_digits

#: Small but representative digits configuration (fast: well under a second).
DIGITS_KWARGS = dict(num_train=24, num_val=8, image_size=(64, 80), min_digits=1,
                     max_digits=4, scale_range=(0.8, 1.4), max_iou=0.2, seed=0)


@pytest.fixture(scope="session")
def digits_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    return generate_digits(str(root), **DIGITS_KWARGS)


def write_image(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), array), path
    return str(path)


def make_tiny_coco(root, *, annotations=None, images=None, categories=None, extra=None):
    """A tiny COCO set under ``root``; returns (annotation_file, image_dir).

    Images (BGR on disk): 1 = 40x60 colour, 2 = 30x50 grey, 3 = 20x20 RGBA,
    4 = 24x32 16-bit grey, 5 = 40x60 colour with no annotations.
    Categories have sparse ids 3 ("cat"), 7 ("dog"), 12 ("emu").
    """
    image_dir = os.path.join(root, "images")
    rng = np.random.default_rng(0)
    pixels = lambda *shape: rng.integers(0, 255, shape, dtype=np.uint8)  # noqa: E731
    write_image(os.path.join(image_dir, "a.png"), pixels(40, 60, 3))
    write_image(os.path.join(image_dir, "grey.png"), pixels(30, 50))
    write_image(os.path.join(image_dir, "rgba.png"), pixels(20, 20, 4))
    deep = rng.integers(0, 65535, (24, 32), dtype=np.uint16)
    write_image(os.path.join(image_dir, "deep.png"), deep)
    write_image(os.path.join(image_dir, "empty.jpg"), pixels(40, 60, 3))
    if images is None:
        images = [
            {"id": 1, "file_name": "a.png", "height": 40, "width": 60},
            {"id": 2, "file_name": "grey.png", "height": 30, "width": 50},
            {"id": 3, "file_name": "rgba.png", "height": 20, "width": 20},
            {"id": 4, "file_name": "deep.png", "height": 24, "width": 32},
            {"id": 5, "file_name": "empty.jpg", "height": 40, "width": 60},
        ]
    if categories is None:
        categories = [{"id": 12, "name": "emu"}, {"id": 3, "name": "cat"},
                      {"id": 7, "name": "dog"}]
    if annotations is None:
        annotations = [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [5, 10, 20, 15], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 12, "bbox": [30.5, 2.25, 10, 8], "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 7, "bbox": [0, 0, 60, 40], "iscrowd": 1},
            {"id": 13, "image_id": 2, "category_id": 7, "bbox": [1, 2, 3, 4], "iscrowd": 0},
            {"id": 14, "image_id": 3, "category_id": 3, "bbox": [2, 2, 10, 10]},
            {"id": 15, "image_id": 4, "category_id": 12, "bbox": [4, 4, 8, 8], "iscrowd": 0},
        ]
    data = {"images": images, "annotations": annotations, "categories": categories}
    data.update(extra or {})
    ann_file = os.path.join(root, "instances.json")
    with open(ann_file, "w") as f:
        json.dump(data, f)
    return ann_file, image_dir


#: Image 1 of :func:`make_mask_coco` is MASK_H1 x MASK_W1.
MASK_H1, MASK_W1 = 40, 60


def uncompressed_rle(mask):
    """COCO uncompressed RLE (column-major runs, starting with zeros)."""
    flat = np.asarray(mask, np.uint8).flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _bbox_of(rle):
    return [float(v) for v in mask_utils.toBbox(rle)]


def make_mask_coco(root, annotations=None):
    """Image 1 (40x60): polygon (2 parts), compressed RLE with a hole, box-only object,
    crowd with an uncompressed RLE overlapping the polygon; image 2 (30x50): box-only;
    image 3 (20x20): no objects. Boxes are the masks' tight boxes."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (MASK_H1, MASK_W1), "b.png": (30, 50), "c.png": (20, 20)}.items():
        assert cv2.imwrite(os.path.join(root, "images", name),
                           rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    poly = [[4, 3, 24, 3, 24, 18, 4, 18], [8, 19, 14, 19, 14, 23, 8, 23]]
    poly_rle = mask_utils.merge(mask_utils.frPyObjects(poly, MASK_H1, MASK_W1))
    m2 = np.zeros((MASK_H1, MASK_W1), np.uint8, order="F")
    m2[22:36, 30:51] = 1
    m2[26:30, 36:44] = 0  # a hole
    rle2 = mask_utils.encode(m2)
    crowd = np.zeros((MASK_H1, MASK_W1), np.uint8)
    crowd[14:30, 0:20] = 1  # overlaps the polygon (rows 14..18)
    crowd_rle = uncompressed_rle(crowd)
    if annotations is None:
        annotations = [
            {"id": 101, "image_id": 1, "category_id": 1, "bbox": _bbox_of(poly_rle),
             "segmentation": poly, "iscrowd": 0},
            {"id": 102, "image_id": 1, "category_id": 2, "bbox": _bbox_of(rle2),
             "segmentation": {"size": [MASK_H1, MASK_W1], "counts": rle2["counts"].decode("ascii")},
             "iscrowd": 0},
            {"id": 103, "image_id": 1, "category_id": 1, "bbox": [52, 2, 6, 10], "iscrowd": 0},
            {"id": 104, "image_id": 1, "category_id": 2, "bbox": [0, 14, 20, 16],
             "segmentation": crowd_rle, "iscrowd": 1},
            {"id": 201, "image_id": 2, "category_id": 1, "bbox": [10, 5, 20, 12],
             "segmentation": [], "iscrowd": 0},
        ]
    data = {"images": [{"id": 1, "file_name": "a.png", "height": MASK_H1, "width": MASK_W1},
                       {"id": 2, "file_name": "b.png", "height": 30, "width": 50},
                       {"id": 3, "file_name": "c.png", "height": 20, "width": 20}],
            "annotations": annotations,
            "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}]}
    ann_file = os.path.join(root, "instances.json")
    with open(ann_file, "w") as f:
        json.dump(data, f)
    return ann_file, os.path.join(root, "images"), data


def make_jpeg_coco(root, *, num_images=6, size=(48, 64), quality=90, seed=0):
    """A COCO set of ``num_images`` smooth colour JPEGs (``size`` = (h, w), odd images
    transposed) with 1-3 random boxes each; returns (annotation_file, image_dir)."""
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(root, "jpegs")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        h, w = size if i % 2 == 0 else size[::-1]
        pixels = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (5, 5), 2)
        name = f"{i:04d}.jpg"
        assert cv2.imwrite(os.path.join(image_dir, name), pixels,
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = float(rng.uniform(0, w / 2)), float(rng.uniform(0, h / 2))
            bw, bh = float(rng.uniform(4, w / 2)), float(rng.uniform(4, h / 2))
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": int(rng.integers(1, 4)),
                                "bbox": [x0, y0, bw, bh], "area": bw * bh, "iscrowd": 0})
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}
    ann_file = os.path.join(root, "jpegs.json")
    with open(ann_file, "w") as f:
        json.dump(data, f)
    return ann_file, image_dir
