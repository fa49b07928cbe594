"""Shared fixtures for the kerasdet.data tests: a tiny digits set and a tiny COCO set."""
import json
import os

import cv2
import numpy as np
import pytest

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
