"""kerasdet.data.coco: COCO JSON loading, id mapping, and every bad-input case."""
import json
import logging
import os

import numpy as np
import pytest
from pycocotools.coco import COCO

from kerasdet.data.coco import load_coco, read_image, to_rgb_uint8

from .conftest import make_tiny_coco, write_image


def _write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def test_loads_boxes_classes_crowd_and_negatives(tmp_path):
    ann_file, image_dir = make_tiny_coco(str(tmp_path))
    src = load_coco(ann_file, image_dir)
    assert len(src) == 5 and src.image_ids == [1, 2, 3, 4, 5]
    assert src.heights == [40, 30, 20, 24, 40] and src.widths == [60, 50, 20, 32, 60]
    assert src.image_paths[1] == os.path.join(image_dir, "grey.png")
    # Sparse ids 3, 7, 12 -> contiguous 0, 1, 2 (sorted by id).
    assert src.category_ids == [3, 7, 12] and src.category_names == ["cat", "dog", "emu"]
    np.testing.assert_allclose(src.boxes[0], [[10, 5, 25, 25], [2.25, 30.5, 10.25, 40.5],
                                              [0, 0, 40, 60]])
    assert src.boxes[0].dtype == np.float32 and src.classes[0].dtype == np.int32
    assert src.classes[0].tolist() == [0, 2, 1]
    assert src.is_crowd[0].tolist() == [False, False, True]
    assert src.annotation_ids[0].tolist() == [10, 11, 12]
    assert src.is_crowd[2].tolist() == [False]  # iscrowd absent -> 0
    assert src.boxes[4].shape == (0, 4) and src.classes[4].shape == (0,)  # negative image
    assert len(src.masks[0]) == 3 and src.skipped == {}
    assert src.num_classes == 3 and src.num_boxes == 6


def test_id_mapping_round_trip(tmp_path):
    src = load_coco(*make_tiny_coco(str(tmp_path)))
    ids = src.to_category_ids(np.array([[0, 2, -1], [1, 1, -1]]))
    assert ids.tolist() == [[3, 12, -1], [7, 7, -1]]
    back = src.to_class_indices(ids)
    assert back.tolist() == [[0, 2, -1], [1, 1, -1]]
    assert src.to_class_indices([3, 7, 12, 99]).tolist() == [0, 1, 2, -1]
    all_classes = np.concatenate(src.classes)
    assert np.array_equal(src.to_class_indices(src.to_category_ids(all_classes)), all_classes)
    # The mapping agrees with pycocotools' view of the same file.
    coco = COCO(src.annotation_file)
    for k, cid in enumerate(src.category_ids):
        assert coco.loadCats(cid)[0]["name"] == src.category_names[k]


def test_category_ids_select_and_order(tmp_path):
    src = load_coco(*make_tiny_coco(str(tmp_path)), category_ids=[12, 3])
    assert src.category_ids == [12, 3] and src.category_names == ["emu", "cat"]
    assert src.classes[0].tolist() == [1, 0]  # dog (crowd) dropped, not a fault
    assert src.skipped == {"other_category": 2}
    with pytest.raises(ValueError, match=r"category_ids \[5\]"):
        load_coco(*make_tiny_coco(str(tmp_path)), category_ids=[5])


def test_skip_images_without_annotations(tmp_path):
    src = load_coco(*make_tiny_coco(str(tmp_path)), skip_images_without_annotations=True)
    assert src.image_ids == [1, 2, 3, 4]
    assert src.skipped == {"image_without_annotations": 1}


def test_per_annotation_faults_are_skipped_counted_and_warned_once(tmp_path, caplog):
    nan = float("nan")
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10]},       # good
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 10]},        # zero w
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, -2]},       # neg h
        {"id": 4, "image_id": 1, "category_id": 3, "bbox": [nan, 5, 10, 10]},     # NaN
        {"id": 5, "image_id": 1, "category_id": 3, "bbox": [5, 5, float("inf"), 10]},
        {"id": 6, "image_id": 1, "category_id": 3, "bbox": [70, 5, 10, 10]},      # outside
        {"id": 7, "image_id": 1, "category_id": 3, "bbox": [-10, -10, 5, 5]},     # outside
        {"id": 8, "image_id": 1, "category_id": 3, "bbox": [50, 30, 20, 20]},     # clipped
        {"id": 9, "image_id": 1, "category_id": 99, "bbox": [5, 5, 10, 10]},      # unknown cat
        {"id": 10, "image_id": 77, "category_id": 3, "bbox": [5, 5, 10, 10]},     # unknown img
        {"id": 11, "image_id": 1, "category_id": 3},                              # no bbox
        {"id": 12, "image_id": 1, "category_id": 3, "bbox": [1, 2, 3]},           # bad bbox
        {"id": 13, "image_id": 1, "category_id": 3, "bbox": "1 2 3 4"},           # bad bbox
    ]
    ann_file, image_dir = make_tiny_coco(str(tmp_path), annotations=anns)
    with open(ann_file) as f:
        assert "NaN" in f.read()  # json writes NaN/Infinity literals; they must parse
    with caplog.at_level(logging.WARNING):
        src = load_coco(ann_file, image_dir)
    assert src.skipped == {"degenerate_bbox": 2, "non_finite_bbox": 2, "box_outside_image": 2,
                           "unknown_category": 1, "unknown_image": 1, "missing_bbox": 1,
                           "bad_bbox": 2}
    np.testing.assert_allclose(src.boxes[0], [[5, 5, 15, 15], [30, 50, 40, 60]])
    assert src.annotation_ids[0].tolist() == [1, 8]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "instances.json" in msg and "skipped 11" in msg and "non_finite_bbox=2" in msg


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "top level is list"),
    ({"annotations": [], "categories": []}, "missing field 'images'"),
    ({"images": [], "categories": []}, "missing field 'annotations'"),
    ({"images": [], "annotations": []}, "missing field 'categories'"),
    ({"images": {}, "annotations": [], "categories": []}, "'images' must be a list"),
    ({"images": [{"id": "x", "file_name": "a.png"}], "annotations": [], "categories": []},
     r"images\[0\].*'id'"),
    ({"images": [{"id": 1}], "annotations": [], "categories": []}, "'file_name'"),
    ({"images": [{"id": 1, "file_name": "a.png", "height": -3, "width": 60}],
      "annotations": [], "categories": []}, "'height'"),
    ({"images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 60}] * 2,
      "annotations": [], "categories": []}, "duplicate image id 1"),
    ({"images": [], "annotations": [], "categories": [{"name": "x"}]},
     r"categories\[0\].*'id'"),
    ({"images": [], "annotations": [], "categories": [{"id": 1}, {"id": 1}]},
     "duplicate category id"),
    ({"images": [], "annotations": [3], "categories": []}, r"annotations\[0\]"),
])
def test_bad_annotation_files_name_file_and_field(tmp_path, content, match):
    path = str(tmp_path / "bad.json")
    if isinstance(content, str):
        with open(path, "w") as f:
            f.write(content)
    elif content is not None:
        _write_json(path, content)
    write_image(str(tmp_path / "a.png"), np.zeros((40, 60, 3), np.uint8))
    with pytest.raises(ValueError, match=match) as info:
        load_coco(path, str(tmp_path))
    assert "bad.json" in str(info.value)


def test_missing_image_names_file_and_id(tmp_path):
    ann_file, image_dir = make_tiny_coco(str(tmp_path))
    os.remove(os.path.join(image_dir, "grey.png"))
    with pytest.raises(FileNotFoundError, match=r"grey\.png.*image id 2"):
        load_coco(ann_file, image_dir)
    with pytest.raises(FileNotFoundError, match=r"grey\.png"):
        load_coco(ann_file, image_dir, check_images="exists")
    assert len(load_coco(ann_file, image_dir, check_images=False)) == 5


@pytest.mark.parametrize("name, corrupt", [
    ("a.png", lambda b: b[: len(b) // 2]),           # cv2 returns None
    ("a.png", lambda b: b[:-12]),                    # only IEND missing
    ("empty.jpg", lambda b: b[: len(b) * 3 // 4]),   # cv2 returns a partial image
    ("a.png", lambda b: b"this is not an image"),
    ("a.png", lambda b: b""),
])
def test_unreadable_or_truncated_image_names_file(tmp_path, name, corrupt):
    ann_file, image_dir = make_tiny_coco(str(tmp_path))
    path = os.path.join(image_dir, name)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(corrupt(data))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_coco(ann_file, image_dir)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        read_image(path)


def test_size_mismatch_and_size_from_file(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "height": 41, "width": 60}]
    ann_file, image_dir = make_tiny_coco(str(tmp_path), images=images, annotations=[])
    with pytest.raises(ValueError, match=r"a\.png.*\(41, 60\).*\(40, 60\)"):
        load_coco(ann_file, image_dir)
    images = [{"id": 1, "file_name": "a.png"}]  # no size: read from the file
    ann_file, image_dir = make_tiny_coco(str(tmp_path), images=images, annotations=[])
    src = load_coco(ann_file, image_dir)
    assert (src.heights, src.widths) == ([40], [60])
    with pytest.raises(ValueError, match="'height'/'width'"):
        load_coco(ann_file, image_dir, check_images="exists")


def test_grey_rgba_16bit_become_rgb_uint8(tmp_path):
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 2] = 200  # red in OpenCV's BGR order
    p = write_image(str(tmp_path / "red.png"), bgr)
    rgb = read_image(p)
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [200, 0, 0]
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5)
    out = read_image(write_image(str(tmp_path / "g.png"), grey))
    assert out.shape == (4, 5, 3) and np.array_equal(out[..., 0], grey)
    assert np.array_equal(out[..., 0], out[..., 2])
    bgra = np.dstack([bgr, np.full((4, 5), 7, np.uint8)])
    assert read_image(write_image(str(tmp_path / "a.png"), bgra))[0, 0].tolist() == [200, 0, 0]
    deep = np.array([[0, 257, 65535, 32896]], np.uint16)
    assert read_image(write_image(str(tmp_path / "d.png"), deep))[..., 0].tolist() == \
        [[0, 1, 255, 128]]
    assert to_rgb_uint8(np.full((2, 2), 0.5, np.float32))[0, 0].tolist() == [128] * 3
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(str(tmp_path / "nope.png"))


def test_all_image_kinds_load(tmp_path):
    src = load_coco(*make_tiny_coco(str(tmp_path)))
    for path, h, w in zip(src.image_paths, src.heights, src.widths):
        image = read_image(path)
        assert image.shape == (h, w, 3) and image.dtype == np.uint8


def test_digits_set_through_coco_loader(digits_set):
    src = load_coco(digits_set["val_annotations"], digits_set["val_images"])
    coco = COCO(digits_set["val_annotations"])
    assert src.category_ids == list(range(1, 11))
    for i, img_id in enumerate(src.image_ids):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        expected = [[a["bbox"][1], a["bbox"][0], a["bbox"][1] + a["bbox"][3],
                     a["bbox"][0] + a["bbox"][2]] for a in anns]
        np.testing.assert_allclose(src.boxes[i], np.reshape(expected, (-1, 4)))
        assert src.to_category_ids(src.classes[i]).tolist() == [a["category_id"] for a in anns]
        assert [m["counts"] for m in src.masks[i]] == [a["segmentation"]["counts"] for a in anns]


def test_data_errors_are_user_input_errors(tmp_path):
    """The classes the command line prints as one line (exit 2), not as a traceback."""
    from kerasdet.errors import ConfigError, DataError, DataFileNotFoundError

    ann_file, image_dir = make_tiny_coco(str(tmp_path))
    with pytest.raises(DataFileNotFoundError, match=r"missing\.json: annotation file does not exist"):
        load_coco(str(tmp_path / "missing.json"), image_dir)
    with pytest.raises(ConfigError, match="duplicates"):
        load_coco(ann_file, image_dir, category_ids=[3, 3])
    bad = _write_json(tmp_path / "bad.json", {"images": [{"id": 1, "file_name": "a.png"},
                                                         {"id": 1, "file_name": "a.png"}],
                                              "annotations": [], "categories": []})
    with pytest.raises(DataError, match=r"bad\.json: images\[1\]: duplicate image id 1"):
        load_coco(bad, image_dir)
    with open(os.path.join(image_dir, "a.png"), "wb") as f:
        f.write(b"not an image")
    with pytest.raises(DataError, match=r"a\.png.*image id 1"):
        load_coco(ann_file, image_dir)
    os.remove(os.path.join(image_dir, "grey.png"))
    with pytest.raises(DataFileNotFoundError, match=r"grey\.png.*image id 2"):
        load_coco(ann_file, image_dir, check_images="exists")
