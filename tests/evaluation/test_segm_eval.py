"""Mask AP (``iou_type="segm"``, metric ``"coco_segm"``) equals pycocotools run directly on
masks encoded at the original image size; crowd regions and an image without objects
included (segm_testdata)."""
import json

import numpy as np
import pytest
from segm_testdata import (
    CATEGORY_IDS,
    IMAGES,
    SCALES,
    detections,
    direct_cocoeval,
    gt_objects,
    reference_results,
    to_network_batch,
    write_gt,
)

from kerasdet.errors import DataError
from kerasdet.evaluation import MASK_STAT_KEYS, STAT_KEYS, CocoEvaluator
from kerasdet.evaluation.coco_eval import canvas_masks_to_original, detections_to_coco_results
from kerasdet.evaluation.metrics import format_stats, make_evaluator, primary_key, stat_keys

IMAGE_IDS = sorted(IMAGES)


@pytest.fixture
def gt_file(tmp_path):
    return write_gt(tmp_path / "instances_masks.json")


def _feed(evaluator, dets, batches=((1, 2), (3,)), max_det=16):
    for ids in batches:
        out = to_network_batch(dets, list(ids), max_det)
        evaluator.update(np.array(ids), out["boxes"], out["scores"], out["classes"],
                         out["num_detections"], np.array([SCALES[i] for i in ids], np.float32),
                         masks=out["masks"])


def test_canvas_masks_come_back_at_the_original_size():
    rng = np.random.default_rng(0)
    original = np.kron(rng.integers(0, 2, size=(5, 7)), np.ones((2, 2))).astype(np.uint8)
    canvas = np.zeros((1, 30, 40), np.float32)
    canvas[0, :5, :7] = original[::2, ::2]   # scale 0.5: lossless on 2x2 blocks
    canvas[0, 20:, 30:] = 1.0                # padding, outside the image's region
    back = canvas_masks_to_original(canvas, scale_y=0.5, scale_x=0.5, height=10, width=14)
    assert back.shape == (10, 14, 1) and back.dtype == np.uint8 and back.flags.f_contiguous
    np.testing.assert_array_equal(back[..., 0], original)
    # per-axis scales, soft values binarized at 0.5
    canvas = np.zeros((1, 20, 7), np.float32)
    canvas[0] = np.kron(original, np.ones((2, 1)))[:, ::2] * 0.75  # rows x2, columns x0.5
    back = canvas_masks_to_original(canvas, scale_y=2.0, scale_x=0.5, height=10, width=14)
    np.testing.assert_array_equal(back[..., 0], original)
    canvas[0] *= 0.6  # 0.45 < 0.5 everywhere
    assert canvas_masks_to_original(canvas, scale_y=2.0, scale_x=0.5, height=10,
                                    width=14).sum() == 0


def test_results_carry_rle_at_the_original_size():
    dets = detections(seed=1)
    out = to_network_batch(dets, IMAGE_IDS, 16)
    sizes = np.array([[IMAGES[i][1], IMAGES[i][0]] for i in IMAGE_IDS])
    results = detections_to_coco_results(
        image_ids=IMAGE_IDS, boxes=out["boxes"], scores=out["scores"], classes=out["classes"],
        num_detections=out["num_detections"], image_scales=[SCALES[i] for i in IMAGE_IDS],
        category_ids=CATEGORY_IDS, masks=out["masks"], image_sizes=sizes)
    want = sorted(reference_results(dets, "segm"), key=lambda r: (r["image_id"], -r["score"]))
    got = sorted(results, key=lambda r: (r["image_id"], -r["score"]))
    assert len(got) == len(want) == len(dets)
    for g, w in zip(got, want):
        assert g["segmentation"] == w["segmentation"]  # same RLE, counts as str
        assert (g["image_id"], g["category_id"], g["score"]) == (
            w["image_id"], w["category_id"], w["score"])
    json.dumps(results)  # JSON-ready
    with pytest.raises(ValueError, match="image_sizes"):
        detections_to_coco_results(
            image_ids=IMAGE_IDS, boxes=out["boxes"], scores=out["scores"],
            classes=out["classes"], num_detections=out["num_detections"], image_scales=1.0,
            category_ids=CATEGORY_IDS, masks=out["masks"])


@pytest.mark.parametrize("seed", [0, 1])
def test_mask_ap_equals_pycocotools(gt_file, seed):
    dets = detections(seed=seed)
    want_segm = direct_cocoeval(gt_file, reference_results(dets, "segm"), "segm")
    want_bbox = direct_cocoeval(gt_file, reference_results(dets, "bbox"), "bbox")
    assert 0.0 < want_segm[0] < 1.0 and want_segm != want_bbox

    ev = CocoEvaluator(gt_file, category_ids=CATEGORY_IDS, iou_type="segm")
    assert ev.needs_masks
    _feed(ev, dets)
    stats = ev.evaluate()
    assert list(stats) == list(MASK_STAT_KEYS)
    np.testing.assert_allclose([stats[k] for k in MASK_STAT_KEYS], want_segm, rtol=0, atol=1e-12)

    both = make_evaluator("coco_segm", str(gt_file), category_ids=CATEGORY_IDS)
    _feed(both, dets, batches=((3, 1), (2,)))
    stats = both.evaluate()
    assert list(stats) == list(stat_keys("coco_segm")) == list(STAT_KEYS + MASK_STAT_KEYS)
    np.testing.assert_allclose([stats[k] for k in STAT_KEYS], want_bbox, rtol=0, atol=1e-12)
    np.testing.assert_allclose([stats[k] for k in MASK_STAT_KEYS], want_segm, rtol=0, atol=1e-12)
    assert primary_key("coco_segm") == "mask_AP"
    table = format_stats(stats)
    assert "mask_AP50" in table and "Mask Average Precision" in table
    assert len(table.splitlines()) == 2 + 24


def test_crowd_and_empty_image_count_as_pycocotools_does(gt_file):
    # only detections on the crowd region and on the image without objects: no true
    # positives, the crowd one is ignored, the other is a false positive
    crowd_mask = next(m for _, _, m, crowd in gt_objects() if crowd)
    dets = [d for d in detections(seed=0) if d[0] == 3] + [(1, 3, crowd_mask, 0.5)]
    ev = CocoEvaluator(gt_file, category_ids=CATEGORY_IDS, iou_type="segm")
    _feed(ev, dets)
    stats = ev.evaluate()
    want = direct_cocoeval(gt_file, reference_results(dets, "segm"), "segm")
    np.testing.assert_allclose([stats[k] for k in MASK_STAT_KEYS], want, rtol=0, atol=1e-12)
    assert stats["mask_AP"] == 0.0


def test_no_detections_and_subset_of_images(gt_file):
    ev = CocoEvaluator(gt_file, category_ids=CATEGORY_IDS, iou_type="segm")
    _feed(ev, [], batches=((1, 2, 3),))
    stats = ev.evaluate()  # (pycocotools' loadRes([]) itself crashes: nothing to compare)
    assert stats["mask_AP"] == 0.0 and stats["mask_AR100"] == 0.0

    dets = [d for d in detections(seed=0) if d[0] == 2]
    ev.reset()
    _feed(ev, dets, batches=((2,),))
    stats = ev.evaluate()
    want = direct_cocoeval(gt_file, reference_results(dets, "segm"), "segm", image_ids=[2])
    np.testing.assert_allclose([stats[k] for k in MASK_STAT_KEYS], want, rtol=0, atol=1e-12)
    assert stats["mask_APl"] == -1.0  # image 2 has no large object


def test_segm_needs_masks_and_masked_ground_truth(gt_file, tmp_path):
    ev = CocoEvaluator(gt_file, category_ids=CATEGORY_IDS, iou_type="segm")
    out = to_network_batch(detections(), [1], 16)
    with pytest.raises(ValueError, match="'masks' are required"):
        ev.update([1], out["boxes"], out["scores"], out["classes"], out["num_detections"], [2.0])
    # a bbox evaluator ignores masks: same stats with or without them
    box = CocoEvaluator(gt_file, category_ids=CATEGORY_IDS)
    assert not box.needs_masks
    _feed(box, detections())
    assert "segmentation" not in box.results[0]

    data = json.loads(gt_file.read_text())
    del data["annotations"][1]["segmentation"]
    no_masks = tmp_path / "boxes_only.json"
    no_masks.write_text(json.dumps(data))
    with pytest.raises(DataError, match="annotation 2 .*no 'segmentation'"):
        CocoEvaluator(no_masks, category_ids=CATEGORY_IDS, iou_type="segm")
    with pytest.raises(ValueError, match="iou_type"):
        CocoEvaluator(gt_file, category_ids=CATEGORY_IDS, iou_type="keypoints")


def test_results_file_rescored_by_pycocotools(gt_file, tmp_path):
    dets = detections(seed=2)
    ev = make_evaluator("coco_segm", gt_file, category_ids=CATEGORY_IDS)
    _feed(ev, dets)
    stats = ev.evaluate()
    path = ev.write_results(tmp_path / "results.json")
    results = json.loads(open(path).read())
    assert all("segmentation" in r and "bbox" in r for r in results)
    # pycocotools takes a result's area from its bbox when one is present: mask AP drops it
    segm_only = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    np.testing.assert_allclose([stats[k] for k in MASK_STAT_KEYS],
                               direct_cocoeval(gt_file, segm_only, "segm"), rtol=0, atol=1e-12)
    np.testing.assert_allclose([stats[k] for k in STAT_KEYS],
                               direct_cocoeval(gt_file, results, "bbox"), rtol=0, atol=1e-12)


def _lookup_detector(table):
    """The fake detector of test_callback (detections, masks included, looked up by the
    image id written in pixel (0, 0, 0))."""
    from evaluation_testdata import LookupDetector

    return LookupDetector(table)


def _id_dataset(batch_size=2):
    import tensorflow as tf

    images = np.zeros((len(IMAGE_IDS), 8, 8, 3), np.float32)
    images[:, 0, 0, 0] = IMAGE_IDS
    labels = {"image_id": np.array(IMAGE_IDS, np.int64),
              "image_scale": np.array([SCALES[i] for i in IMAGE_IDS], np.float32)}
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)


def test_fit_history_has_mask_ap_equal_to_pycocotools(gt_file):
    import keras

    from kerasdet.evaluation import CocoEvalCallback, evaluate_model

    dets = detections(seed=1)
    table = to_network_batch(dets, list(range(max(IMAGE_IDS) + 1)), 8)
    want = dict(zip(MASK_STAT_KEYS, direct_cocoeval(gt_file, reference_results(dets, "segm"),
                                                    "segm")))
    want.update(zip(STAT_KEYS, direct_cocoeval(gt_file, reference_results(dets, "bbox"), "bbox")))
    model = _lookup_detector(table)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    callback = CocoEvalCallback(_id_dataset(), str(gt_file), category_ids=CATEGORY_IDS,
                                metric="coco_segm", verbose=0)
    history = model.fit(_id_dataset(), epochs=1, callbacks=[callback], verbose=0)
    for key in STAT_KEYS + MASK_STAT_KEYS:
        assert history.history["val_" + key] == [pytest.approx(want[key], abs=1e-12)], key
    proposals = evaluate_model(model, _id_dataset(batch_size=3), gt_file,
                               category_ids=CATEGORY_IDS, metric="proposals_segm")
    assert proposals["mask_AR100"] == pytest.approx(
        direct_cocoeval(gt_file, reference_results(dets, "segm"), "segm", use_cats=False,
                        max_dets=(10, 100, 1000))[7], abs=1e-12)

    table.pop("masks")
    with pytest.raises(ValueError, match="'masks'"):
        evaluate_model(_lookup_detector(table), _id_dataset(), gt_file,
                       category_ids=CATEGORY_IDS, metric="coco_segm")


def test_decompnet_on_digits_through_the_engine(tmp_path):
    """A config with eval.metric='coco_segm': a (tiny, untrained) DecompNet's predict
    masks scored by builders.evaluate, equal to pycocotools on the results file it
    writes; digits images 48 px on a 64 px canvas (scale 4/3)."""
    from kerasdet.data.digits import generate_digits
    from kerasdet.engine import builders
    from kerasdet.engine.recipes import load_recipe
    from kerasdet.models.decompnet import DecompNet

    paths = generate_digits(str(tmp_path / "digits"), num_train=2, num_val=4,
                            image_size=(48, 48), seed=0)
    config = load_recipe("decompnet").config(
        "digits", {"eval.metric": "coco_segm", "input.image_size": [64, 64],
                   "input.min_size": None, "input.max_size": None, "eval.batch_size": 2})
    assert builders.HEADLINE_METRIC[config.eval.metric] == "mask_AP"
    source = builders.build_source(config, "val", paths=paths)
    dataset = builders.build_dataset(config, source, training=False)
    model = DecompNet(num_classes=source.num_classes, image_size=(64, 64), steps=3,
                      max_instances=3, units=16, instance_filters=8,
                      category_widths=(8, 8, 8, 8, 8, 8), box_hidden=16, weight_decay=0.0,
                      stop_threshold=0.0)  # untrained: emit every step, so results exist
    results_file = str(tmp_path / "val_results.json")
    stats = builders.evaluate(model, dataset, source, metric=config.eval.metric,
                              results_file=results_file)
    assert list(stats) == builders.metric_keys("coco_segm")
    results = json.loads(open(results_file).read())
    assert len(results) == 4 * source.num_classes * 3  # every step of every category
    assert {tuple(r["segmentation"]["size"]) for r in results} == {(48, 48)}
    segm_only = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    ids = sorted(source.image_ids)
    np.testing.assert_allclose(
        [stats[k] for k in MASK_STAT_KEYS],
        direct_cocoeval(paths["val_annotations"], segm_only, "segm", image_ids=ids),
        rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        [stats[k] for k in STAT_KEYS],
        direct_cocoeval(paths["val_annotations"], results, "bbox", image_ids=ids),
        rtol=0, atol=1e-12)


def test_engine_knows_every_metric():
    import typing

    from kerasdet.engine import builders
    from kerasdet.engine.config import EvalConfig
    from kerasdet.evaluation.metrics import METRICS, PRIMARY_KEYS

    assert builders.HEADLINE_METRIC == PRIMARY_KEYS
    assert set(typing.get_args(typing.get_type_hints(EvalConfig)["metric"])) == set(METRICS)
    for metric in METRICS:
        assert PRIMARY_KEYS[metric] in builders.metric_keys(metric)
