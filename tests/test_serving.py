"""The three serving signatures of every detector family, the warm-up file, and the
:mod:`kerasdet.serving` request helpers, each checked against in-process ``model.predict``
on the training pipeline's canvas (the reference of ``tests/test_export.py``).

Exports are made once per family per session (:func:`exported_family`, also used by
``test_serving_capi.py`` and ``test_serving_load.py``).
"""
import collections
import json
import os

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet import serving
from kerasdet.data.coco import load_coco
from kerasdet.data.geometry import numpy_resized_shapes
from kerasdet.data.pipeline import make_dataset
from kerasdet.export import WARMUP_FILE, encode_example, export_versioned, warmup_inputs
from test_export import CATEGORY_IDS, _model, _rfcn_model, _smn_model


def _faster_rcnn_c4():
    from kerasdet.backbones import small_backbone
    from kerasdet.models.faster_rcnn import FasterRCNN

    keras.utils.set_random_seed(3)
    return FasterRCNN(
        architecture="c4", feature_level=4, num_classes=3, anchor_size=1.0, scales=(1.0, 2.0),
        backbone=small_backbone(widths=(8, 16, 16, 16), blocks=(0, 0, 0, 0), levels=("C4",)),
        roi_pooler="crop_pool", rpn_channels=8, fc_dim=16, rpn_pre_nms_topk_test=100, rpn_post_nms_topk_test=16,
        max_detections=20, score_threshold=0.0)


def _decompnet():
    from kerasdet.models.decompnet import DecompNet

    keras.utils.set_random_seed(3)
    # stop="none", sigmoid maps, mask_threshold 0.5: every map with a pixel above 0.5 is emitted, so
    # an untrained model has detections and masks
    return DecompNet(num_classes=3, image_size=(40, 40), steps=4, max_instances=3, units=32, instance_filters=8,
                     category_widths=(8, 8, 8, 8, 8, 8), box_hidden=16, weight_decay=0.0, stop="none",
                     stop_threshold=0.0, mask_threshold=0.5, instance_activation="sigmoid")


def _sliding_window():
    from kerasdet.models.sliding_window import SlidingWindowDetector

    keras.utils.set_random_seed(3)
    return SlidingWindowDetector(num_classes=2, image_size=(32, 32), window_sizes=(8.0, 16.0), stride=4,
                                 patch_size=8, trunk=((8, 3, 2), (8, 3, 2)), score_threshold=0.0, max_detections=10)


#: family -> (tiny-model factory, network canvas, category ids)
FAMILIES = {
    "retinanet": (lambda: _model("retinanet"), (64, 64), CATEGORY_IDS),
    "faster_rcnn_fpn": (lambda: _model("faster_rcnn"), (64, 64), CATEGORY_IDS),
    "faster_rcnn_c4": (_faster_rcnn_c4, (64, 64), CATEGORY_IDS),
    "rfcn": (lambda: _rfcn_model("rfcn"), (64, 64), CATEGORY_IDS),
    "couplenet": (lambda: _rfcn_model("couplenet"), (64, 64), CATEGORY_IDS),
    "acouplenet": (lambda: _rfcn_model("acouplenet"), (64, 64), CATEGORY_IDS),
    "assd": (lambda: _model("assd"), (64, 64), CATEGORY_IDS),
    "smn": (lambda: _smn_model("smn"), (64, 64), CATEGORY_IDS),
    "decompnet": (_decompnet, (40, 40), CATEGORY_IDS),
    "sliding_window": (_sliding_window, (32, 32), [3, 7]),
}
MASK_FAMILIES = ("decompnet",)
BASE_OUTPUTS = {"detection_boxes", "detection_scores", "detection_classes", "num_detections"}
MASK_OUTPUTS = {"detection_masks", "detection_mask_scores"}

Exported = collections.namedtuple("Exported", "name model path image_size category_ids loaded")
_CACHE = {}


def exported_family(name, tmp_path_factory):
    """The family's tiny model exported once per session to ``<tmp>/<name>/1/`` (warm-up
    file included) and loaded with ``tf.saved_model.load``."""
    if name not in _CACHE:
        factory, image_size, ids = FAMILIES[name]
        model = factory()
        base = str(tmp_path_factory.mktemp(f"serving_{name}"))
        path = export_versioned(model, base, image_size=image_size, category_ids=ids, warmup=True)
        assert path == os.path.join(base, "1")
        _CACHE[name] = Exported(name, model, path, image_size, ids, tf.saved_model.load(path))
    return _CACHE[name]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    return exported_family(request.param, tmp_path_factory)


def mixed_images(seed=0, sizes=((96, 80), (50, 70), (120, 64))):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 256, (h, w, 3)).astype(np.uint8) for h, w in sizes]


def png(image):
    return cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()


def pipeline_predict(ex, images, tmp_dir):
    """In-process reference: each image through the evaluation pipeline (PNG file, COCO
    json, ``make_dataset``) and ``model.predict``, mapped to the serving conventions.
    Returns per-image dicts (``boxes`` rel_yxyx, ``scores``, ``classes`` dataset ids)."""
    os.makedirs(os.path.join(tmp_dir, "img"), exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in ex.category_ids]}
    for i, image in enumerate(images):
        cv2.imwrite(os.path.join(tmp_dir, "img", f"{i}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        coco["images"].append({"id": i + 1, "file_name": f"{i}.png", "height": image.shape[0],
                               "width": image.shape[1]})
    with open(os.path.join(tmp_dir, "ann.json"), "w") as f:
        json.dump(coco, f)
    source = load_coco(os.path.join(tmp_dir, "ann.json"), os.path.join(tmp_dir, "img"))
    refs = []
    for (canvas, _), image in zip(make_dataset(source, batch_size=1, image_size=ex.image_size), images):
        pred = ex.model.predict(canvas, verbose=0)
        n = int(pred["num_detections"][0])
        h, w = image.shape[:2]
        # the pipeline's per-axis ratios new / original (its labels follow the pixels so)
        new_h, new_w = (int(v[0]) for v in numpy_resized_shapes([h], [w], ex.image_size))
        ratio = np.array([new_h / h, new_w / w] * 2)
        refs.append({"num_detections": n, "scores": pred["scores"][0, :n],
                     "classes": np.asarray(ex.category_ids)[pred["classes"][0, :n]],
                     "boxes": np.clip(pred["boxes"][0, :n] / ratio / np.array([h, w, h, w]), 0, 1)})
    return refs


def assert_matches_predict(out, refs):
    """Served outputs (batch) against :func:`pipeline_predict`'s per-image references."""
    out = {k: np.asarray(v) for k, v in out.items()}
    assert int(np.sum(out["num_detections"])) > 0, "a comparison of no detections proves little"
    for i, ref in enumerate(refs):
        n = ref["num_detections"]
        assert int(out["num_detections"][i]) == n
        np.testing.assert_allclose(out["detection_scores"][i, :n], ref["scores"], atol=1e-5)
        np.testing.assert_array_equal(out["detection_classes"][i, :n], ref["classes"])
        assert np.all(out["detection_classes"][i, n:] == -1)
        np.testing.assert_allclose(out["detection_boxes"][i, :n], ref["boxes"], atol=0.01)


def _numpy(out):
    return {k: v.numpy() for k, v in out.items()}


def test_encoded_and_tf_example_signatures_serve_mixed_sizes_like_predict(family, tmp_path):
    """One batch of three differently sized PNGs through ``encoded_image`` and
    ``tf_example``: each image's detections equal the pipeline + ``predict`` reference
    (boxes normalized to each image's own size) and the uint8 signature's answer for that
    image alone; mask models return masks on every signature."""
    sigs = family.loaded.signatures
    assert set(sigs) == {"serving_default", "encoded_image", "tf_example"}
    images = mixed_images()
    files = [png(im) for im in images]
    enc = _numpy(sigs["encoded_image"](image_bytes=tf.constant(files)))
    exa = _numpy(sigs["tf_example"](serialized_examples=tf.constant([encode_example(f) for f in files])))
    masks = family.name in MASK_FAMILIES
    expected = BASE_OUTPUTS | (MASK_OUTPUTS if masks else set())
    assert set(enc) == set(exa) == expected | {"image_shapes"}
    np.testing.assert_array_equal(enc["image_shapes"], [im.shape[:2] for im in images])
    for key in enc:
        np.testing.assert_array_equal(exa[key], enc[key], err_msg=key)
    assert_matches_predict(enc, pipeline_predict(family, images, str(tmp_path)))
    for i, image in enumerate(images):
        alone = _numpy(sigs["serving_default"](images=tf.constant(image[None])))
        assert set(alone) == expected
        for key in BASE_OUTPUTS | ({"detection_mask_scores"} if masks else set()):
            np.testing.assert_allclose(enc[key][i], alone[key][0], atol=1e-5, err_msg=key)
        if masks:
            h, w = image.shape[:2]
            np.testing.assert_array_equal(enc["detection_masks"][i, :, :h, :w], alone["detection_masks"][0])
            assert not enc["detection_masks"][i, :, h:, :].any() and not enc["detection_masks"][i, :, :, w:].any()
            assert alone["detection_masks"][0, : int(alone["num_detections"][0])].any()


@pytest.mark.parametrize("fmt", ["jpeg", "gif", "bmp"])
def test_jpeg_gif_bmp_are_decoded_in_the_graph(fmt, tmp_path_factory):
    """JPEG, GIF and BMP files give the uint8 signature's answer on TensorFlow's decoding
    of the same file (BMP is lossless: on the original pixels)."""
    ex = exported_family("retinanet", tmp_path_factory)
    image = mixed_images(seed=4)[0]
    data = cv2.imencode(f".{fmt}", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()
    decoded = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    if fmt == "bmp":
        np.testing.assert_array_equal(decoded, image)
    enc = _numpy(ex.loaded.signatures["encoded_image"](image_bytes=tf.constant([data])))
    ref = _numpy(ex.loaded.signatures["serving_default"](images=tf.constant(decoded[None])))
    assert int(ref["num_detections"][0]) > 0
    for key in ref:
        np.testing.assert_allclose(enc[key], ref[key], atol=1e-6, err_msg=key)


def _read_warmup(path):
    from tensorflow_serving.apis import prediction_log_pb2

    records = tf.data.TFRecordDataset(os.path.join(path, WARMUP_FILE))
    return [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in records]


def test_warmup_requests_replay_against_the_loaded_model(family, tmp_path):
    """``assets.extra/tf_serving_warmup_requests`` holds one ``PredictionLog`` per
    signature; replayed against the loaded model, the uint8 one answers like ``predict``,
    the ``tf.Example`` one like the encoded one, and the encoded (JPEG) one like the uint8
    signature on TensorFlow's decoding of that JPEG."""
    logs = _read_warmup(family.path)
    assert [log.WhichOneof("log_type") for log in logs] == ["predict_log"] * 3
    answers = {}
    for log in logs:
        request = log.predict_log.request
        inputs = serving.request_inputs(request)
        name = request.model_spec.signature_name
        assert list(inputs) == [serving.SIGNATURE_INPUTS[name]] and len(next(iter(inputs.values()))) == 1
        answers[name] = _numpy(family.loaded.signatures[name](**{k: tf.constant(v) for k, v in inputs.items()}))
        answers[name + "_inputs"] = inputs
    assert {"serving_default", "encoded_image", "tf_example"} <= set(answers)
    image = answers["serving_default_inputs"]["images"][0]
    assert image.shape == family.image_size + (3,)
    np.testing.assert_array_equal(image, warmup_inputs(family.image_size)["serving_default"]["images"][0])
    assert_matches_predict(answers["serving_default"], pipeline_predict(family, [image], str(tmp_path)))
    for key in answers["encoded_image"]:
        np.testing.assert_array_equal(answers["tf_example"][key], answers["encoded_image"][key], err_msg=key)
    jpeg = answers["encoded_image_inputs"]["image_bytes"][0]
    decoded = tf.io.decode_jpeg(jpeg, channels=3)[None]
    ref = _numpy(family.loaded.signatures["serving_default"](images=decoded))
    for key in ref:
        np.testing.assert_allclose(answers["encoded_image"][key], ref[key], atol=1e-5, err_msg=key)


# --- kerasdet.serving: REST bodies and gRPC protos ----------------------------------------------
@pytest.fixture(scope="module", params=["retinanet", "decompnet"])
def client_family(request, tmp_path_factory):
    return exported_family(request.param, tmp_path_factory)


def _request_batch(signature, images):
    if signature == "serving_default":
        return np.stack([im[:40, :48] for im in images])  # one size per uint8 batch
    files = [png(im) for im in images]
    return files if signature == "encoded_image" else [encode_example(f) for f in files]


def _reference_images(signature, images):
    return [im[:40, :48] for im in images] if signature == "serving_default" else images


SIGNATURES = ["encoded_image", "tf_example", "serving_default"]


@pytest.mark.parametrize("fmt", serving.REST_FORMATS)
@pytest.mark.parametrize("signature", SIGNATURES)
def test_rest_body_round_trip_matches_predict(client_family, signature, fmt, tmp_path):
    """:func:`serving.rest_request` bodies (row ``instances`` / columnar ``inputs``, bytes
    as ``{"b64": ...}``) survive JSON, convert to the signature's tensors, and the answer in
    TF Serving's JSON form parses (:func:`serving.parse_rest_response`) to ``predict``'s
    detections."""
    images = mixed_images(seed=2)
    batch = _request_batch(signature, images)
    body = json.loads(json.dumps(serving.rest_request(batch, signature_name=signature, format=fmt)))
    name = serving.SIGNATURE_INPUTS[signature]
    assert body["signature_name"] == signature
    if fmt == "instances":
        assert len(body["instances"]) == 3 and set(body["instances"][0]) == {name}
        first = body["instances"][0][name]
    else:
        assert set(body["inputs"]) == {name} and len(body["inputs"][name]) == 3
        first = body["inputs"][name][0]
    if signature != "serving_default":
        import base64

        assert set(first) == {"b64"} and base64.b64decode(first["b64"]) == bytes(batch[0])
    sig_name, inputs = serving.rest_request_to_inputs(json.dumps(body))
    assert sig_name == signature
    out = _numpy(client_family.loaded.signatures[sig_name](**{k: tf.constant(v) for k, v in inputs.items()}))
    answer = json.dumps(serving.outputs_to_rest_response(out, format=fmt))
    parsed = serving.parse_rest_response(answer)
    assert set(parsed) == set(out)
    for key in out:
        assert parsed[key].dtype == out[key].dtype, key
        np.testing.assert_allclose(parsed[key], out[key], rtol=1e-6, err_msg=key)
    assert_matches_predict(parsed, pipeline_predict(client_family, _reference_images(signature, images),
                                                    str(tmp_path)))


@pytest.mark.parametrize("signature", SIGNATURES)
def test_grpc_predict_request_round_trip_matches_predict(client_family, signature, tmp_path):
    """:func:`serving.predict_request` builds a ``PredictRequest`` (``DT_STRING [B]`` for
    bytes, ``DT_UINT8 [B, H, W, 3]`` for images) that survives the wire format; its
    tensors fed to the loaded signature and the ``PredictResponse`` parsed back give
    ``predict``'s detections."""
    from tensorflow.core.framework import types_pb2
    from tensorflow_serving.apis import predict_pb2

    images = mixed_images(seed=3)
    batch = _request_batch(signature, images)
    request = serving.predict_request(batch, model_name="digits", signature_name=signature, version=7)
    request = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    assert request.model_spec.name == "digits" and request.model_spec.version.value == 7
    assert request.model_spec.signature_name == signature
    proto = request.inputs[serving.SIGNATURE_INPUTS[signature]]
    if signature == "serving_default":
        assert proto.dtype == types_pb2.DT_UINT8 and [d.size for d in proto.tensor_shape.dim] == [3, 40, 48, 3]
    else:
        assert proto.dtype == types_pb2.DT_STRING and [d.size for d in proto.tensor_shape.dim] == [3]
        assert proto.string_val[1] == bytes(batch[1])
    inputs = serving.request_inputs(request)
    out = _numpy(client_family.loaded.signatures[signature](**{k: tf.constant(v) for k, v in inputs.items()}))
    wire = serving.outputs_to_predict_response(out, model_name="digits", version=7).SerializeToString()
    parsed = serving.parse_predict_response(predict_pb2.PredictResponse.FromString(wire))
    assert set(parsed) == set(out)
    for key in out:
        np.testing.assert_array_equal(parsed[key], out[key], err_msg=key)
    assert_matches_predict(parsed, pipeline_predict(client_family, _reference_images(signature, images),
                                                    str(tmp_path)))


@pytest.mark.parametrize("call, match", [
    (lambda: serving.rest_request([b"x"], signature_name="classify"), "unknown signature 'classify'"),
    (lambda: serving.rest_request({"images": [b"x"]}, signature_name="encoded_image"), "takes one input 'image_bytes'"),
    (lambda: serving.rest_request(["not bytes"], signature_name="encoded_image"), "a list of bytes"),
    (lambda: serving.rest_request(np.zeros((1, 4, 4, 3), np.float32), signature_name="serving_default"),
     r"uint8 \[batch, H, W, 3\]; got float32"),
    (lambda: serving.rest_request([], signature_name="encoded_image"), "an empty batch"),
    (lambda: serving.rest_request([b"x"], format="rows"), "format must be one of"),
    (lambda: serving.parse_rest_response({"error": "Servable not found"}), "Servable not found"),
    (lambda: serving.parse_rest_response({"result": 1}), "not a TF Serving predict answer"),
], ids=["signature", "input_name", "not_bytes", "float_images", "empty", "format", "server_error", "not_an_answer"])
def test_serving_helper_rejects_bad_arguments(call, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        call()


def test_rest_url():
    assert serving.rest_url("h", "digits") == "http://h:8501/v1/models/digits:predict"
    assert serving.rest_url("h", "digits", version=3, port=9) == "http://h:9/v1/models/digits/versions/3:predict"
