"""Client helper for a kerasdet model behind TF Serving: request bodies and response parsing.

A kerasdet export (:mod:`kerasdet.export`) has three signatures; a client picks one by
``signature_name`` and gives its one input:

==================== ======================= =============================================
signature            input                   element
==================== ======================= =============================================
``serving_default``  ``images``              uint8 ``[H, W, 3]`` (same size in a batch)
``encoded_image``    ``image_bytes``         bytes of a JPEG/PNG/GIF/BMP file
``tf_example``       ``serialized_examples`` bytes of a ``tf.train.Example``
                                             (``image/encoded``)
==================== ======================= =============================================

REST (https://www.tensorflow.org/tfx/serving/api_rest, "Predict API"):
``POST http://HOST:8501/v1/models/NAME[/versions/N]:predict`` with a JSON body in the row
format ``{"signature_name": ..., "instances": [{"image_bytes": {"b64": ...}}, ...]}`` or
the columnar format ``{"signature_name": ..., "inputs": {"image_bytes": [{"b64": ...},
...]}}``; binary values travel base64-encoded as ``{"b64": "..."}`` (the REST API's rule
for ``DT_STRING`` binary data). The answer is ``{"predictions": [{output: value}, ...]}``
(row) or ``{"outputs": {output: value}}`` (columnar). :func:`rest_request` builds the
body, :func:`parse_rest_response` turns the answer into ``{output: numpy array}``.

gRPC (``tensorflow_serving/apis/prediction_service.proto``, port 8500):
:func:`predict_request` builds a ``tensorflow.serving.PredictRequest`` (inputs as
``TensorProto`` from ``tf.make_tensor_proto``; strings are ``DT_STRING``) for
``PredictionServiceStub(channel).Predict(request, timeout)``;
:func:`parse_predict_response` reads the ``PredictResponse``. Both need the
``tensorflow-serving-api`` package (``pip install 'kerasdet[serving]'``); the REST
helpers need only numpy.

:func:`rest_request_to_inputs` and :func:`outputs_to_rest_response` mirror the server's
JSON <-> tensor conversion (the REST API document's rules), so a body or a parser can be
checked against a locally loaded SavedModel without a server (``tests/test_serving.py``).
"""
from __future__ import annotations

import base64
import json

import numpy as np

#: signature key -> its one input's name (the same table as :data:`kerasdet.export.SIGNATURE_INPUTS`)
SIGNATURE_INPUTS = {"serving_default": "images", "encoded_image": "image_bytes", "tf_example": "serialized_examples"}
#: outputs whose values are integers (JSON does not keep dtypes)
INT_OUTPUTS = ("detection_classes", "num_detections", "image_shapes")
REST_FORMATS = ("instances", "inputs")


def encode_image(image, format="png", quality=95) -> bytes:
    """uint8 ``[H, W, 3]`` RGB (or ``[H, W]`` grey) -> the bytes of a PNG or JPEG file
    (``tf.io.encode_png`` / ``tf.io.encode_jpeg``)."""
    import tensorflow as tf

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"encode_image expects uint8 [H, W, 3] or [H, W]; got {image.dtype} {image.shape}")
    if image.ndim == 2:
        image = image[..., None]
    if format == "png":
        return tf.io.encode_png(image).numpy()
    if format in ("jpeg", "jpg"):
        return tf.io.encode_jpeg(image, quality=int(quality)).numpy()
    raise ValueError(f"format must be 'png' or 'jpeg', got {format!r}")


def encode_example(image_bytes: bytes) -> bytes:
    """A serialized ``tf.train.Example`` with ``image/encoded`` = ``image_bytes`` (the
    ``tf_example`` signature's element)."""
    from kerasdet import export

    return export.encode_example(image_bytes)


def _inputs(inputs, signature_name):
    if signature_name not in SIGNATURE_INPUTS:
        raise ValueError(f"unknown signature {signature_name!r}; a kerasdet export has {sorted(SIGNATURE_INPUTS)}")
    name = SIGNATURE_INPUTS[signature_name]
    if isinstance(inputs, dict):
        if set(inputs) != {name}:
            raise ValueError(f"signature {signature_name!r} takes one input {name!r}; got {sorted(inputs)}")
        value = inputs[name]
    else:
        value = inputs
    if signature_name == "serving_default":
        value = np.asarray(value)
        if value.dtype != np.uint8 or value.ndim != 4 or value.shape[-1] != 3:
            raise ValueError(f"serving_default takes images: uint8 [batch, H, W, 3]; got {value.dtype} {value.shape}")
    else:
        value = list(value)
        if not all(isinstance(v, (bytes, bytearray, np.bytes_)) for v in value):
            raise ValueError(f"signature {signature_name!r} takes {name}: a list of bytes (one file per image)")
        value = [bytes(v) for v in value]
    if len(value) == 0:
        raise ValueError(f"signature {signature_name!r}: an empty batch")
    return name, value


def _json_value(value):
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def rest_request(inputs, *, signature_name="encoded_image", format="instances") -> dict:
    """The JSON body (a dict; ``json.dumps`` it) of a TF Serving REST ``:predict`` call.

    Args:
        inputs: the batch: a list of encoded files (``bytes``) for ``encoded_image`` /
            ``tf_example``, a uint8 ``[B, H, W, 3]`` array for ``serving_default``, or
            ``{input name: that}``.
        signature_name: ``"encoded_image"`` (default), ``"tf_example"`` or ``"serving_default"``.
        format: ``"instances"`` (row: one ``{input: value}`` per image) or ``"inputs"``
            (columnar: ``{input: [values]}``). Bytes become ``{"b64": ...}``.
    """
    if format not in REST_FORMATS:
        raise ValueError(f"format must be one of {REST_FORMATS}, got {format!r}")
    name, value = _inputs(inputs, signature_name)
    if format == "instances":
        return {"signature_name": signature_name, "instances": [{name: _json_value(v)} for v in value]}
    return {"signature_name": signature_name, "inputs": {name: [_json_value(v) for v in value]}}


def rest_url(host="localhost", model="kerasdet", *, version=None, port=8501) -> str:
    """``http://HOST:PORT/v1/models/MODEL[/versions/N]:predict`` (the REST API's URL)."""
    path = f"/v1/models/{model}" + (f"/versions/{int(version)}" if version is not None else "")
    return f"http://{host}:{port}{path}:predict"


def _from_json(value):
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _array(key, value):
    if key in INT_OUTPUTS:
        return np.asarray(value, dtype=np.int32)
    return np.asarray(value, dtype=np.float32)


def parse_rest_response(body) -> dict:
    """A REST ``:predict`` answer (a JSON string or the decoded dict) -> ``{output: numpy
    array}`` with the batch first (int32 for classes, counts and image shapes, float32
    else). An ``{"error": ...}`` answer raises ``RuntimeError`` with the server's message."""
    if isinstance(body, (str, bytes)):
        body = json.loads(body)
    if "error" in body:
        raise RuntimeError(f"TF Serving answered an error: {body['error']}")
    if "predictions" in body:
        rows = body["predictions"]
        if rows and isinstance(rows[0], dict):
            return {key: _array(key, [row[key] for row in rows]) for key in rows[0]}
        return {"output": np.asarray(rows)}
    if "outputs" in body:
        outputs = body["outputs"]
        if isinstance(outputs, dict):
            return {key: _array(key, value) for key, value in outputs.items()}
        return {"output": np.asarray(outputs)}
    raise ValueError(f"not a TF Serving predict answer (no 'predictions' or 'outputs'): keys {sorted(body)}")


def rest_request_to_inputs(body) -> tuple[str, dict]:
    """What TF Serving feeds the signature for a REST body: ``(signature_name, {input:
    numpy array})`` (``{"b64": ...}`` -> bytes, a row list stacked along the batch; uint8
    for ``serving_default``). A local mirror of the server's conversion, for tests."""
    if isinstance(body, (str, bytes)):
        body = json.loads(body)
    signature = body.get("signature_name", "serving_default")
    name = SIGNATURE_INPUTS[signature]
    if "instances" in body:
        rows = [_from_json(row[name] if isinstance(row, dict) else row) for row in body["instances"]]
    elif "inputs" in body:
        inputs = body["inputs"]
        rows = _from_json(inputs[name] if isinstance(inputs, dict) else inputs)
    else:
        raise ValueError("a REST predict body has 'instances' or 'inputs'")
    if signature == "serving_default":
        return signature, {name: np.asarray(rows, dtype=np.uint8)}
    return signature, {name: np.array(rows, dtype=object)}


def outputs_to_rest_response(outputs, format="instances") -> dict:
    """Signature outputs ``{name: array [B, ...]}`` -> the JSON answer TF Serving gives
    (``predictions`` rows for a row request, ``outputs`` columns for a columnar one)."""
    outputs = {k: np.asarray(v) for k, v in outputs.items()}
    if format == "instances":
        batch = len(next(iter(outputs.values())))
        return {"predictions": [{k: v[i].tolist() for k, v in outputs.items()} for i in range(batch)]}
    return {"outputs": {k: v.tolist() for k, v in outputs.items()}}


def predict_request(inputs, *, model_name="kerasdet", signature_name="encoded_image", version=None):
    """A gRPC ``tensorflow.serving.PredictRequest`` for ``PredictionService.Predict``
    (``inputs`` as in :func:`rest_request`; bytes go as a ``DT_STRING [B]`` tensor, images
    as ``DT_UINT8 [B, H, W, 3]``). ``version``: pin a model version (default: the
    server's latest)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    name, value = _inputs(inputs, signature_name)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = int(version)
    array = value if signature_name == "serving_default" else np.array(value, dtype=object)
    request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
    return request


def parse_predict_response(response) -> dict:
    """A ``PredictResponse`` -> ``{output: numpy array}`` (``tf.make_ndarray``)."""
    import tensorflow as tf

    return {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}


def outputs_to_predict_response(outputs, *, model_name="kerasdet", version=None):
    """Signature outputs -> the ``PredictResponse`` the server sends (for tests and mocks)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    response = predict_pb2.PredictResponse()
    response.model_spec.name = model_name
    if version is not None:
        response.model_spec.version.value = int(version)
    for key, value in outputs.items():
        response.outputs[key].CopyFrom(tf.make_tensor_proto(np.asarray(value)))
    return response


def request_inputs(request) -> dict:
    """``{input: numpy array}`` of a ``PredictRequest`` (what the server feeds)."""
    import tensorflow as tf

    return {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
