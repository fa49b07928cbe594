"""A SavedModel run through TensorFlow's C API, the loader TF Serving's model server wraps.

``TF_LoadSessionFromSavedModel`` (``tensorflow/c/c_api.h``; it wraps
``tensorflow::LoadSavedModel``, the loader behind TF Serving's ``SavedModelBundle``) is
called through ctypes in a fresh process that never imports TensorFlow's Python package,
and each signature is run by its tensor names with ``TF_SessionRun``. The shared library is
the TensorFlow wheel's ``libtensorflow_cc.so.2`` (``nm -D`` lists
``TF_LoadSessionFromSavedModel``, ``TF_SessionRun``, ``TF_StringInit``), with the tensor
helpers (``TF_AllocateTensor``, ``TF_NewStatus``...) in ``libtensorflow_framework.so.2``.
"""
import json
import os
import pickle
import subprocess
import sys
import textwrap

import tensorflow as tf

CAPI_RUNNER = textwrap.dedent(
    r"""
    import ctypes, json, pickle, sys
    import numpy as np

    lib_dir, export_dir, spec_file, out_file = sys.argv[1:5]
    ctypes.CDLL(lib_dir + "/libtensorflow_framework.so.2", mode=ctypes.RTLD_GLOBAL)
    tf = ctypes.CDLL(lib_dir + "/libtensorflow_cc.so.2", mode=ctypes.RTLD_GLOBAL)
    P = ctypes.c_void_p

    class TF_Output(ctypes.Structure):
        _fields_ = [("oper", P), ("index", ctypes.c_int)]

    class TF_Buffer(ctypes.Structure):
        _fields_ = [("data", P), ("length", ctypes.c_size_t), ("data_deallocator", P)]

    for name, res, args in [
        ("TF_NewStatus", P, []), ("TF_GetCode", ctypes.c_int, [P]), ("TF_Message", ctypes.c_char_p, [P]),
        ("TF_NewSessionOptions", P, []), ("TF_NewGraph", P, []), ("TF_NewBuffer", ctypes.POINTER(TF_Buffer), []),
        ("TF_LoadSessionFromSavedModel", P, [P, P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int,
                                             P, ctypes.POINTER(TF_Buffer), P]),
        ("TF_GraphOperationByName", P, [P, ctypes.c_char_p]),
        ("TF_AllocateTensor", P, [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_int, ctypes.c_size_t]),
        ("TF_TensorData", P, [P]), ("TF_TensorByteSize", ctypes.c_size_t, [P]), ("TF_NumDims", ctypes.c_int, [P]),
        ("TF_Dim", ctypes.c_int64, [P, ctypes.c_int]), ("TF_TensorType", ctypes.c_int, [P]),
        ("TF_DeleteTensor", None, [P]), ("TF_StringInit", None, [P]),
        ("TF_StringCopy", None, [P, ctypes.c_char_p, ctypes.c_size_t]),
        ("TF_SessionRun", None, [P, P, ctypes.POINTER(TF_Output), ctypes.POINTER(P), ctypes.c_int,
                                 ctypes.POINTER(TF_Output), ctypes.POINTER(P), ctypes.c_int, P, ctypes.c_int, P, P]),
        ("TF_CloseSession", None, [P, P]), ("TF_DeleteSession", None, [P, P]),
    ]:
        fn = getattr(tf, name)
        fn.restype, fn.argtypes = res, args

    status = tf.TF_NewStatus()

    def check(what):
        if tf.TF_GetCode(status) != 0:
            raise SystemExit(f"{what}: code {tf.TF_GetCode(status)}: {tf.TF_Message(status).decode()}")

    graph, meta = tf.TF_NewGraph(), tf.TF_NewBuffer()
    tags = (ctypes.c_char_p * 1)(b"serve")
    session = tf.TF_LoadSessionFromSavedModel(tf.TF_NewSessionOptions(), None, export_dir.encode(), tags, 1, graph,
                                              meta, status)
    check("TF_LoadSessionFromSavedModel")
    meta_bytes = ctypes.string_at(meta.contents.data, meta.contents.length)

    DT = {"uint8": 4, "string": 7}
    NP = {1: np.float32, 3: np.int32, 4: np.uint8, 9: np.int64}
    TSTRING = 24  # sizeof(TF_TString)

    def tensor(value):
        if value.dtype == object:  # DT_STRING [B]
            dims = (ctypes.c_int64 * 1)(len(value))
            t = tf.TF_AllocateTensor(DT["string"], dims, 1, TSTRING * len(value))
            base = tf.TF_TensorData(t)
            for i, b in enumerate(value):
                tf.TF_StringInit(base + i * TSTRING)
                tf.TF_StringCopy(base + i * TSTRING, b, len(b))
            return t
        value = np.ascontiguousarray(value)
        dims = (ctypes.c_int64 * value.ndim)(*value.shape)
        t = tf.TF_AllocateTensor(DT[value.dtype.name], dims, value.ndim, value.nbytes)
        ctypes.memmove(tf.TF_TensorData(t), value.ctypes.data, value.nbytes)
        return t

    def output(name):
        op, index = name.rsplit(":", 1)
        handle = tf.TF_GraphOperationByName(graph, op.encode())
        if not handle:
            raise SystemExit(f"no operation {op} in the loaded graph")
        return TF_Output(handle, int(index))

    def to_numpy(t):
        shape = [tf.TF_Dim(t, i) for i in range(tf.TF_NumDims(t))]
        dtype = NP[tf.TF_TensorType(t)]
        data = ctypes.string_at(tf.TF_TensorData(t), tf.TF_TensorByteSize(t))
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()

    with open(spec_file, "rb") as f:
        spec = pickle.load(f)
    results = {}
    for signature, item in spec.items():
        (in_name, in_tensor), = item["inputs"].items()
        keys = sorted(item["outputs"])
        inputs = (TF_Output * 1)(output(in_tensor))
        values = (P * 1)(tensor(item["value"]))
        outs = (TF_Output * len(keys))(*[output(item["outputs"][k]) for k in keys])
        out_values = (P * len(keys))()
        tf.TF_SessionRun(session, None, inputs, values, 1, outs, out_values, len(keys), None, 0, None, status)
        check(f"TF_SessionRun {signature}")
        results[signature] = {k: to_numpy(out_values[i]) for i, k in enumerate(keys)}
        for i in range(len(keys)):
            tf.TF_DeleteTensor(out_values[i])
        tf.TF_DeleteTensor(values[0])
    tf.TF_CloseSession(session, status)
    tf.TF_DeleteSession(session, status)
    with open(out_file, "wb") as f:
        pickle.dump({"results": results, "meta_graph_def": meta_bytes,
                     "tensorflow_imported": "tensorflow" in sys.modules}, f)
    """
)


def signature_tensor_names(export_dir):
    """``{signature: {"inputs": {name: tensor}, "outputs": {name: tensor}}}`` from the
    SavedModel's ``serve`` MetaGraphDef (what TF Serving reads to run a signature)."""
    from tensorflow.core.protobuf import saved_model_pb2

    with open(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
        saved = saved_model_pb2.SavedModel.FromString(f.read())
    meta, = [m for m in saved.meta_graphs if "serve" in m.meta_info_def.tags]
    return {key: {"inputs": {k: v.name for k, v in sig.inputs.items()},
                  "outputs": {k: v.name for k, v in sig.outputs.items()}}
            for key, sig in meta.signature_def.items() if not key.startswith("__")}


def run_c_api(export_dir, feeds, tmp_dir):
    """Runs each ``{signature: input value}`` through the C API in a fresh process that
    never imports TensorFlow's Python package; returns ``(tensor names, {"results",
    "meta_graph_def", "tensorflow_imported"})``."""
    names = signature_tensor_names(export_dir)
    spec = {sig: dict(names[sig], value=value) for sig, value in feeds.items()}
    spec_file, out_file = os.path.join(tmp_dir, "spec.pkl"), os.path.join(tmp_dir, "capi.pkl")
    with open(spec_file, "wb") as f:
        pickle.dump(spec, f)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", CAPI_RUNNER, tf.sysconfig.get_lib(), export_dir, spec_file,
                           out_file], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_dir)
    if proc.returncode != 0:
        raise RuntimeError(f"the C API run of {export_dir} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    with open(out_file, "rb") as f:
        return json.loads(json.dumps(names)), pickle.load(f)
