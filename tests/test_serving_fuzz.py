"""Serving fuzz: the exported SavedModel of every detector family survives any valid input
(1x1 .. 4000x4000, 1x3000 / 3000x1, batches 1-8, all-black / all-white / noise) with the
documented output shapes, dtypes and value ranges, on the uint8 ``serving_default`` and on
the ``encoded_image`` / ``tf_example`` signatures (the same images as PNG files, mixed
sizes in one batch), and rejects wrong inputs with a clear ``InvalidArgumentError``
(dtype: TensorFlow's signature check; rank/channels/empty: the in-graph ``check_images``;
empty / undecodable strings, empty batches: ``check_encoded`` of :mod:`kerasdet.export`;
a truncated JPEG: TensorFlow's decoder). Grey, RGBA and 16-bit PNGs get the documented
conversion (grey replicated, alpha dropped, the high byte of 16 bits).

Adding a family is one entry in ``FAMILIES`` (a factory of a tiny model).
"""
import importlib

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.export import encode_example, export_saved_model

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
    loaded = tf.saved_model.load(path)
    return request.param, loaded.signatures["serving_default"], loaded.signatures


def _images(shape, fill, seed=0):
    if fill is None:
        return np.random.RandomState(seed).randint(0, 256, shape).astype(np.uint8)
    return np.full(shape, fill, np.uint8)


@pytest.mark.parametrize("name, shape, fill", CASES, ids=[c[0] for c in CASES])
def test_any_valid_image_is_served_with_documented_outputs(served, name, shape, fill):
    family, fn, _ = served
    out = {k: v.numpy() for k, v in fn(images=tf.constant(_images(shape, fill))).items()}
    assert set(out) == {"detection_boxes", "detection_scores", "detection_classes", "num_detections"}
    _assert_documented_outputs(out, shape[0])


def _assert_documented_outputs(out, b):
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
    _, fn, _ = served
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        fn(images=tf.constant(images))


def _png(image):
    if image.ndim == 3 and image.shape[-1] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    elif image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    return cv2.imencode(".png", image)[1].tobytes()


#: (name, [(h, w), ...] of one encoded batch, fill)
ENCODED_CASES = [
    ("1x1", [(1, 1)], None),
    ("mixed_1x3000_3000x1_17x5", [(1, 3000), (3000, 1), (17, 5)], None),
    ("mixed_batch8_black", [(1 + 7 * i, 2 + 5 * i) for i in range(8)], 0),
    ("480x640_and_64x64_white", [(480, 640), (64, 64)], 255),
    ("4000x4000_noise", [(4000, 4000)], None),
]


@pytest.mark.parametrize("signature", ["encoded_image", "tf_example"])
@pytest.mark.parametrize("name, sizes, fill", ENCODED_CASES, ids=[c[0] for c in ENCODED_CASES])
def test_any_valid_encoded_batch_is_served_with_documented_outputs(served, signature, name, sizes, fill):
    """Mixed sizes in one batch; each image's boxes normalized to its own size, equal to the
    uint8 signature's answer for that image alone."""
    _, fn, signatures = served
    images = [_images((h, w, 3), fill, seed=i) for i, (h, w) in enumerate(sizes)]
    files = [_png(im) for im in images]
    if signature == "encoded_image":
        out = signatures["encoded_image"](image_bytes=tf.constant(files))
    else:
        out = signatures["tf_example"](serialized_examples=tf.constant([encode_example(f) for f in files]))
    out = {k: v.numpy() for k, v in out.items()}
    shapes = out.pop("image_shapes")
    np.testing.assert_array_equal(shapes, sizes)
    assert shapes.dtype == np.int32
    _assert_documented_outputs(out, len(sizes))
    for i in {0, len(images) - 1}:
        alone = {k: v.numpy() for k, v in fn(images=tf.constant(images[i][None])).items()}
        for key in alone:
            np.testing.assert_allclose(out[key][i], alone[key][0], atol=1e-5, err_msg=key)


def _jpeg(seed=0):
    return cv2.imencode(".jpg", _images((48, 40, 3), None, seed))[1].tobytes()


BAD_ENCODED = [
    ([b"hello world, not an image"], r"not a JPEG, PNG, GIF or BMP image \(by its first bytes\) at batch index\(es\)\] \[0\]"),
    ([_jpeg(), b""], r"holds an empty string at batch index\(es\)\] \[1\]"),
    ([_jpeg(), _jpeg()[:300]], "Invalid JPEG data"),
    ([_jpeg(), b"\x89PNG\r\n\x1a\n" + b"\0" * 20], "PNG"),
    ([], "string \\[batch\\] with batch >= 1; got an empty batch"),
]
BAD_IDS = ["undecodable", "empty_string", "truncated_jpeg", "broken_png", "empty_batch"]


@pytest.mark.parametrize("signature", ["encoded_image", "tf_example"])
@pytest.mark.parametrize("batch, match", BAD_ENCODED, ids=BAD_IDS)
def test_bad_encoded_requests_get_a_clear_error(served, signature, batch, match):
    _, _, signatures = served
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        if signature == "encoded_image":
            signatures["encoded_image"](image_bytes=tf.constant(batch, dtype=tf.string))
        else:
            signatures["tf_example"](serialized_examples=tf.constant([encode_example(b) for b in batch], tf.string))


@pytest.mark.parametrize("examples, match", [
    ([tf.train.Example().SerializeToString()], "image/encoded"),
    ([b"not a proto"], "Could not parse example input"),
    ([tf.train.Example(features=tf.train.Features(feature={"image/encoded": tf.train.Feature(
        int64_list=tf.train.Int64List(value=[1]))})).SerializeToString()], "image/encoded"),
], ids=["missing_key", "not_an_example", "wrong_feature_type"])
def test_bad_tf_examples_get_a_clear_error(served, examples, match):
    _, _, signatures = served
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        signatures["tf_example"](serialized_examples=tf.constant(examples))


def test_wrong_dtype_on_the_encoded_signature(served):
    _, _, signatures = served
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError, ValueError), match="string"):
        signatures["encoded_image"](image_bytes=tf.constant([1, 2]))


@pytest.mark.parametrize("kind", ["grey", "rgba", "png16"])
def test_grey_rgba_and_16bit_pngs_get_the_documented_conversion(served, kind):
    """Grey -> replicated to RGB; RGBA -> alpha dropped (not composited); 16-bit -> the
    high byte (``tf.image.convert_image_dtype``): the answer equals the uint8 signature's
    on the converted pixels."""
    _, fn, signatures = served
    rng = np.random.RandomState(7)
    if kind == "grey":
        source = rng.randint(0, 256, (50, 60)).astype(np.uint8)
        rgb = np.repeat(source[..., None], 3, axis=-1)
    elif kind == "rgba":
        source = rng.randint(0, 256, (50, 60, 4)).astype(np.uint8)
        rgb = source[..., :3]
    else:
        source = rng.randint(0, 65536, (50, 60, 3)).astype(np.uint16)
        rgb = (source >> 8).astype(np.uint8)
    out = {k: v.numpy() for k, v in signatures["encoded_image"](image_bytes=tf.constant([_png(source)])).items()}
    ref = {k: v.numpy() for k, v in fn(images=tf.constant(rgb[None])).items()}
    assert int(ref["num_detections"][0]) > 0
    for key in ref:
        np.testing.assert_allclose(out[key], ref[key], atol=1e-6, err_msg=key)
