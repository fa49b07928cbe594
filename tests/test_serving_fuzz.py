"""Serving fuzz: the exported SavedModel of every detector family survives any valid input
(1x1 .. 4000x4000, 1x3000 / 3000x1, batches 1-8, all-black / all-white / noise) with the
documented output shapes, dtypes and value ranges, and rejects wrong inputs with a clear
``InvalidArgumentError`` (dtype: TensorFlow's signature check; rank/channels/empty: the
in-graph ``check_images`` of :mod:`kerasdet.export`).

Adding a family is one entry in ``FAMILIES`` (a factory of a tiny model).
"""
import importlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.export import export_saved_model

CATEGORY_IDS = [3, 7, 11]
IMAGE_SIZE = (64, 64)


def _small_backbone():
    from kerasdet.backbones import small_backbone

    return small_backbone(widths=(8, 16, 16, 16), blocks=(0, 0, 0, 0))


def _retinanet():
    from kerasdet.models.retinanet import RetinaNet

    return RetinaNet(backbone=_small_backbone(), num_classes=3, min_level=3, max_level=5, fpn_channels=16,
                     head_convs=1, head_channels=16, anchor_size=2.0, prior_probability=0.1, max_detections=20)


def _ssd():
    ssd = importlib.import_module("kerasdet.models.ssd")
    return ssd.SSD(backbone=_small_backbone(), num_classes=3, extra_layers=((8, 16, 2, "same"), (8, 16, 2, "same")),
                   min_sizes=(0.15, 0.3, 0.5, 0.7, 0.85), aspect_ratios=((2.0,),) * 5, fusion_channels=8)


def _faster_rcnn():
    frcnn = importlib.import_module("kerasdet.models.faster_rcnn")
    return frcnn.FasterRCNN(backbone=_small_backbone(), num_classes=3, min_level=3, max_level=5, roi_min_level=3,
                            roi_max_level=5, fpn_channels=16, rpn_channels=16,
                            rpn_pre_nms_topk_test=64, rpn_post_nms_topk_test=32, num_rois=16, fc_dim=32,
                            max_detections=20, detections_pre_nms_topk=64)


#: family -> (module that must exist, tiny-model factory)
FAMILIES = {
    "retinanet": ("kerasdet.models.retinanet", _retinanet),
    "ssd": ("kerasdet.models.ssd", _ssd),
    "faster_rcnn": ("kerasdet.models.faster_rcnn", _faster_rcnn),
}

#: (name, batch shape, fill: 0 black, 255 white, None noise)
CASES = [
    ("1x1", (1, 1, 1, 3), None),
    ("1x1_batch8_black", (8, 1, 1, 3), 0),
    ("2x2_batch8_white", (8, 2, 2, 3), 255),
    ("1x3000", (1, 1, 3000, 3), None),
    ("3000x1", (1, 3000, 1, 3), None),
    ("2x3000_batch2_white", (2, 2, 3000, 3), 255),
    ("17x5_batch3", (3, 17, 5, 3), None),
    ("64x64_black", (1, 64, 64, 3), 0),
    ("480x640_batch4", (4, 480, 640, 3), None),
    ("4000x4000_white", (1, 4000, 4000, 3), 255),
    ("4000x4000_noise", (1, 4000, 4000, 3), None),
]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def served(request, tmp_path_factory):
    module, factory = FAMILIES[request.param]
    try:
        importlib.import_module(module)
    except ModuleNotFoundError:
        pytest.skip(f"{module} does not exist yet")
    keras.utils.set_random_seed(0)
    model = factory()
    path = str(tmp_path_factory.mktemp(f"serve_{request.param}") / "saved_model")
    export_saved_model(model, path, image_size=IMAGE_SIZE, category_ids=CATEGORY_IDS)
    fn = tf.saved_model.load(path).signatures["serving_default"]
    return request.param, fn


def _images(shape, fill, seed=0):
    if fill is None:
        return np.random.RandomState(seed).randint(0, 256, shape).astype(np.uint8)
    return np.full(shape, fill, np.uint8)


@pytest.mark.parametrize("name, shape, fill", CASES, ids=[c[0] for c in CASES])
def test_any_valid_image_is_served_with_documented_outputs(served, name, shape, fill):
    family, fn = served
    out = {k: v.numpy() for k, v in fn(images=tf.constant(_images(shape, fill))).items()}
    b = shape[0]
    assert set(out) == {"detection_boxes", "detection_scores", "detection_classes", "num_detections"}
    boxes, scores, classes, num = (out[k] for k in ("detection_boxes", "detection_scores", "detection_classes",
                                                       "num_detections"))
    assert boxes.dtype == np.float32 and scores.dtype == np.float32
    assert classes.dtype == np.int32 and num.dtype == np.int32
    k = boxes.shape[1]
    assert boxes.shape == (b, k, 4) and scores.shape == (b, k) and classes.shape == (b, k) and num.shape == (b,)
    assert np.isfinite(boxes).all() and np.isfinite(scores).all()
    assert boxes.min() >= 0.0 and boxes.max() <= 1.0
    assert ((num >= 0) & (num <= k)).all()
    for i in range(b):
        n = int(num[i])
        assert set(classes[i, :n].tolist()) <= set(CATEGORY_IDS)
        assert (classes[i, n:] == -1).all()
        assert ((scores[i, :n] >= 0) & (scores[i, :n] <= 1)).all()
        assert (boxes[i, :n, 2] >= boxes[i, :n, 0]).all() and (boxes[i, :n, 3] >= boxes[i, :n, 1]).all()


@pytest.mark.parametrize("images, match", [
    (np.zeros((1, 8, 8, 3), np.float32), "expected to be a uint8 tensor but is a float tensor"),
    (np.zeros((1, 8, 8, 3), np.int32), "expected to be a uint8 tensor but is a int32 tensor"),
    (np.zeros((8, 8, 3), np.uint8), r"Shape of tensor images \[8,8,3\] is not compatible with expected shape \[\?,\?,\?,3\]"),
    (np.zeros((1, 1, 8, 8, 3), np.uint8), r"Shape of tensor images \[1,1,8,8,3\] is not compatible"),
    (np.zeros((1, 8, 8, 1), np.uint8), r"Shape of tensor images \[1,8,8,1\] is not compatible"),
    (np.zeros((1, 8, 8, 4), np.uint8), r"Shape of tensor images \[1,8,8,4\] is not compatible"),
    (np.zeros((1, 0, 8, 3), np.uint8), "with batch, height, width >= 1; got an empty batch or image"),
    (np.zeros((0, 8, 8, 3), np.uint8), "with batch, height, width >= 1; got an empty batch or image"),
], ids=["float32", "int32", "rank3", "rank5", "grey", "rgba", "zero_height", "empty_batch"])
def test_wrong_inputs_get_a_clear_error(served, images, match):
    _, fn = served
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        fn(images=tf.constant(images))
