"""Serving speed of a kerasdet export, in one run:

1. the ``encoded_image`` signature (JPEG bytes, decoded in the graph) vs the uint8
   ``serving_default`` at batch 1 and 8 on 640x480 JPEGs, with the decode share (a graph
   that only decodes the same JPEGs, timed alone, over the encoded signature's time);
2. a C-API session (``TF_LoadSessionFromSavedModel`` + ``TF_SessionRun``, the loader TF
   Serving wraps) vs ``tf.saved_model.load`` on the uint8 signature at batch 1 (load time
   and per-request time, each in a fresh process);
3. the first request after loading, with and without replaying the export's warm-up file
   (``assets.extra/tf_serving_warmup_requests``) first, each in a fresh process.

    PYTHONPATH=$PWD python benchmarks/serving_speed.py [--saved-model DIR] [--repeats 20]

Without ``--saved-model`` it exports the digits RetinaNet preset's architecture
(untrained weights; speed does not depend on them) at a 320x320 canvas (the 640x480
JPEGs are resized to 320x240 in the graph) to a temporary
folder.
"""
import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _export(tmp):
    import keras

    from kerasdet.backbones import small_backbone
    from kerasdet.export import export_versioned
    from kerasdet.models.retinanet import RetinaNet

    keras.utils.set_random_seed(0)
    model = RetinaNet(backbone=small_backbone(), num_classes=10, max_detections=100)
    return export_versioned(model, os.path.join(tmp, "retinanet"), image_size=(320, 320),
                            category_ids=list(range(1, 11)), warmup=True)


def _jpegs(n, seed=0):
    import cv2

    rng = np.random.RandomState(seed)
    images, files = [], []
    for _ in range(n):
        yy, xx = np.mgrid[0:480, 0:640]
        image = np.stack([yy * 255 / 479, xx * 255 / 639, np.full_like(yy, 128.0)], -1)
        image = np.clip(image + rng.normal(0, 25, image.shape), 0, 255).astype(np.uint8)
        files.append(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
        images.append(cv2.imdecode(np.frombuffer(files[-1], np.uint8), cv2.IMREAD_COLOR)[..., ::-1])
    return np.stack(images), files


def _time(fn, repeats):
    fn()  # traced / warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000


def encoded_vs_uint8(path, repeats):
    import tensorflow as tf

    sigs = tf.saved_model.load(path).signatures
    images, files = _jpegs(8)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def decode_only(b):
        return tf.map_fn(lambda s: tf.io.decode_image(s, channels=3, expand_animations=False), b,
                         fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))

    rows = []
    for batch in (1, 8):
        t_u8 = _time(lambda: sigs["serving_default"](images=tf.constant(images[:batch])), repeats)
        t_enc = _time(lambda: sigs["encoded_image"](image_bytes=tf.constant(files[:batch])), repeats)
        t_dec = _time(lambda: decode_only(tf.constant(files[:batch])), repeats)
        rows.append((batch, t_u8, t_enc, t_dec))
        print(f"batch {batch}: uint8 {t_u8:.1f} ms, encoded_image {t_enc:.1f} ms "
              f"(JPEG decode alone {t_dec:.1f} ms = {100 * t_dec / t_enc:.0f}% of it); "
              f"request payload uint8 {images[:batch].nbytes / 1e6:.2f} MB vs JPEG "
              f"{sum(len(f) for f in files[:batch]) / 1e6:.2f} MB", flush=True)
    return rows


FRESH_PY = textwrap.dedent(
    """
    import sys, time
    t0 = time.perf_counter()
    import numpy as np, tensorflow as tf
    path, mode, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
    image = np.load(sys.argv[4])
    t1 = time.perf_counter()
    sigs = tf.saved_model.load(path).signatures
    fn = sigs["serving_default"]
    t2 = time.perf_counter()
    if mode == "warmup":  # what TF Serving does at load time: replay every logged request
        from tensorflow_serving.apis import prediction_log_pb2
        for record in tf.data.TFRecordDataset(path + "/assets.extra/tf_serving_warmup_requests"):
            req = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
            inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in req.inputs.items()}
            sigs[req.model_spec.signature_name](**inputs)
    t3 = time.perf_counter()
    fn(images=tf.constant(image))
    t4 = time.perf_counter()
    times = []
    for _ in range(repeats):
        s = time.perf_counter(); fn(images=tf.constant(image)); times.append(time.perf_counter() - s)
    print("RESULT", t2 - t1, t3 - t2, t4 - t3, float(np.median(times)))
    """
)


def _fresh(args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return out.stdout


def c_api_vs_python(path, repeats, tmp):
    import tensorflow as tf
    from kerasdet.capi import CAPI_RUNNER, signature_tensor_names

    images, _ = _jpegs(1)
    np.save(os.path.join(tmp, "one.npy"), images)
    line = [l for l in _fresh([FRESH_PY, path, "plain", str(repeats), os.path.join(tmp, "one.npy")]).splitlines()
            if l.startswith("RESULT")][0].split()[1:]
    py_load, _, py_first, py_steady = (float(v) * 1000 for v in line)
    # the C-API runner, timed around load and repeated runs
    names = signature_tensor_names(path)
    timed = CAPI_RUNNER.replace(
        "session = tf.TF_LoadSessionFromSavedModel(",
        "import time as _t; _t0 = _t.perf_counter()\nsession = tf.TF_LoadSessionFromSavedModel(").replace(
        'check("TF_LoadSessionFromSavedModel")',
        'check("TF_LoadSessionFromSavedModel"); _load = _t.perf_counter() - _t0; _runs = []').replace(
        "    tf.TF_SessionRun(session, None, inputs, values, 1, outs, out_values, len(keys), None, 0, None, status)",
        "    for _r in range(item['repeats']):\n"
        "        _s = _t.perf_counter()\n"
        "        tf.TF_SessionRun(session, None, inputs, values, 1, outs, out_values, len(keys), None, 0, None,"
        " status)\n"
        "        _runs.append(_t.perf_counter() - _s)\n"
        "        if _r < item['repeats'] - 1:\n"
        "            [tf.TF_DeleteTensor(out_values[i]) for i in range(len(keys))]").replace(
        '"tensorflow_imported": "tensorflow" in sys.modules', '"tensorflow_imported": "tensorflow" in sys.modules, '
        '"load": _load, "runs": _runs')
    spec = {"serving_default": dict(names["serving_default"], value=images, repeats=repeats + 1)}
    with open(os.path.join(tmp, "spec.pkl"), "wb") as f:
        pickle.dump(spec, f)
    _fresh([timed, tf.sysconfig.get_lib(), path, os.path.join(tmp, "spec.pkl"), os.path.join(tmp, "capi.pkl")])
    with open(os.path.join(tmp, "capi.pkl"), "rb") as f:
        got = pickle.load(f)
    c_first, c_steady = got["runs"][0] * 1000, float(np.median(got["runs"][1:])) * 1000
    print(f"C API session: load {got['load'] * 1000:.0f} ms, first request {c_first:.1f} ms, then {c_steady:.1f} ms; "
          f"tf.saved_model.load: load {py_load:.0f} ms, first request {py_first:.1f} ms, then {py_steady:.1f} ms "
          "(uint8 640x480, batch 1)", flush=True)
    return got["load"] * 1000, c_first, c_steady, py_load, py_first, py_steady


def warmup_effect(path, tmp):
    one = os.path.join(tmp, "one.npy")
    res = {}
    for mode in ("plain", "warmup"):
        line = [l for l in _fresh([FRESH_PY, path, mode, "3", one]).splitlines() if l.startswith("RESULT")][0]
        _, warm, first, steady = (float(v) * 1000 for v in line.split()[1:])
        res[mode] = (warm, first, steady)
    print(f"first request after load: {res['plain'][1]:.1f} ms without warm-up, {res['warmup'][1]:.1f} ms after "
          f"replaying the warm-up file ({res['warmup'][0]:.0f} ms, at load time); steady {res['plain'][2]:.1f} ms",
          flush=True)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--saved-model", default=None, help="a version folder (default: export one)")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.saved_model or _export(tmp)
        flags = [l for l in open("/proc/cpuinfo") if l.startswith("model name")][:1]
        print(f"{flags[0].split(':')[1].strip() if flags else 'cpu'}, {os.cpu_count()} cores visible; {path}")
        encoded_vs_uint8(path, args.repeats)
        c_api_vs_python(path, args.repeats, tmp)
        warmup_effect(path, tmp)


if __name__ == "__main__":
    main()
