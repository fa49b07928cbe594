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

:func:`fold_batchnorm` / :func:`fold_detector_batchnorm` make an inference copy whose
frozen BatchNormalization layers are folded into the preceding convolutions.
"""
import keras
import numpy as np

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


@keras.saving.register_keras_serializable(package="kerasdet")
class FoldedBatchNorm(keras.layers.Layer):
    """Identity standing where a BatchNormalization was folded into its convolution
    (takes BatchNormalization's call arguments)."""

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def fold_batchnorm(backbone):
    """An inference copy of a functional backbone with every frozen BatchNormalization
    folded into the convolution that feeds it.

    ``BN(conv(x)) = conv'(x)`` with ``W' = W * s`` and ``b' = (b - mean) * s + beta``,
    ``s = gamma / sqrt(var + eps)`` per output channel: one pass over each activation map
    less, twice (TF runs Keras' inference BN as a multiply and an add). Only BN layers that
    are not trainable (they run on moving statistics even under ``training=True``) and whose
    input is a ``Conv2D`` output read by nothing else are folded; every other layer is
    cloned with its weights. Layer names are kept. The result is for inference and export:
    train the original.
    """
    pairs = {}
    for op in backbone.operations:
        if not isinstance(op, keras.layers.BatchNormalization) or op.trainable:
            continue
        source = op._inbound_nodes[0].input_tensors[0]._keras_history.operation
        if isinstance(source, keras.layers.Conv2D) and len(source._outbound_nodes) == 1 and op.axis in (-1, 3):
            pairs[source.name] = op
    folded_bn = {bn.name for bn in pairs.values()}

    def clone(layer):
        if layer.name in folded_bn:
            return FoldedBatchNorm(name=layer.name)
        config = layer.get_config()
        if layer.name in pairs:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    folded = keras.models.clone_model(backbone, clone_function=clone)
    for layer in backbone.layers:
        if layer.name in folded_bn or not layer.weights:
            continue
        target = folded.get_layer(layer.name)
        if layer.name not in pairs:
            target.set_weights(layer.get_weights())
            continue
        bn = pairs[layer.name]
        kernel = layer.kernel.numpy().astype("float64")
        bias = layer.bias.numpy().astype("float64") if layer.use_bias else 0.0
        gamma = bn.gamma.numpy().astype("float64") if bn.scale else 1.0
        beta = bn.beta.numpy().astype("float64") if bn.center else 0.0
        scale = gamma / np.sqrt(bn.moving_variance.numpy().astype("float64") + bn.epsilon)
        target.set_weights([(kernel * scale).astype("float32"),
                            ((bias - bn.moving_mean.numpy()) * scale + beta).astype("float32")])
    folded.trainable = False
    return folded


def fold_detector_batchnorm(detector):
    """A copy of a built kerasdet detector whose ``backbone`` has its frozen BN folded
    (:func:`fold_batchnorm`); every other weight is copied. For inference/export."""
    config = detector.get_config()
    config.pop("backbone")
    backbone = fold_batchnorm(detector.backbone)
    copy = detector.__class__(backbone=backbone, **config)
    copy.build()
    for source, target in zip(detector.layers, copy.layers):
        if source.name != target.name:
            raise ValueError(f"layer order differs: {source.name} vs {target.name}")
        if source is not detector.backbone:
            target.set_weights(source.get_weights())
    return copy
