"""kerasdet.data.box_format and make_dataset(bounding_box_format=...): every Keras format
in, the same yxyx boxes (and the same dataset tensors) out."""
import dataclasses

import numpy as np
import pytest

from kerasdet.boxes import BOX_FORMATS
from kerasdet.data.box_format import to_yxyx_source
from kerasdet.data.coco import DetectionSource, load_coco
from kerasdet.data.pipeline import make_dataset

from .conftest import make_tiny_coco

#: Image 0 is 40 x 60 (h x w), image 1 is 20 x 20 without boxes, image 2 is 10 x 20.
SIZES = [(40, 60), (20, 20), (10, 20)]
#: yxyx pixels: [ymin, xmin, ymax, xmax]
YXYX = [np.array([[10, 5, 25, 25], [0, 30, 40, 60]], np.float32),
        np.zeros((0, 4), np.float32),
        np.array([[2.5, 4, 7.5, 16]], np.float32)]
#: The same boxes written by hand in each Keras format.
BY_HAND = {
    "yxyx": YXYX,
    "xyxy": [[[5, 10, 25, 25], [30, 0, 60, 40]], [], [[4, 2.5, 16, 7.5]]],
    "xywh": [[[5, 10, 20, 15], [30, 0, 30, 40]], [], [[4, 2.5, 12, 5]]],
    "center_xywh": [[[15, 17.5, 20, 15], [45, 20, 30, 40]], [], [[10, 5, 12, 5]]],
    "center_yxhw": [[[17.5, 15, 15, 20], [20, 45, 40, 30]], [], [[5, 10, 5, 12]]],
    "rel_xyxy": [[[5 / 60, 10 / 40, 25 / 60, 25 / 40], [0.5, 0, 1, 1]], [],
                 [[0.2, 0.25, 0.8, 0.75]]],
    "rel_yxyx": [[[10 / 40, 5 / 60, 25 / 40, 25 / 60], [0, 0.5, 1, 1]], [],
                 [[0.25, 0.2, 0.75, 0.8]]],
    "rel_xywh": [[[5 / 60, 10 / 40, 20 / 60, 15 / 40], [0.5, 0, 0.5, 1]], [],
                 [[0.2, 0.25, 0.6, 0.5]]],
    "rel_center_xywh": [[[15 / 60, 17.5 / 40, 20 / 60, 15 / 40], [0.75, 0.5, 0.5, 1]], [],
                        [[0.5, 0.5, 0.6, 0.5]]],
}


def _source(boxes, sizes=SIZES):
    n = len(boxes)
    return DetectionSource(
        image_paths=[f"img{i}.png" for i in range(n)], image_ids=list(range(n)),
        heights=[h for h, _ in sizes], widths=[w for _, w in sizes],
        boxes=[np.asarray(b, np.float32).reshape(-1, 4) for b in boxes],
        classes=[np.zeros(len(b), np.int32) for b in boxes],
        is_crowd=[np.zeros(len(b), bool) for b in boxes],
        annotation_ids=[np.arange(len(b), dtype=np.int64) for b in boxes],
        category_ids=[1], category_names=["a"])


def test_every_keras_format_is_covered():
    assert set(BY_HAND) == set(BOX_FORMATS)


@pytest.mark.parametrize("fmt", BOX_FORMATS)
def test_to_yxyx_source_matches_hand_computed_boxes(fmt):
    src = _source(BY_HAND[fmt])
    out = to_yxyx_source(src, bounding_box_format=fmt)
    assert len(out.boxes) == 3 and out.boxes[1].shape == (0, 4)
    for got, want in zip(out.boxes, YXYX):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert out.classes is src.classes and out.heights is src.heights  # only boxes change
    if fmt == "yxyx":
        assert out is src


def test_to_yxyx_source_errors():
    with pytest.raises(ValueError, match="Unknown bounding_box_format 'ltrb'"):
        to_yxyx_source(_source(YXYX), bounding_box_format="ltrb")
    bad = dataclasses.replace(_source(YXYX), boxes=[np.ones((2, 3)), YXYX[1], YXYX[2]])
    with pytest.raises(ValueError, match=r"img0.png must be \[n, 4\]"):
        to_yxyx_source(bad, bounding_box_format="xyxy")
    unsized = dataclasses.replace(_source(YXYX), heights=[40, None, 10])
    with pytest.raises(ValueError, match="height and width"):
        to_yxyx_source(unsized, bounding_box_format="rel_xyxy")
    empty = _source([], sizes=[])
    assert to_yxyx_source(empty, bounding_box_format="xywh") is empty


def _to_format(boxes, fmt, h, w):
    """yxyx pixels -> ``fmt``, by the definitions (independent of Keras)."""
    y0, x0, y1, x1 = (boxes[:, k] for k in range(4))
    pixels = {
        "yxyx": [y0, x0, y1, x1], "xyxy": [x0, y0, x1, y1],
        "xywh": [x0, y0, x1 - x0, y1 - y0],
        "center_xywh": [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0],
        "center_yxhw": [(y0 + y1) / 2, (x0 + x1) / 2, y1 - y0, x1 - x0],
    }
    if fmt in pixels:
        return np.stack(pixels[fmt], -1).reshape(-1, 4)
    base = np.stack(pixels[fmt[len("rel_"):]], -1).reshape(-1, 4)
    scale = {"xyxy": [w, h, w, h], "yxyx": [h, w, h, w], "xywh": [w, h, w, h],
             "center_xywh": [w, h, w, h]}[fmt[len("rel_"):]]
    return base / np.asarray(scale, np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_coco(*make_tiny_coco(str(tmp_path_factory.mktemp("tiny"))))


def _tensors(source, **kw):
    ds = make_dataset(source, batch_size=5, image_size=(48, 64), max_boxes=4, **kw)
    x, y = next(iter(ds))
    return x.numpy(), {k: v.numpy() for k, v in y.items()}


@pytest.mark.parametrize("fmt", [f for f in BOX_FORMATS if f != "yxyx"])
def test_make_dataset_gives_the_same_tensors_for_every_format(tiny, fmt):
    ref_x, ref_y = _tensors(tiny)
    converted = dataclasses.replace(tiny, boxes=[
        _to_format(b, fmt, h, w) for b, h, w in zip(tiny.boxes, tiny.heights, tiny.widths)])
    x, y = _tensors(converted, bounding_box_format=fmt)
    np.testing.assert_array_equal(x, ref_x)
    assert y.keys() == ref_y.keys()
    for k in ref_y:
        if k == "boxes":
            np.testing.assert_allclose(y[k], ref_y[k], atol=1e-4, err_msg=fmt)
        else:
            np.testing.assert_array_equal(y[k], ref_y[k], err_msg=f"{fmt} {k}")
    assert (ref_y["classes"] >= 0).sum() == 6  # the boxes were really there
