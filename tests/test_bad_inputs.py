"""The bad-input matrix: every row of the README's "Bad inputs" table maps to the test that
proves what kerasdet does with it (``MATRIX``); rows without a test elsewhere are tested
here. ``test_every_row_names_an_existing_test`` keeps the table and the tests in step.
"""
import importlib.util
import json
import os

import sys

import cv2
import numpy as np
import pytest

from kerasdet.data.coco import load_coco
from kerasdet.data.pipeline import make_dataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data.conftest import make_tiny_coco, write_image  # noqa: E402  (tests/data is the package "data")

ROOT = os.path.dirname(os.path.abspath(__file__))
COCO = "tests/data/test_coco.py"
PIPE = "tests/data/test_pipeline.py"
HERE = "tests/test_bad_inputs.py"
REL = "tests/test_reliability.py"

#: (bad input, what kerasdet does, test node id)
MATRIX = [
    ("missing image file",
     "load_coco: FileNotFoundError naming the file and the image id (check_images=True or 'exists'); "
     "with check_images=False the pipeline's read fails naming the file",
     [f"{COCO}::test_missing_image_names_file_and_id", f"{PIPE}::test_bad_image_at_run_time_names_the_file",
      f"{HERE}::test_missing_file_in_the_training_stream_names_it",
      "tests/data/test_decoding.py::test_bad_files_fail_naming_the_file"]),
    ("unreadable / truncated image (cut PNG or JPEG, not an image, empty file)",
     "ValueError naming the file (and image id); a truncated JPEG that OpenCV would half-decode is caught by "
     "its missing end marker",
     [f"{COCO}::test_unreadable_or_truncated_image_names_file",
      "tests/data/test_decoding.py::test_bad_files_fail_naming_the_file"]),
    ("grey, RGBA, 16-bit images",
     "converted to RGB uint8 (grey replicated, alpha dropped, 16-bit scaled by 1/257)",
     [f"{COCO}::test_grey_rgba_16bit_become_rgb_uint8", f"{COCO}::test_all_image_kinds_load"]),
    ("image size in the JSON differs from the file",
     "ValueError naming the file and both sizes; a missing size is read from the file",
     [f"{COCO}::test_size_mismatch_and_size_from_file"]),
    ("zero or negative width/height box",
     "annotation skipped, counted as skipped['degenerate_bbox'], one warning per file",
     [f"{COCO}::test_per_annotation_faults_are_skipped_counted_and_warned_once"]),
    ("NaN or infinite box coordinates",
     "annotation skipped, counted as skipped['non_finite_bbox']",
     [f"{COCO}::test_per_annotation_faults_are_skipped_counted_and_warned_once"]),
    ("box partly / fully outside the image",
     "partly: clipped to the image; fully: skipped, counted as skipped['box_outside_image']",
     [f"{COCO}::test_per_annotation_faults_are_skipped_counted_and_warned_once"]),
    ("missing or malformed 'bbox'",
     "annotation skipped, counted as 'missing_bbox' / 'bad_bbox'",
     [f"{COCO}::test_per_annotation_faults_are_skipped_counted_and_warned_once"]),
    ("unknown category id",
     "annotation skipped, counted as skipped['unknown_category'] (categories left out on purpose with "
     "category_ids=...: 'other_category', not a fault)",
     [f"{COCO}::test_per_annotation_faults_are_skipped_counted_and_warned_once",
      f"{COCO}::test_category_ids_select_and_order"]),
    ("annotation pointing at a missing image (image_id not in 'images')",
     "annotation skipped, counted as skipped['unknown_image']",
     [f"{COCO}::test_per_annotation_faults_are_skipped_counted_and_warned_once",
      f"{HERE}::test_annotations_of_missing_images_are_counted_and_the_rest_loads"]),
    ("not a COCO file (not JSON, a list, missing/mistyped 'images'/'annotations'/'categories', bad ids)",
     "ValueError naming the file and the field",
     [f"{COCO}::test_bad_annotation_files_name_file_and_field"]),
    ("duplicate image ids / duplicate category ids",
     "ValueError naming the file and the duplicate id",
     [f"{COCO}::test_bad_annotation_files_name_file_and_field"]),
    ("empty 'annotations'",
     "every image is a negative (classes all -1); training on it gives a finite loss (normalizer max(1, "
     "positives))",
     [f"{HERE}::test_empty_annotations_give_negatives_and_a_finite_loss"]),
    ("empty 'images'",
     "load_coco returns an empty source; make_dataset raises ValueError 'has no images'",
     [f"{HERE}::test_no_images_is_a_clear_error_in_make_dataset"]),
    ("huge image (48 megapixels)",
     "read and resized onto the canvas like any other image, boxes scaled with it (untested: OpenCV's "
     "CV_IO_MAX_IMAGE_PIXELS limit, 2^30 px by default, makes larger files an 'OpenCV could not decode' "
     "ValueError naming the file)",
     [f"{HERE}::test_huge_image_is_resized_onto_the_canvas"]),
    ("non-finite box that reaches training anyway (bypassing the loader)",
     "an infinite coordinate makes the loss NaN: Detector(nan_policy='raise', the default) does not apply "
     "the update and raises NonFiniteLossError naming the batch's image ids and the suspect one; "
     "'skip': skips the update with a warning naming them (a NaN coordinate is never matched by the IoU "
     "matcher, so it is ignored and the loss stays finite)",
     [f"{REL}::test_raise_policy_stops_before_the_bad_update_and_names_the_images",
      f"{REL}::test_skip_policy_equals_training_without_the_bad_batch",
      f"{REL}::test_nan_box_is_never_matched_so_the_loss_stays_finite_but_an_inf_box_is_caught"]),
]


def _resolve(node):
    path, _, name = node.partition("::")
    spec = importlib.util.spec_from_file_location(f"_matrix_{abs(hash(path))}", os.path.join(os.path.dirname(ROOT), path))
    with open(spec.origin) as f:
        source = f.read()
    return f"def {name}(" in source


def test_every_row_names_an_existing_test():
    assert len(MATRIX) >= 15
    for row, behaviour, nodes in MATRIX:
        assert behaviour and nodes, row
        for node in nodes:
            assert _resolve(node), f"{row}: {node} does not exist"


def markdown_table():
    """The README table (``python -c 'from tests.test_bad_inputs import markdown_table as m; print(m())'``)."""
    lines = ["| Bad input | What kerasdet does | Test |", "|---|---|---|"]
    for row, behaviour, nodes in MATRIX:
        tests = "<br>".join(f"`{n.split('tests/', 1)[1]}`" for n in nodes)
        lines.append(f"| {row} | {behaviour} | {tests} |")
    return "\n".join(lines)


# --- rows tested here -----------------------------------------------------------------------
def test_empty_annotations_give_negatives_and_a_finite_loss(tmp_path):
    import keras
    import tensorflow as tf

    from kerasdet.backbones import small_backbone
    from kerasdet.models.retinanet import RetinaNet

    ann_file, image_dir = make_tiny_coco(str(tmp_path), annotations=[])
    src = load_coco(ann_file, image_dir)
    assert len(src) == 5 and src.num_boxes == 0 and src.skipped == {}
    images, labels = next(iter(make_dataset(src, batch_size=5, image_size=(32, 32))))
    assert (labels["classes"].numpy() == -1).all() and labels["boxes"].shape == (5, 100, 4)
    keras.utils.set_random_seed(0)
    model = RetinaNet(backbone=small_backbone(widths=(8, 8, 8, 8), blocks=(0, 0, 0, 0)), num_classes=3,
                      min_level=3, max_level=5, fpn_channels=8, head_convs=1, head_channels=8)
    total, terms = model._total_loss(images, labels, training=False)
    assert np.isfinite(float(total)) and float(terms["box_loss"]) == 0.0 and float(terms["cls_loss"]) > 0


def test_no_images_is_a_clear_error_in_make_dataset(tmp_path):
    path = str(tmp_path / "empty.json")
    with open(path, "w") as f:
        json.dump({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}, f)
    src = load_coco(path, str(tmp_path))
    assert len(src) == 0 and src.num_classes == 1
    with pytest.raises(ValueError, match=r"empty\.json has no images"):
        make_dataset(src, batch_size=1, image_size=(32, 32))


def test_annotations_of_missing_images_are_counted_and_the_rest_loads(tmp_path, caplog):
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10]},
            {"id": 2, "image_id": 999, "category_id": 3, "bbox": [5, 5, 10, 10]},
            {"id": 3, "image_id": "1", "category_id": 3, "bbox": [5, 5, 10, 10]}]
    src = load_coco(*make_tiny_coco(str(tmp_path), annotations=anns))
    assert src.skipped == {"unknown_image": 2} and src.num_boxes == 1
    assert "unknown_image=2" in caplog.text


def test_missing_file_in_the_training_stream_names_it(tmp_path):
    ann_file, image_dir = make_tiny_coco(str(tmp_path))
    src = load_coco(ann_file, image_dir, check_images=False)
    os.remove(os.path.join(image_dir, "deep.png"))
    ds = make_dataset(src, batch_size=5, image_size=(32, 32), training=True, repeat=True, seed=0)
    with pytest.raises(Exception, match=r"deep\.png"):
        next(iter(ds))


def test_huge_image_is_resized_onto_the_canvas(tmp_path):
    h, w = 6000, 8000
    image = np.zeros((h, w, 3), np.uint8)
    image[1000:3000, 2000:6000] = 255  # a white rectangle, annotated below
    write_image(str(tmp_path / "images" / "huge.png"), image)
    del image
    ann = {"images": [{"id": 1, "file_name": "huge.png", "height": h, "width": w}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2000, 1000, 4000, 2000]}],
           "categories": [{"id": 1, "name": "box"}]}
    path = str(tmp_path / "huge.json")
    with open(path, "w") as f:
        json.dump(ann, f)
    src = load_coco(path, str(tmp_path / "images"))
    images, labels = next(iter(make_dataset(src, batch_size=1, image_size=(64, 64))))
    scale = 64 / 8000
    assert images.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(labels["image_scale"].numpy(), [scale], rtol=1e-6)
    np.testing.assert_allclose(labels["boxes"][0, 0].numpy(), np.array([1000, 2000, 3000, 6000]) * scale, atol=1e-3)
    # The canvas shows the rectangle where the box says (bottom rows are padding).
    canvas = images[0].numpy()
    assert canvas[12:22, 20:44].min() > 200 and canvas[:6, :].max() < 60 and (canvas[48:] == 0).all()
    assert cv2.imread(str(tmp_path / "images" / "huge.png"), cv2.IMREAD_UNCHANGED).shape == (h, w, 3)
