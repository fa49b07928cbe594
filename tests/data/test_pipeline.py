"""kerasdet.data.pipeline.make_dataset: shapes, padding, scales, order, determinism, errors."""
import os

import numpy as np
import pytest
import tensorflow as tf

from kerasdet.data.coco import load_coco, read_image
from kerasdet.data.pipeline import make_dataset

from .conftest import make_tiny_coco


def _collect(ds):
    images, labels = [], []
    for x, y in ds:
        images.append(x.numpy())
        labels.append({k: v.numpy() for k, v in y.items()})
    return np.concatenate(images), {k: np.concatenate([l[k] for l in labels]) for k in labels[0]}


@pytest.fixture
def tiny(tmp_path):
    return load_coco(*make_tiny_coco(str(tmp_path)))


def test_shapes_dtypes_padding_scale_and_order(tiny):
    ds = make_dataset(tiny, batch_size=2, image_size=(48, 64), max_boxes=4)
    x_spec, y_spec = ds.element_spec
    assert x_spec.shape.as_list() == [None, 48, 64, 3] and x_spec.dtype == tf.float32
    assert y_spec["boxes"].shape.as_list() == [None, 4, 4]
    assert {k: s.dtype for k, s in y_spec.items()} == {
        "boxes": tf.float32, "classes": tf.int32, "is_crowd": tf.bool, "image_id": tf.int64,
        "image_scale": tf.float32, "original_size": tf.int32}
    images, labels = _collect(ds)
    assert images.shape == (5, 48, 64, 3) and images.max() <= 255 and images.max() > 200
    assert labels["image_id"].tolist() == [1, 2, 3, 4, 5]  # source order when not training
    assert labels["original_size"].tolist() == [[40, 60], [30, 50], [20, 20], [24, 32], [40, 60]]
    expected_scale = [min(48 / h, 64 / w) for h, w in zip(tiny.heights, tiny.widths)]
    np.testing.assert_allclose(labels["image_scale"], expected_scale, rtol=1e-6)
    for i in range(5):
        n = len(tiny.classes[i])
        h, w = tiny.heights[i], tiny.widths[i]
        s = labels["image_scale"][i]
        ratio = np.array([round(h * s) / h, round(w * s) / w] * 2, np.float32)
        np.testing.assert_allclose(labels["boxes"][i, :n], tiny.boxes[i] * ratio, rtol=1e-5)
        # original = network / scale (within the < 0.5 px rounding of the resize).
        np.testing.assert_allclose(labels["boxes"][i, :n] / s, tiny.boxes[i], atol=0.5)
        assert labels["classes"][i, :n].tolist() == tiny.classes[i].tolist()
        assert labels["is_crowd"][i, :n].tolist() == tiny.is_crowd[i].tolist()
        assert (labels["classes"][i, n:] == -1).all() and (labels["boxes"][i, n:] == 0).all()
        assert not labels["is_crowd"][i, n:].any()
    # Image 5 has no objects: a normal element, all padding.
    assert (labels["classes"][4] == -1).all()
    # Grey image 2: three equal channels; the padded canvas area is 0.
    assert np.array_equal(images[1, ..., 0], images[1, ..., 2])
    assert (images[1, 39:] == 0).all()  # 30x50 -> scale 1.28 -> 38x64 (+ blur row)


def test_pixels_match_decoded_image_at_scale_one(tmp_path):
    src = load_coco(*make_tiny_coco(str(tmp_path)))
    ds = make_dataset(src, batch_size=5, image_size=(40, 60))
    images, labels = _collect(ds)
    assert labels["image_scale"][0] == 1.0
    np.testing.assert_array_equal(images[0], read_image(src.image_paths[0]))
    np.testing.assert_array_equal(images[4], read_image(src.image_paths[4]))  # JPEG
    assert labels["image_scale"][3] == pytest.approx(40 / 24)  # 24x32 is upscaled to fit


def test_static_batch_with_drop_remainder_and_truncation(tiny):
    ds = make_dataset(tiny, batch_size=2, image_size=(48, 64), max_boxes=2,
                      drop_remainder=True)
    assert ds.element_spec[0].shape.as_list() == [2, 48, 64, 3]
    assert ds.element_spec[1]["classes"].shape.as_list() == [2, 2]
    _, labels = _collect(ds)
    assert len(labels["image_id"]) == 4
    # Image 1 has 2 normal + 1 crowd objects: the crowd one is truncated first.
    assert labels["classes"][0].tolist() == [0, 2] and not labels["is_crowd"][0].any()


def test_training_is_deterministic_given_seed_and_varies_by_epoch(digits_set):
    src = load_coco(digits_set["train_annotations"], digits_set["train_images"])
    kw = dict(batch_size=4, image_size=(64, 80), training=True, scale_jitter=(0.7, 1.3))
    a = make_dataset(src, seed=5, **kw)
    b = make_dataset(src, seed=5, cache_images=True, **kw)
    c = make_dataset(src, seed=6, **kw)
    xa, ya = _collect(a)
    xb, yb = _collect(b)
    xc, yc = _collect(c)
    np.testing.assert_array_equal(xa, xb)
    for k in ya:
        np.testing.assert_array_equal(ya[k], yb[k])
    assert sorted(ya["image_id"]) == sorted(src.image_ids)  # a permutation, full epoch
    assert ya["image_id"].tolist() != src.image_ids  # shuffled
    assert ya["image_id"].tolist() != yc["image_id"].tolist()
    xa2, ya2 = _collect(a)  # second epoch: new order and new augmentation
    assert ya2["image_id"].tolist() != ya["image_id"].tolist()
    assert sorted(ya2["image_id"]) == sorted(ya["image_id"])
    assert len(np.unique(np.round(ya["image_scale"], 4))) > 5  # jitter active
    assert a.element_spec[0].shape.as_list() == [4, 64, 80, 3]  # training drops remainder
    # Boxes stay inside the canvas and padding stays -1.
    valid = ya["classes"] >= 0
    assert (ya["boxes"][valid] >= 0).all()
    assert (ya["boxes"][valid][:, 2] <= 64).all() and (ya["boxes"][valid][:, 3] <= 80).all()
    assert (ya["boxes"][~valid] == 0).all()


def test_eval_is_deterministic_and_cache_matches(digits_set):
    src = load_coco(digits_set["val_annotations"], digits_set["val_images"])
    x1, y1 = _collect(make_dataset(src, batch_size=3, image_size=(64, 80)))
    x2, y2 = _collect(make_dataset(src, batch_size=3, image_size=(64, 80), cache_images=True,
                                   scale_jitter=(0.5, 2.0)))  # jitter ignored: not training
    np.testing.assert_array_equal(x1, x2)
    assert y1["image_id"].tolist() == src.image_ids == y2["image_id"].tolist()
    np.testing.assert_array_equal(y1["boxes"], y2["boxes"])
    assert (y1["image_scale"] == 1.0).all()


def test_repeat(tiny):
    ds = make_dataset(tiny, batch_size=2, image_size=(32, 32), repeat=True, training=True,
                      seed=0)
    ids = [y["image_id"].numpy().tolist() for _, y in ds.take(6)]
    assert sum(len(i) for i in ids) == 12


def test_min_max_size_canvas_check(tmp_path, tiny):
    with pytest.raises(ValueError, match=r"canvas image_size=\(64, 64\).*at least"):
        make_dataset(tiny, batch_size=1, image_size=(64, 64), min_size=40, max_size=80)
    ds = make_dataset(tiny, batch_size=5, image_size=(80, 80), min_size=40, max_size=80)
    _, labels = _collect(ds)
    # 40x60 image: short side 40 -> 40 (scale 1); 20x20: -> 40 (scale 2); 24x32: 40/24.
    np.testing.assert_allclose(labels["image_scale"][[0, 2, 3]], [1.0, 2.0, 40 / 24], rtol=1e-6)


def test_bad_image_at_run_time_names_the_file(tmp_path):
    ann_file, image_dir = make_tiny_coco(str(tmp_path))
    src = load_coco(ann_file, image_dir, check_images=False)
    os.remove(os.path.join(image_dir, "rgba.png"))
    with pytest.raises(Exception, match=r"rgba\.png"):
        _collect(make_dataset(src, batch_size=2, image_size=(32, 32)))
    path = os.path.join(image_dir, "a.png")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:100])
    with pytest.raises(Exception, match=r"a\.png"):
        _collect(make_dataset(src.subset([0]), batch_size=1, image_size=(32, 32)))


def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="batch_size"):
        make_dataset(tiny, batch_size=0, image_size=(32, 32))
    with pytest.raises(ValueError, match="scale_jitter"):
        make_dataset(tiny, batch_size=1, image_size=(32, 32), scale_jitter=(1.2, 0.8))
    with pytest.raises(ValueError, match="no images"):
        make_dataset(tiny.subset([]), batch_size=1, image_size=(32, 32))
    with pytest.raises(TypeError, match="DetectionSource"):
        make_dataset([1, 2], batch_size=1, image_size=(32, 32))


@pytest.mark.parametrize("repeat", [False, True])
def test_make_dataset_with_ssd_augmentation_is_seeded_and_boxes_stay_valid(digits_set, repeat):
    source = load_coco(digits_set["train_annotations"], digits_set["train_images"])

    def first_batches(seed):
        ds = make_dataset(source, batch_size=4, image_size=(64, 64), training=True, flip=False, seed=seed,
                          ssd_augmentation=True, repeat=repeat)
        return [(x.numpy(), y["boxes"].numpy(), y["classes"].numpy()) for x, y in ds.take(3)]

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    for (xa, ba, ca), (xb, bb, cb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ba, bb)
    assert any(not np.array_equal(xa, xc) for (xa, _, _), (xc, _, _) in zip(a, c))
    for x, boxes, classes in a:
        assert x.shape == (4, 64, 64, 3) and x.min() >= 0 and x.max() <= 255
        real = classes >= 0
        assert real.any()
        assert (boxes[real][:, 2] > boxes[real][:, 0]).all() and (boxes[real] <= 64).all() and (boxes[real] >= 0).all()
