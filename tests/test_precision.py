"""kerasdet.precision: serving a float32-trained detector in bfloat16 / float16."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.backbones import small_backbone
from kerasdet.models.retinanet import RetinaNet
from kerasdet.precision import compute_dtype, set_compute_dtype


def _model():
    keras.utils.set_random_seed(3)
    model = RetinaNet(backbone=small_backbone(widths=(8, 16, 16, 16), blocks=(0, 1, 0, 0)), num_classes=3,
                      min_level=3, max_level=5, fpn_channels=16, head_convs=1, head_channels=16,
                      anchor_size=2.0, aspect_ratios=(1.0,), scales=(1.0,), prior_probability=0.3)
    model.build()
    return model


def _images():
    return tf.constant(np.random.RandomState(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32"))


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.05), ("float16", 0.01)])
def test_reduced_precision_outputs_close_to_float32_and_switch_back_is_exact(dtype, tol):
    model = _model()
    images = _images()
    ref = model(images)
    ref_det = model.predict_on_batch(images)
    set_compute_dtype(model, dtype)
    assert compute_dtype(model) == dtype
    assert model.postprocess.compute_dtype == "float32"
    assert all(v.dtype == "float32" for v in model.weights)
    low = model(images)
    assert low["class_logits"].dtype == dtype
    for key in ("class_logits", "box_deltas"):
        ref_v, low_v = ref[key].numpy(), tf.cast(low[key], tf.float32).numpy()
        assert np.abs(low_v - ref_v).max() <= tol * (1.0 + np.abs(ref_v).max())
        assert not np.array_equal(low_v, ref_v)  # really computed in the lower precision
    det = model.predict_on_batch(images)  # Keras' cached predict function was rebuilt
    assert det["scores"].dtype == np.float32 and det["boxes"].dtype == np.float32
    np.testing.assert_allclose(det["scores"][:, 0], ref_det["scores"][:, 0], atol=tol)
    set_compute_dtype(model, "float32")
    back = model(images)
    for key in ("class_logits", "box_deltas"):
        np.testing.assert_array_equal(back[key].numpy(), ref[key].numpy())


def test_rejects_unknown_dtype_and_unbuilt_model():
    with pytest.raises(ValueError, match="dtype"):
        set_compute_dtype(_model(), "int8")
    unbuilt = RetinaNet(backbone=small_backbone(widths=(8, 8, 8, 8), blocks=(0, 0, 0, 0)), num_classes=2,
                        max_level=5, fpn_channels=8, head_convs=1, head_channels=8)
    with pytest.raises(ValueError, match="built"):
        set_compute_dtype(unbuilt, "bfloat16")


def _randomize_bn(model):
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            rng = np.random.RandomState(len(layer.name))
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n), rng.normal(0, 0.2, n),
                               rng.uniform(0.5, 2.0, n)])


def test_fold_batchnorm_equals_conv_then_frozen_bn():
    from kerasdet.backbones import resnet_backbone
    from kerasdet.precision import FoldedBatchNorm, fold_batchnorm

    keras.utils.set_random_seed(0)
    backbone = resnet_backbone(50)
    _randomize_bn(backbone)
    folded = fold_batchnorm(backbone)
    bns = [l for l in backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert len(bns) == 53
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in folded.layers)
    assert sum(isinstance(l, FoldedBatchNorm) for l in folded.layers) == 53
    # gamma, beta, mean, variance of every BN are gone; the convs already had biases
    assert folded.count_params() == backbone.count_params() - 4 * sum(l.gamma.shape[0] for l in bns)
    images = _images()
    ref, out = backbone(images), folded(images)
    for level in ("C2", "C3", "C4", "C5"):
        scale = float(tf.reduce_max(tf.abs(ref[level])))
        np.testing.assert_allclose(out[level].numpy(), ref[level].numpy(), atol=2e-6 * scale + 1e-5)


def test_fold_detector_batchnorm_same_detections_and_trainable_bn_untouched():
    from kerasdet.backbones import resnet_backbone
    from kerasdet.precision import fold_batchnorm, fold_detector_batchnorm

    keras.utils.set_random_seed(0)
    model = RetinaNet(backbone=resnet_backbone(50), num_classes=3, fpn_channels=16, head_convs=1,
                      head_channels=16, prior_probability=0.3)
    model.build()
    _randomize_bn(model.backbone)
    folded = fold_detector_batchnorm(model)
    images = _images()
    ref, out = model.predict_on_batch(images), folded.predict_on_batch(images)
    np.testing.assert_array_equal(ref["num_detections"], out["num_detections"])
    np.testing.assert_allclose(out["scores"], ref["scores"], atol=1e-5)
    np.testing.assert_allclose(out["boxes"], ref["boxes"], atol=1e-3)
    # a trainable BN (small backbone: batch statistics in training) is not folded
    small = small_backbone(widths=(8, 8, 8, 8), blocks=(0, 0, 0, 0))
    kept = fold_batchnorm(small)
    assert sum(isinstance(l, keras.layers.BatchNormalization) for l in kept.layers) == sum(
        isinstance(l, keras.layers.BatchNormalization) for l in small.layers) > 0


def test_inference_variant_folds_every_bn_and_leaves_the_model_as_it_was(tmp_path):
    """The exports' graph: every backbone BN folded (trainable ones too: an inference
    graph runs them on moving statistics), same detections; the model itself untouched
    (its BN layers, its float32 compute) after the block, also for ``bfloat16``."""
    from kerasdet.precision import FoldedBatchNorm, foldable_batchnorm, inference_variant

    model = _model()
    _randomize_bn(model.backbone)
    images = _images()
    ref = model.predict_on_batch(images)
    n_bn = sum(isinstance(l, keras.layers.BatchNormalization) for l in model.backbone.layers)
    assert foldable_batchnorm(model) == n_bn > 0
    with inference_variant(model) as (variant, info):
        assert variant is not model and info == {"fold_batchnorm": n_bn, "precision": "float32"}
        assert sum(isinstance(l, FoldedBatchNorm) for l in variant.backbone.layers) == n_bn
        out = variant.detect(images)
        np.testing.assert_array_equal(out["num_detections"], ref["num_detections"])
        np.testing.assert_allclose(out["scores"], ref["scores"], atol=1e-5)
        np.testing.assert_allclose(out["boxes"], ref["boxes"], atol=1e-3)
    with inference_variant(model, fold_batchnorm=False, precision="bfloat16") as (variant, info):
        assert variant is model and compute_dtype(model) == "bfloat16" and info["fold_batchnorm"] == 0
    assert compute_dtype(model) == "float32"
    np.testing.assert_array_equal(model.predict_on_batch(images)["scores"], ref["scores"])


def test_precision_auto_follows_the_cpu_flags(tmp_path, monkeypatch):
    from kerasdet import precision

    amx, avx2 = tmp_path / "amx", tmp_path / "avx2"
    amx.write_text("flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n")
    avx2.write_text("flags\t\t: fpu avx2 fma\n")
    assert precision.cpu_supports_bfloat16(str(amx)) and not precision.cpu_supports_bfloat16(str(avx2))
    assert not precision.cpu_supports_bfloat16(str(tmp_path / "missing"))
    for supported, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(precision, "cpu_supports_bfloat16", lambda supported=supported: supported)
        assert precision.resolve_precision("auto") == expected
    assert precision.resolve_precision("float32") == "float32"
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve_precision("int8")


def test_inference_variant_without_a_backbone_to_fold():
    """Models that are not ``backbone`` + the rest (decompNet) export unfolded under
    ``"auto"``; ``fold_batchnorm=True`` says why it cannot."""
    from test_serving import FAMILIES

    from kerasdet.precision import inference_variant

    factory, size, _ = FAMILIES["decompnet"]
    model = factory()
    model.build((None, *size, 3))
    with inference_variant(model) as (variant, info):
        assert variant is model and info["fold_batchnorm"] == 0
    with pytest.raises(ValueError, match="no BatchNormalization to fold"):
        with inference_variant(model, fold_batchnorm=True):
            pass


def test_fold_batchnorm_calls_folds_in_the_graph_and_restores():
    """Inside the context the BN layers are the identity and their convs carry them (outputs
    equal, also in a tf.function traced inside it); afterwards the layers' own calls are back;
    only_frozen folds only the non-trainable BN."""
    from kerasdet.precision import fold_batchnorm_calls, fold_pairs

    keras.utils.set_random_seed(1)
    bb = small_backbone(widths=(8, 16, 16, 16), blocks=(1, 1, 0, 0), input_shape=(64, 64, 3))
    _randomize_bn(bb)
    x = _images()
    ref = bb(x, training=False)
    bn = bb.get_layer("stem_bn")
    with fold_batchnorm_calls(bb, only_frozen=False) as n:
        assert n == len(fold_pairs(bb, only_frozen=False)) > 5
        assert bn.call(x) is x  # BN is the identity here
        traced = tf.function(lambda t: bb(t, training=False))(x)
        eager = bb(x, training=False)
    assert "call" not in bn.__dict__ and "call" not in bb.get_layer("stem_conv").__dict__
    with fold_batchnorm_calls(bb, only_frozen=False) as outer:  # re-entrant: the outer block owns the fold
        with fold_batchnorm_calls(bb, only_frozen=False) as inner:
            assert inner == 0
        assert bn.call(x) is x and outer > 5
    assert "call" not in bn.__dict__
    for level in ref:
        scale = float(tf.reduce_max(tf.abs(ref[level])))
        for out in (traced, eager):
            np.testing.assert_allclose(out[level].numpy(), ref[level].numpy(), atol=1e-5 * scale)
            assert not np.array_equal(out[level].numpy(), ref[level].numpy())  # really another graph
    with fold_batchnorm_calls(bb, only_frozen=True) as n:
        assert n == 0  # the small backbone's BN train (batch statistics): nothing to fold in training
    bn.trainable = False
    with fold_batchnorm_calls(bb, only_frozen=True) as n:
        assert n == 1


def test_detector_predict_folds_every_bn_and_training_is_unchanged():
    """predict with fold_batchnorm (default) gives the unfolded detections; the train step is
    the unfolded one (same loss, same updated weights as fold_batchnorm=False)."""
    def model(fold):
        keras.utils.set_random_seed(3)
        m = RetinaNet(backbone=small_backbone(widths=(8, 16, 16, 16), blocks=(0, 1, 0, 0)), num_classes=3,
                      min_level=3, max_level=5, fpn_channels=16, head_convs=1, head_channels=16,
                      anchor_size=2.0, aspect_ratios=(1.0,), scales=(1.0,), prior_probability=0.3,
                      fold_batchnorm=fold)
        m.build()
        _randomize_bn(m.backbone)
        m.compile(optimizer=keras.optimizers.SGD(0.1))
        return m

    folded, plain = model(True), model(False)
    assert folded.get_config()["fold_batchnorm"] is True and RetinaNet.from_config(plain.get_config()).fold_batchnorm is False
    images = _images()
    with folded.folded_batchnorm(only_frozen=False) as n:
        assert n > 5
    with plain.folded_batchnorm(only_frozen=False) as n:
        assert n == 0
    a, b = folded.predict_on_batch(images), plain.predict_on_batch(images)
    np.testing.assert_array_equal(a["num_detections"], b["num_detections"])
    np.testing.assert_array_equal(a["classes"], b["classes"])
    np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-5)
    np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-3)
    assert not np.array_equal(a["scores"], b["scores"])  # another graph computed them
    labels = {"boxes": tf.constant([[[8.0, 8.0, 30.0, 30.0]], [[20.0, 10.0, 50.0, 40.0]]]),
              "classes": tf.constant([[1], [2]])}
    la = folded.train_on_batch(images, labels, return_dict=True)
    lb = plain.train_on_batch(images, labels, return_dict=True)
    assert la["loss"] == lb["loss"]
    for va, vb in zip(folded.weights, plain.weights):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
