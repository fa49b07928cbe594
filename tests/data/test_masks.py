"""kerasdet.data.masks: filled boxes, decoding of polygons / RLE, union and instance
rasterization (hand-computed), and the errors / counts of segmentation checking."""
import logging

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from kerasdet.data.coco import load_coco
from kerasdet.data.masks import (
    IGNORE,
    check_segmentations,
    decode_segmentation,
    filled_box,
    rasterize_masks,
)
from kerasdet.data.pipeline import make_dataset

from .conftest import MASK_H1 as H1, MASK_W1 as W1, make_mask_coco, uncompressed_rle

# pycocotools' mask.decode trips a numpy 2 DeprecationWarning (copy keyword); not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

#: 3 x 4 mask with ones at (0, 1), (1, 1), (2, 3); column-major runs 3 zeros, 2 ones,
#: 6 zeros, 1 one.
SMALL = np.array([[0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], np.uint8)
SMALL_RLE = {"size": [3, 4], "counts": [3, 2, 6, 1]}


def test_filled_box_covers_the_pixel_centres_inside():
    out = filled_box([1.2, 2.5, 3.4, 6.0], 5, 8)  # centres 1.5, 2.5 (rows); 2.5..5.5 (cols)
    expected = np.zeros((5, 8), np.uint8)
    expected[1:3, 2:6] = 1
    np.testing.assert_array_equal(out, expected)
    tiny = filled_box([2.2, 2.2, 2.4, 2.4], 5, 8)  # no centre inside: still one pixel
    assert tiny.sum() == 1 and tiny[2, 2] == 1
    edge = filled_box([-3.0, 6.0, 9.0, 20.0], 5, 8)  # clipped to the image
    assert edge[:, 6:].all() and edge.sum() == 10


def test_decode_uncompressed_compressed_rle_and_polygon_parts():
    assert uncompressed_rle(SMALL) == SMALL_RLE  # the test helper agrees with the hand runs
    np.testing.assert_array_equal(decode_segmentation(SMALL_RLE, 3, 4), SMALL)
    compressed = mask_utils.encode(np.asfortranarray(SMALL))
    for counts in (compressed["counts"], compressed["counts"].decode("ascii")):
        out = decode_segmentation({"size": [3, 4], "counts": counts}, 3, 4)
        np.testing.assert_array_equal(out, SMALL)
        assert out.dtype == np.uint8
    parts = [[4, 3, 24, 3, 24, 18, 4, 18], [8, 19, 14, 19, 14, 23, 8, 23]]
    merged = decode_segmentation(parts, H1, W1)
    singles = [decode_segmentation([p], H1, W1) for p in parts]
    assert singles[0].any() and singles[1].any()
    np.testing.assert_array_equal(merged, singles[0] | singles[1])  # parts are merged


def test_rasterize_union_and_instances_by_hand():
    boxes = np.array([[0, 0, 3, 4], [1, 0, 3, 2]], np.float32)  # object 1: filled box
    segms = [SMALL_RLE, None]
    union = rasterize_masks(segms, boxes, [False, True], 3, 4, "union")
    assert union.shape == (3, 4, 1) and union.dtype == np.uint8
    # crowd box rows 1..2, cols 0..1; the non-crowd RLE wins at (1, 1)
    np.testing.assert_array_equal(union[..., 0], [[0, 1, 0, 0],
                                                  [IGNORE, 1, 0, 0],
                                                  [IGNORE, IGNORE, 0, 1]])
    inst = rasterize_masks(segms, boxes, [False, True], 3, 4, "instances")
    assert inst.shape == (3, 4, 2)
    np.testing.assert_array_equal(inst[..., 0], SMALL)
    np.testing.assert_array_equal(inst[..., 1], [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]])
    assert rasterize_masks([], np.zeros((0, 4)), [], 3, 4, "instances").shape == (3, 4, 0)
    assert not rasterize_masks([], np.zeros((0, 4)), [], 3, 4, "union").any()
    with pytest.raises(ValueError, match="annotation id 9: segmentation decodes to"):
        rasterize_masks([{"size": [2, 2], "counts": [4]}], boxes[:1], [False], 3, 4,
                        "union", where="f.json", annotation_ids=[9])


def test_bad_segmentations_are_named_or_counted(tmp_path, caplog):
    good = {"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0}
    cases = [
        ([["a", 1, 2, 3, 4, 5]], "polygon"),
        ({"size": [10, 10], "counts": "abc"}, r"size \[10, 10\] differs"),
        ({"size": [H1, W1], "counts": [5, 5]}, "sum to 10"),
        ({"counts": "abc"}, "needs 'counts' and 'size'"),
        (42, "polygon list or an RLE dict"),
    ]
    for k, (segm, match) in enumerate(cases):
        root = str(tmp_path / f"bad{k}")
        ann_file, image_dir, _ = make_mask_coco(root, annotations=[dict(good, segmentation=segm)])
        src = load_coco(ann_file, image_dir)
        with pytest.raises(ValueError, match=match) as err:
            make_dataset(src, batch_size=1, image_size=(32, 32), masks="union")
        assert "instances.json" in str(err.value) and "annotation id 7" in str(err.value)
        assert "image id 1" in str(err.value)
    # A degenerate polygon part (< 3 points) is dropped and counted; nothing usable left
    # -> the filled box.
    root = str(tmp_path / "degenerate")
    ann_file, image_dir, _ = make_mask_coco(
        root, annotations=[dict(good, segmentation=[[1, 1, 11, 11]])])
    src = load_coco(ann_file, image_dir)
    _, stats = check_segmentations(src)
    assert stats == {"fallback_images": 1, "fallback_annotations": 1, "dropped_polygons": 1}
    with caplog.at_level(logging.WARNING, logger="kerasdet.data.masks"):
        _, y = next(iter(make_dataset(src.subset([0]), batch_size=1, image_size=(H1, W1),
                                      masks="instances", max_boxes=2)))
    assert "1 degenerate polygon part(s)" in caplog.text
    masks = y["masks"].numpy()
    assert masks[0, 0, 1:11, 1:11].all() and masks[0, 0].sum() == 100
