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
:func:`inference_variant` is what the exports trace: by default every backbone BN folded
(an inference graph runs them all on moving statistics) and the precision asked for
(``"auto"``: bfloat16 on CPUs with native bfloat16, AVX512_BF16 / AMX).
"""
import contextlib

import keras
import numpy as np
import tensorflow as tf

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


def fold_pairs(backbone, *, only_frozen=True):
    """``{conv layer name: the BatchNormalization it feeds}`` of a functional backbone:
    the BN layers :func:`fold_batchnorm` folds (``only_frozen``: non-trainable ones only;
    channels-last BN whose input is a ``Conv2D`` output read by nothing else)."""
    pairs = {}
    for op in getattr(backbone, "operations", ()):
        if not isinstance(op, keras.layers.BatchNormalization) or (op.trainable and only_frozen):
            continue
        source = op._inbound_nodes[0].input_tensors[0]._keras_history.operation
        if isinstance(source, keras.layers.Conv2D) and len(source._outbound_nodes) == 1 and op.axis in (-1, 3):
            pairs[source.name] = op
    return pairs


def _folded_conv_call(conv, bn):
    """``conv``'s call with ``bn`` folded in, computed from the CURRENT variables each call:
    ``conv(x, W * s) + (b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)``."""
    def call(inputs, *args, **kwargs):
        var = keras.ops.cast(bn.moving_variance, "float32")
        scale = keras.ops.rsqrt(var + bn.epsilon)
        if bn.scale:
            scale = scale * keras.ops.cast(bn.gamma, "float32")
        shift = -keras.ops.cast(bn.moving_mean, "float32") * scale
        if conv.use_bias:
            shift = shift + keras.ops.cast(conv.bias, "float32") * scale
        if bn.center:
            shift = shift + keras.ops.cast(bn.beta, "float32")
        kernel = keras.ops.cast(conv.kernel, "float32") * scale
        outputs = conv.convolution_op(inputs, keras.ops.cast(kernel, inputs.dtype))
        outputs = tf.nn.bias_add(outputs, keras.ops.cast(shift, outputs.dtype))
        return conv.activation(outputs) if conv.activation is not None else outputs

    call.kerasdet_folded = True
    return call


def _identity_call(inputs, *args, **kwargs):
    return inputs


_identity_call.kerasdet_folded = True


@contextlib.contextmanager
def fold_batchnorm_calls(backbone, *, only_frozen=True):
    """While the block runs, every :func:`fold_pairs` BatchNormalization of a functional
    ``backbone`` is folded into its convolution IN THE GRAPH: the conv computes
    ``conv(x, W * s) + b'`` from the current variables (so nothing goes stale after a
    weight update and no copy is made) and the BN is the identity. The weights are not
    touched; the layers' own ``call`` is restored when the block ends.

    Used while Keras traces a step: :class:`kerasdet.models.base.Detector` folds every BN in
    ``predict_step`` (inference runs them all on moving statistics). It saves the BN's
    multiply-add pass over every activation map; the kernel product costs one multiply per
    weight, and the shift is a ``BiasAdd`` so the conv + bias (+ ReLU) fuse as the folded
    copy's do (with a plain add the R50 train step measured 1.43x slower). ``only_frozen=True``
    folds the frozen BN of a training graph exactly (a frozen BN runs on moving statistics
    under ``training=True`` too and ``dL/dW = s * dL/dW'``) but did not pay there: the
    R50-FPN RetinaNet train step at batch 2 measured 1.06x the unfolded one
    (``benchmarks/vs_keras_hub.py --train-only``), so training does not use it. A conv whose
    output feeds anything else, a channels-first BN and non-functional models are left alone
    (``fold_pairs``).
    """
    pairs = fold_pairs(backbone, only_frozen=only_frozen) if isinstance(backbone, keras.Model) else {}
    patched = []
    try:
        for conv_name, bn in pairs.items():
            conv = backbone.get_layer(conv_name)
            if not isinstance(conv, keras.layers.Conv2D) or not hasattr(conv, "convolution_op"):
                continue
            if getattr(conv.__dict__.get("call"), "kerasdet_folded", False):
                continue  # an enclosing block (e.g. another replica's trace) folded it and restores it
            patched.append((conv, conv.__dict__.get("call"), bn, bn.__dict__.get("call")))
            object.__setattr__(conv, "call", _folded_conv_call(conv, bn))
            object.__setattr__(bn, "call", _identity_call)
        yield len(patched)
    finally:
        for conv, conv_call, bn, bn_call in patched:
            for layer, original in ((conv, conv_call), (bn, bn_call)):
                if original is None:
                    object.__delattr__(layer, "call")
                else:
                    object.__setattr__(layer, "call", original)


def fold_batchnorm(backbone, *, only_frozen=True):
    """An inference copy of a functional backbone with every frozen BatchNormalization
    folded into the convolution that feeds it (``only_frozen=False``: every
    BatchNormalization, as an inference graph runs them all on their moving statistics).

    ``BN(conv(x)) = conv'(x)`` with ``W' = W * s`` and ``b' = (b - mean) * s + beta``,
    ``s = gamma / sqrt(var + eps)`` per output channel: one pass over each activation map
    less, twice (TF runs Keras' inference BN as a multiply and an add). Only BN layers that
    are not trainable (they run on moving statistics even under ``training=True``) and whose
    input is a ``Conv2D`` output read by nothing else are folded; every other layer is
    cloned with its weights. Layer names are kept. The result is for inference and export:
    train the original.
    """
    pairs = fold_pairs(backbone, only_frozen=only_frozen)
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


def fold_detector_batchnorm(detector, *, only_frozen=True):
    """A copy of a built kerasdet detector whose ``backbone`` has its frozen BN folded
    (:func:`fold_batchnorm`; ``only_frozen=False``: every BN); every other weight is
    copied. For inference/export. Raises ``ValueError`` for a detector that is not built
    as ``backbone`` + the rest (SMN, decompNet, the sliding-window baseline)."""
    config = detector.get_config()
    if "backbone" not in config or not isinstance(getattr(detector, "backbone", None), keras.Model):
        raise ValueError(f"{type(detector).__name__} has no functional `backbone` to fold")
    config.pop("backbone")
    backbone = fold_batchnorm(detector.backbone, only_frozen=only_frozen)
    copy = detector.__class__(backbone=backbone, **config)
    copy.build()
    for source, target in zip(detector.layers, copy.layers):
        if source.name != target.name:
            raise ValueError(f"layer order differs: {source.name} vs {target.name}")
        if source is not detector.backbone:
            target.set_weights(source.get_weights())
    return copy


#: ``precision`` values of :func:`inference_variant` / the exports.
PRECISIONS = ("float32", "bfloat16", "auto")
#: CPU flags (``/proc/cpuinfo``) with native bfloat16 arithmetic (oneDNN uses them).
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_supports_bfloat16(cpuinfo="/proc/cpuinfo"):
    """Whether this machine's CPU has native bfloat16 (AVX512_BF16 or AMX-BF16)."""
    try:
        with open(cpuinfo) as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return any(flag in flags for flag in BFLOAT16_CPU_FLAGS)


def resolve_precision(precision):
    """``"auto"`` -> ``"bfloat16"`` on a CPU with native bfloat16 (see
    :func:`cpu_supports_bfloat16`), else ``"float32"``; the others as they are."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if cpu_supports_bfloat16() else "float32"
    return precision


def foldable_batchnorm(detector):
    """The number of BatchNormalization layers of ``detector``'s backbone that
    :func:`fold_detector_batchnorm` (``only_frozen=False``) folds: 0 for a detector
    without a functional backbone."""
    backbone = getattr(detector, "backbone", None)
    if "backbone" not in detector.get_config() or not isinstance(backbone, keras.Model):
        return 0
    return len(fold_pairs(backbone, only_frozen=False))


@contextlib.contextmanager
def inference_variant(model, *, fold_batchnorm="auto", precision="float32"):
    """The model to trace an inference graph with (an export): ``with inference_variant(m)
    as (variant, info):``.

    Args:
        model: a built kerasdet detector (left as it was when the block ends).
        fold_batchnorm: ``"auto"`` (default): a copy with every backbone BatchNormalization
            folded into its convolution (:func:`fold_detector_batchnorm` with
            ``only_frozen=False``: an inference graph runs every BN on its moving
            statistics) where the detector is ``backbone`` + the rest and has BN to fold,
            else the model itself; ``True``: the folded copy or a ``ValueError``;
            ``False``: the model itself.
        precision: ``"float32"`` (default), ``"bfloat16"`` (compute in bfloat16, weights and
            post-processing float32; :func:`set_compute_dtype`) or ``"auto"``
            (:func:`resolve_precision`).

    ``info``: ``{"fold_batchnorm": folded BN layer count (0: not folded), "precision": the
    compute dtype}``.
    """
    if fold_batchnorm not in ("auto", True, False):
        raise ValueError(f"fold_batchnorm must be 'auto', True or False, got {fold_batchnorm!r}")
    precision = resolve_precision(precision)
    folded = foldable_batchnorm(model) if fold_batchnorm else 0
    if fold_batchnorm is True and not folded:
        raise ValueError(f"{type(model).__name__}: no BatchNormalization to fold into a convolution")
    variant = fold_detector_batchnorm(model, only_frozen=False) if folded else model
    before = compute_dtype(variant)
    if precision != "float32" or before != "float32":
        set_compute_dtype(variant, precision)
    try:
        yield variant, {"fold_batchnorm": int(folded), "precision": precision}
    finally:
        if variant is model and compute_dtype(model) != before and before in COMPUTE_DTYPES:
            set_compute_dtype(model, before)
