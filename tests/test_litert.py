"""LiteRT export: builtin ops only, detections equal to the SavedModel's uint8 signature
(float32; tolerance 1e-4 normalized box units, 1e-5 scores), dynamic int8 smaller and
close, a fixed input size other than the canvas, clear errors (unsupported family, mask
model, wrong input, existing file), and ``kerasdet export --format litert``."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from test_export import CATEGORY_IDS
from test_serving import FAMILIES

from kerasdet.errors import UserInputError
from kerasdet.export import make_serving_function
from kerasdet.litert import (LiteRTConversionError, builtin_ops, convert_to_litert, export_litert,
                             interpreter_class, load_litert)


def _built(name):
    factory, size, ids = FAMILIES[name]
    model = factory()
    model.build((None, *size, 3))
    return model, size, ids


def _image(size, seed=0):
    return np.random.RandomState(seed).randint(0, 255, (1, *size, 3)).astype(np.uint8)


def _reference(model, image, *, image_size, ids):
    """The SavedModel's uint8 signature traced with the LiteRT backends (padded NMS,
    gather RoIAlign), in process."""
    with builtin_ops(model):
        fn = make_serving_function(model, image_size=image_size, category_ids=ids)
        return {k: v.numpy() for k, v in fn(tf.constant(image)).items()}


def _assert_same(out, ref):
    n = int(ref["num_detections"][0])
    assert int(out["num_detections"][0]) == n and n > 0
    np.testing.assert_array_equal(out["detection_classes"][0, :n], ref["detection_classes"][0, :n])
    np.testing.assert_allclose(out["detection_boxes"][0, :n], ref["detection_boxes"][0, :n], atol=1e-4)
    np.testing.assert_allclose(out["detection_scores"][0, :n], ref["detection_scores"][0, :n], atol=1e-5)
    assert set(out["detection_classes"][0, n:]) <= {-1}


def _op_names(flatbuffer):
    interpreter = interpreter_class()(model_content=flatbuffer)
    return {op["op_name"] for op in interpreter._get_ops_details()}


@pytest.mark.parametrize("name", ["retinanet", "assd", "faster_rcnn_fpn"])
def test_float32_export_equals_the_serving_signature(name, tmp_path):
    model, size, ids = _built(name)
    path = export_litert(model, tmp_path / name, image_size=size, category_ids=ids)
    assert path.endswith(".tflite")
    if name == "faster_rcnn_fpn":  # the model keeps its own backends after the export
        assert (model.nms_method, model.roi_layer.method) == ("auto", "auto")
    detector = load_litert(path)
    for seed in range(2):
        image = _image(size, seed)
        _assert_same(detector(image), _reference(model, image, image_size=size, ids=ids))
    meta = json.load(open(tmp_path / f"{name}.json"))
    assert meta["category_ids"] == list(ids) and meta["input_size"] == list(size)
    assert meta["quantization"] == "float32" and meta["bytes"] == os.path.getsize(path)
    # builtins only: no Flex (select TF) or custom op, no unfrozen variables
    ops = _op_names(open(path, "rb").read())
    assert not [op for op in ops if op.startswith("Flex") or op in ("CUSTOM", "VAR_HANDLE", "READ_VARIABLE")], ops
    assert "NON_MAX_SUPPRESSION_V4" in ops


def test_dynamic_int8_is_smaller_and_close(tmp_path):
    from kerasdet.backbones import small_backbone
    from kerasdet.models.retinanet import RetinaNet

    import keras

    keras.utils.set_random_seed(0)
    model = RetinaNet(backbone=small_backbone(widths=(16, 32, 48, 64), blocks=(0, 1, 1, 1)), num_classes=3,
                      min_level=3, max_level=5, fpn_channels=64, head_convs=2, head_channels=64, anchor_size=2.0,
                      prior_probability=0.1, max_detections=20)
    model.build()
    f32 = export_litert(model, tmp_path / "f32", image_size=(64, 64), category_ids=CATEGORY_IDS)
    i8 = export_litert(model, tmp_path / "i8", image_size=(64, 64), category_ids=CATEGORY_IDS,
                       quantization="dynamic_int8")
    assert os.path.getsize(i8) < 0.45 * os.path.getsize(f32)
    image = _image((64, 64))
    a, b = load_litert(f32)(image), load_litert(i8)(image)
    # same best detection, scores within 0.02 (weights rounded to 8 bits, activations float)
    np.testing.assert_allclose(np.sort(b["detection_scores"][0])[::-1][:5],
                               np.sort(a["detection_scores"][0])[::-1][:5], atol=0.02)
    top_a, top_b = a["detection_boxes"][0, 0], b["detection_boxes"][0, 0]
    assert np.abs(top_a - top_b).max() < 0.05
    assert json.load(open(tmp_path / "i8.json"))["quantization"] == "dynamic_int8"


def test_fixed_input_size_other_than_the_canvas(tmp_path):
    """A 96x80 device image is resized onto the 64x64 canvas inside the graph and the
    boxes come back normalized to the 96x80 image, as the SavedModel's signature does."""
    model, size, ids = _built("retinanet")
    path = export_litert(model, tmp_path / "m", image_size=size, input_size=(96, 80), category_ids=ids)
    image = _image((96, 80), seed=3)
    _assert_same(load_litert(path)(image), _reference(model, image, image_size=size, ids=ids))
    with pytest.raises(UserInputError, match=r"expects images of shape \[1, 96, 80, 3\]"):
        load_litert(path)(_image((64, 64)))
    with pytest.raises(UserInputError, match="uint8"):
        load_litert(path)(image.astype(np.float32))


def test_clear_errors(tmp_path):
    model, size, ids = _built("rfcn")
    with pytest.raises(LiteRTConversionError, match="RFCN does not convert to LiteRT with builtin ops only"):
        convert_to_litert(model, image_size=size, category_ids=ids)
    model, size, ids = _built("decompnet")
    with pytest.raises(LiteRTConversionError, match="instance masks"):
        convert_to_litert(model, image_size=size, category_ids=ids)
    model, size, ids = _built("retinanet")
    with pytest.raises(UserInputError, match="quantization must be one of"):
        convert_to_litert(model, image_size=size, quantization="int4")
    path = export_litert(model, tmp_path / "m.tflite", image_size=size, category_ids=ids)
    with pytest.raises(UserInputError, match="exists already"):
        export_litert(model, path, image_size=size, category_ids=ids)
    export_litert(model, path, image_size=size, category_ids=ids, overwrite=True)
    with pytest.raises(UserInputError, match="does not exist"):
        load_litert(tmp_path / "missing.tflite")
