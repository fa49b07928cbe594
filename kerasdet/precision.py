"""Compute precision of an already built detector (serving in cheaper numerics).

:func:`set_compute_dtype` switches every layer of a built model between float32 and a
mixed policy (``"bfloat16"`` -> ``mixed_bfloat16``, ``"float16"`` -> ``mixed_float16``)
in place: the float32 variables are kept and shared, only the dtype the layers compute in
changes, so a model trained in float32 can be served in bfloat16 and switched back
bit-exactly. Detection post-processing (:class:`~kerasdet.layers.postprocess.
DetectionPostProcessor`: scores, box decoding, NMS) always stays float32.

Whether a cheaper dtype is faster depends on the device: on CPUs with AVX512_BF16/AMX
oneDNN runs bfloat16 convolutions natively; on AVX2-only CPUs bfloat16 is emulated and
slower than float32 (measure with ``benchmarks/vs_keras_hub.py --precisions``).
"""
import keras

from kerasdet.layers.postprocess import DetectionPostProcessor

#: Accepted ``dtype`` values and the Keras policy each one selects.
COMPUTE_DTYPES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16",
                  "mixed_bfloat16": "mixed_bfloat16", "mixed_float16": "mixed_float16"}


def set_compute_dtype(model, dtype, keep_float32=(DetectionPostProcessor,)):
    """Makes every layer of ``model`` compute in ``dtype`` (variables stay float32).

    Args:
        model: a built ``keras.Model`` (e.g. a kerasdet :class:`Detector`).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (or the ``mixed_*`` names).
        keep_float32: layer classes left in float32 (default: detection post-processing).

    Returns the model. Keras' cached ``predict``/``train``/``evaluate`` functions are
    dropped so they are traced again; ``tf.function`` s of your own made before the switch
    keep the precision they were traced with, make new ones.
    """
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(COMPUTE_DTYPES)}, got {dtype!r}.")
    if not model.built:
        raise ValueError("set_compute_dtype needs a built model (call it once or model.build()).")
    policy = COMPUTE_DTYPES[dtype]
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, keep_float32):
            continue
        layer.dtype_policy = policy
    for name in ("train_function", "test_function", "predict_function"):
        if hasattr(model, name):
            setattr(model, name, None)
    return model


def compute_dtype(model):
    """The compute dtype (``"float32"``, ``"bfloat16"``, ...) of the model's weighted layers,
    ``"mixed"`` when they differ (post-processing layers not counted)."""
    dtypes = {
        layer.compute_dtype
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if not isinstance(layer, DetectionPostProcessor) and layer.weights
    }
    return dtypes.pop() if len(dtypes) == 1 else "mixed"
