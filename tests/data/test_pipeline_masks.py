"""make_dataset(masks="union" / "instances"): rasterization, alignment with the boxes under
flip / scale jitter / crop, crowd = 255, padding, fallback to filled boxes, epoch == stream,
digits masks inside their boxes, errors for bad segmentations."""
import logging

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from kerasdet.data.coco import load_coco
from kerasdet.data.masks import IGNORE
from kerasdet.data.pipeline import make_dataset

from .conftest import MASK_H1 as H1, MASK_W1 as W1, make_mask_coco

# pycocotools' mask.decode trips a numpy 2 DeprecationWarning (copy keyword); not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ann_file, image_dir, data = make_mask_coco(str(tmp_path_factory.mktemp("masks")))
    return load_coco(ann_file, image_dir), data


def _collect(ds, batches=None):
    out = []
    for k, (_, y) in enumerate(ds):
        if batches is not None and k >= batches:
            break
        out.append({k: v.numpy() for k, v in y.items()})
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def _mask_box(m):
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    return np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], np.float32)


def _check_rows(y, tol=1.0):
    """Every valid row's mask is non-empty with a bounding box within ``tol`` px of its
    box; padding rows are all zero. Returns the number of rows checked."""
    checked = 0
    for b in range(len(y["classes"])):
        for i, c in enumerate(y["classes"][b]):
            m = y["masks"][b, i]
            if c < 0:
                assert not m.any(), (b, i)
                continue
            assert set(np.unique(m)) <= {0, 1}
            assert m.any(), (b, i, y["boxes"][b, i])
            box, mask_box = y["boxes"][b, i], _mask_box(m)
            height, width = m.shape
            if box[0] <= tol or box[1] <= tol or box[2] >= height - tol or box[3] >= width - tol:
                # Cut by the canvas (jitter crop): the box is clipped to the canvas, and the
                # visible part of a non-rectangular object can be shorter than the clipped box.
                assert (mask_box[:2] >= box[:2] - tol).all() and (mask_box[2:] <= box[2:] + tol).all(), \
                    (b, i, box, mask_box)
            else:
                np.testing.assert_allclose(mask_box, box, atol=tol, err_msg=f"batch row {b}, object {i}")
            checked += 1
    return checked


def _union_from_rows(y, b):
    rows = y["masks"][b][y["classes"][b] >= 0]
    crowd = y["is_crowd"][b][y["classes"][b] >= 0]
    fg = rows[~crowd].any(0) if (~crowd).any() else np.zeros(rows.shape[1:], bool)
    cr = rows[crowd].any(0) if crowd.any() else np.zeros(rows.shape[1:], bool)
    return np.where(fg, 1, np.where(cr, IGNORE, 0)).astype(np.uint8)


def test_rasterization_at_scale_one_padding_crowd_and_fallback(tiny, caplog):
    src, data = tiny
    assert src.masks is not None
    kw = dict(batch_size=3, image_size=(H1, W1), max_boxes=6)
    with caplog.at_level(logging.WARNING, logger="kerasdet.data.masks"):
        ds_i = make_dataset(src, masks="instances", **kw)
    assert "2 annotation(s) in 2 image(s)" in caplog.text and "Attention CoupleNet" in caplog.text
    ds_u = make_dataset(src, masks="union", **kw)
    assert ds_i.element_spec[1]["masks"].shape.as_list() == [None, 6, H1, W1]
    assert ds_u.element_spec[1]["foreground"].shape.as_list() == [None, H1, W1]
    assert "masks" not in ds_u.element_spec[1] and "foreground" not in ds_i.element_spec[1]
    yi, yu = _collect(ds_i), _collect(ds_u)
    assert yi["masks"].dtype == np.uint8 and yu["foreground"].dtype == np.uint8
    np.testing.assert_array_equal(yi["image_scale"][0], 1.0)
    # Image 1 at scale 1: each row is exactly the pycocotools decoding (non-crowd first).
    anns = {a["id"]: a for a in data["annotations"]}
    order = [101, 102, 103, 104]  # compact_and_pad: non-crowd first, stable
    assert yi["is_crowd"][0, :4].tolist() == [False, False, False, True]
    for row, ann_id in enumerate(order):
        seg = anns[ann_id].get("segmentation")
        if seg is None:  # box-only: the filled box (our extension)
            expected = np.zeros((H1, W1), np.uint8)
            expected[2:12, 52:58] = 1
        elif isinstance(seg, list):
            expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, H1, W1)))
        elif isinstance(seg["counts"], list):
            expected = mask_utils.decode(mask_utils.frPyObjects(seg, H1, W1))
        else:
            expected = mask_utils.decode(seg)
        np.testing.assert_array_equal(yi["masks"][0, row], expected, err_msg=str(ann_id))
    assert _check_rows({k: v[:1] for k, v in yi.items()}, tol=0.0) == 4  # exact at scale 1
    assert _check_rows(yi) == 5  # image 2 is resized (x 4/3)
    assert yi["masks"][0, 4:].max() == 0 and yi["masks"][2].max() == 0  # padding, negative
    # Union: 1 on non-crowd, 255 on crowd only, non-crowd wins the overlap, 0 elsewhere.
    fg = yu["foreground"]
    assert set(np.unique(fg[0])) == {0, 1, IGNORE}
    assert fg[0, 20, 5] == IGNORE and fg[0, 15, 10] == 1  # crowd only / polygon over crowd
    assert fg[0, 27, 38] == 0  # the RLE's hole
    for b in range(3):
        np.testing.assert_array_equal(fg[b], _union_from_rows(yi, b))
    # Image 2 has only a box-only object: its filled box [5:17, 10:30] at scale 40/30.
    assert set(np.unique(fg[1])) == {0, 1} and fg[2].max() == 0


def test_masks_follow_flip_and_scale_jitter(tiny):
    src, _ = tiny
    kw = dict(batch_size=3, image_size=(48, 64), training=True, flip=True,
              scale_jitter=(0.6, 1.7), max_boxes=6, seed=3)
    ds_i = make_dataset(src, masks="instances", **kw)
    ds_u = make_dataset(src, masks="union", **kw)
    # 10 epochs: new flips / scales each time (image 1 all flipped or all unflipped: p = 2^-9)
    ys_i = [_collect(ds_i) for _ in range(10)]
    ys_u = [_collect(ds_u) for _ in range(10)]
    checked, full, centres, scales = 0, 0, [], []
    for yi, yu in zip(ys_i, ys_u):
        np.testing.assert_array_equal(yi["boxes"], yu["boxes"])  # same augmentation
        checked += _check_rows(yi)
        scales += yi["image_scale"].tolist()
        for b in range(3):
            n_orig = len(src.boxes[src.image_ids.index(int(yi["image_id"][b]))])
            derived = _union_from_rows(yi, b)
            fg = yu["foreground"][b]
            assert ((derived == 1) <= (fg == 1)).all()  # every kept object is foreground
            if (yi["classes"][b] >= 0).sum() == n_orig:  # nothing cropped away: equal
                np.testing.assert_array_equal(fg, derived)
                full += 1
            if yi["image_id"][b] == 1:
                polygon_row = 0  # object 101 is first unless cropped away
                if yi["classes"][b, 0] == 0 and not yi["is_crowd"][b, 0]:
                    box = yi["boxes"][b, polygon_row]
                    centres.append((box[1] + box[3]) / 2 / yi["image_scale"][b])
    assert checked >= 12 and full >= 4
    assert len(np.unique(np.round(scales, 3))) > 4  # jitter active
    assert min(centres) < W1 / 2 < max(centres)  # both flipped and not flipped seen


def test_stream_equals_epoch_path(tiny):
    src, _ = tiny
    # Augmentation seeds differ by design between the two paths (Dataset.random vs the
    # stream position), so compare without geometric augmentation: plain, and shuffled.
    for mode, key, kw in (("instances", "masks", dict(training=False)),
                          ("union", "foreground", dict(training=True, flip=False,
                                                       shuffle=True))):
        kw = dict(kw, batch_size=3, image_size=(48, 64), max_boxes=5, seed=7, masks=mode)
        epoch = _collect(make_dataset(src, **kw))
        stream = _collect(make_dataset(src, repeat=True, cache_images=True, **kw), batches=2)
        for k in epoch:  # element-wise, per image id (the orders differ when shuffled)
            e = epoch[k][np.argsort(epoch["image_id"])]
            s1 = stream[k][:3][np.argsort(stream["image_id"][:3])]  # data epoch 0
            s2 = stream[k][3:][np.argsort(stream["image_id"][3:])]  # data epoch 1 (cached)
            np.testing.assert_array_equal(e, s1, err_msg=f"{mode} {k}")
            np.testing.assert_array_equal(e, s2, err_msg=f"{mode} {k}")
        assert epoch[key].any()


def test_digits_instance_masks_lie_inside_their_boxes(digits_set, caplog):
    src = load_coco(digits_set["train_annotations"], digits_set["train_images"]).subset(
        range(8))
    kw = dict(batch_size=4, image_size=(64, 80), training=True, scale_jitter=(0.7, 1.3),
              max_boxes=6, seed=0)
    with caplog.at_level(logging.WARNING, logger="kerasdet.data.masks"):
        yi = _collect(make_dataset(src, masks="instances", **kw))
        yu = _collect(make_dataset(src, masks="union", **kw))
    assert "no usable segmentation" not in caplog.text  # digits carry real masks
    assert _check_rows(yi) >= 8  # non-empty, tight (the digits' boxes are the masks' boxes)
    for b in range(len(yi["image_id"])):
        for i in np.flatnonzero(yi["classes"][b] >= 0):
            y0, x0, y1, x1 = yi["boxes"][b, i]
            ys, xs = np.nonzero(yi["masks"][b, i])
            assert ys.min() >= np.floor(y0) - 1 and ys.max() + 1 <= np.ceil(y1) + 1
            assert xs.min() >= np.floor(x0) - 1 and xs.max() + 1 <= np.ceil(x1) + 1
        assert ((_union_from_rows(yi, b) == 1) <= (yu["foreground"][b] == 1)).all()
    assert set(np.unique(yu["foreground"])) <= {0, 1}  # no crowd in digits


def test_bad_arguments(tiny):
    src, _ = tiny
    with pytest.raises(ValueError, match="masks must be one of"):
        make_dataset(src, batch_size=1, image_size=(32, 32), masks="boxes")
    with pytest.raises(ValueError, match="ssd_augmentation"):
        make_dataset(src, batch_size=1, image_size=(32, 32), training=True,
                     ssd_augmentation=True, seed=0, masks="union")
