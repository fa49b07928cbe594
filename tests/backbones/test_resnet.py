"""ResNet backbones: layout vs keras.applications, weights, preprocessing, freezing."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from backbone_testutils import (
    assert_same_weights_by_name,
    randomize_batchnorm_statistics,
    write_legacy_weights_h5,
)
from kerasdet.backbones import backbone_levels, freeze_resnet, resnet_backbone
from kerasdet.backbones.resnet import CaffePreprocess, resnet_stage

EXPECTED = {"C2": (4, 256), "C3": (8, 512), "C4": (16, 1024), "C5": (32, 2048)}


@pytest.fixture(scope="module")
def r50():
    """A random-init ResNet-50 backbone with the defaults (shared; tests restore freezing)."""
    return resnet_backbone(50)


@pytest.fixture(scope="module")
def keras_r50():
    return keras.applications.ResNet50(include_top=False, weights=None)


def test_outputs_are_c2_to_c5_with_strides_and_channels(r50):
    x = np.zeros((1, 128, 128, 3), "float32")
    out = r50(x)
    assert sorted(out) == ["C2", "C3", "C4", "C5"]
    for level, (stride, channels) in EXPECTED.items():
        assert tuple(out[level].shape) == (1, 128 // stride, 128 // stride, channels), level
    assert backbone_levels(r50) == EXPECTED


def test_odd_input_size_gives_ceil_sizes(r50):
    out = r50(np.zeros((1, 100, 76, 3), "float32"))
    for level, (stride, _) in EXPECTED.items():
        assert out[level].shape[1:3] == (-(-100 // stride), -(-76 // stride)), level


def test_r50_layout_and_parameter_count_match_keras_applications(r50, keras_r50):
    assert r50.count_params() == keras_r50.count_params() == 23_587_712
    # Same weighted layers, same names, same order: keras.applications weight files load.
    def layout(model):
        return [(l.name, [tuple(w.shape) for w in l.weights]) for l in model.layers if l.weights]

    assert layout(r50) == layout(keras_r50)
    # C2..C5 are the keras.applications stage outputs.
    names = {"C2": "conv2_block3_out", "C3": "conv3_block4_out", "C4": "conv4_block6_out",
             "C5": "conv5_block3_out"}
    for level, name in names.items():
        assert r50.output[level] is r50.get_layer(name).output, level


def test_r101_parameter_count_and_levels():
    ours = resnet_backbone(101, freeze_at=0, frozen_batchnorm=False)
    ref = keras.applications.ResNet101(include_top=False, weights=None)
    assert ours.count_params() == ref.count_params() == 42_658_176
    assert ours.get_layer("conv4_block23_out") is not None
    assert backbone_levels(ours) == EXPECTED


def test_preprocessing_equals_keras_applications_preprocess_input(r50, images_64):
    pre = keras.Model(r50.input, r50.get_layer("caffe_preprocess").output)
    expected = keras.applications.resnet.preprocess_input(images_64.copy())
    np.testing.assert_allclose(pre(images_64).numpy(), expected, rtol=0, atol=1e-5)
    # and the first convolution sees exactly that (after zero padding)
    assert r50.get_layer("conv1_pad").input is r50.get_layer("caffe_preprocess").output


def test_caffe_preprocess_config_round_trip(images_64):
    layer = CaffePreprocess(mean=(1.0, 2.0, 3.0), reverse_channels=False, name="pre")
    clone = CaffePreprocess.from_config(layer.get_config())
    assert clone.mean == (1.0, 2.0, 3.0) and clone.reverse_channels is False
    np.testing.assert_allclose(clone(images_64), images_64 - np.array([1.0, 2.0, 3.0]), atol=1e-5)
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(revived, CaffePreprocess) and revived.get_config() == layer.get_config()


def test_caffe_preprocess_survives_saved_model_export(tmp_path, images_64):
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, CaffePreprocess()(inputs))
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        lambda x: model(x),
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)],
    )
    archive.write_out(str(tmp_path / "sm"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    out = loaded.signatures["serving_default"](tf.constant(images_64))
    out = next(iter(out.values()))
    np.testing.assert_allclose(
        out.numpy(), keras.applications.resnet.preprocess_input(images_64.copy()), atol=1e-5
    )


def test_functional_config_round_trip(r50, images_64):
    clone = keras.Model.from_config(r50.get_config())
    clone.set_weights(r50.get_weights())
    a, b = r50(images_64), clone(images_64)
    assert sorted(b) == sorted(a)
    for level in a:
        np.testing.assert_allclose(a[level], b[level], rtol=1e-6, atol=1e-6)


def test_frozen_batchnorm_runs_in_inference_mode(r50, images_64):
    bns = [layer for layer in r50.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == 53 and not any(bn.trainable for bn in bns)
    randomize_batchnorm_statistics(r50)
    before = [bn.moving_mean.numpy().copy() for bn in bns]
    train = r50(images_64, training=True)
    infer = r50(images_64, training=False)
    for level in train:
        np.testing.assert_array_equal(train[level].numpy(), infer[level].numpy())
    for bn, mean in zip(bns, before):
        np.testing.assert_array_equal(bn.moving_mean.numpy(), mean)


def test_trainable_batchnorm_uses_batch_statistics(r50, images_64):
    try:
        freeze_resnet(r50, freeze_at=0, frozen_batchnorm=False)
        train = r50(images_64, training=True)["C5"].numpy()
        infer = r50(images_64, training=False)["C5"].numpy()
        assert np.abs(train - infer).max() > 1e-3
    finally:
        freeze_resnet(r50)


@pytest.mark.parametrize(
    "freeze_at, frozen_bn, expected",
    [
        # R50: 53 convs (kernel + bias), 53 BNs (gamma + beta); stem = 1 conv,
        # stage 2 = 10 convs (3 blocks x 3 + 1 shortcut), each with its BN.
        (0, False, 212),
        (0, True, 106),
        (1, True, 104),
        (2, True, 84),
        (2, False, 168),
        (5, True, 0),
    ],
)
def test_freeze_at_trainable_weight_counts(r50, freeze_at, frozen_bn, expected):
    try:
        freeze_resnet(r50, freeze_at=freeze_at, frozen_batchnorm=frozen_bn)
        assert len(r50.trainable_weights) == expected
    finally:
        freeze_resnet(r50)


def test_default_freeze_is_stem_and_stage2(r50):
    trainable = {layer.name: layer.trainable for layer in r50.layers}
    assert not trainable["conv1_conv"]
    assert not trainable["conv2_block1_0_conv"] and not trainable["conv2_block3_3_conv"]
    assert trainable["conv3_block1_1_conv"] and trainable["conv5_block3_3_conv"]
    assert not trainable["conv3_block1_1_bn"]  # frozen BN
    assert len(r50.trainable_weights) == 84
    assert resnet_stage("conv1_conv") == 1 and resnet_stage("pool1_pool") == 1
    assert resnet_stage("conv4_block23_out") == 4 and resnet_stage("images") is None


def test_freeze_resnet_reapplies_after_parent_unfreezes(r50):
    try:
        # Keras sets `trainable` recursively. (With the TF backend, assigning the value the
        # model already has is a no-op, hence the False -> True toggle.)
        r50.trainable = False
        r50.trainable = True
        assert len(r50.trainable_weights) == 212
        freeze_resnet(r50)
        assert len(r50.trainable_weights) == 84
    finally:
        freeze_resnet(r50)


def test_weights_round_trip_keras3_file(r50, tmp_path, images_64):
    randomize_batchnorm_statistics(r50, seed=3)
    path = tmp_path / "r50_backbone.weights.h5"
    r50.save_weights(str(path))
    fresh = resnet_backbone(50, weights=path)
    a, b = r50(images_64), fresh(images_64)
    for level in a:
        np.testing.assert_array_equal(a[level].numpy(), b[level].numpy())
    # loading happens before freezing, freezing is still applied
    assert len(fresh.trainable_weights) == 84


def test_loads_keras_applications_files_with_and_without_top(tmp_path, images_64):
    # Weights-only legacy .h5, the layout of keras.applications' official *_notop.h5 files.
    notop = randomize_batchnorm_statistics(
        keras.applications.ResNet50(include_top=False, weights=None), seed=4
    )
    notop_path = write_legacy_weights_h5(notop, tmp_path / "resnet50_notop.h5")
    ours = resnet_backbone(50, weights=str(notop_path))
    assert_same_weights_by_name(notop, ours)
    expected = keras.Model(notop.input, notop.get_layer("conv5_block3_out").output)(
        keras.applications.resnet.preprocess_input(images_64.copy())
    )
    np.testing.assert_allclose(ours(images_64)["C5"], expected, rtol=1e-5, atol=1e-4)

    # With the classification top (legacy .h5 and Keras 3 .weights.h5).
    top = keras.applications.ResNet50(include_top=True, weights=None)
    top_path = write_legacy_weights_h5(top, tmp_path / "resnet50_top.h5")
    assert_same_weights_by_name(top, resnet_backbone(50, weights=top_path))
    keras3_path = tmp_path / "resnet50_top.weights.h5"
    top.save_weights(str(keras3_path))
    assert_same_weights_by_name(top, resnet_backbone(50, weights=keras3_path))


def test_wrong_architecture_file_raises_value_error_naming_path(tmp_path):
    from kerasdet.backbones import small_backbone

    path = tmp_path / "small.weights.h5"
    small_backbone().save_weights(str(path))
    with pytest.raises(ValueError, match="small.weights.h5"):
        resnet_backbone(50, weights=path)


def test_missing_weights_file_raises_file_not_found(tmp_path):
    missing = tmp_path / "nope" / "resnet50_notop.h5"
    with pytest.raises(FileNotFoundError, match="resnet50_notop.h5"):
        resnet_backbone(50, weights=missing)


@pytest.mark.parametrize("value", ["imagenet", "ImageNet"])
def test_imagenet_string_is_rejected(value):
    with pytest.raises(ValueError, match="local"):
        resnet_backbone(50, weights=value)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="depth"):
        resnet_backbone(34)
    with pytest.raises(ValueError, match="freeze_at"):
        resnet_backbone(50, freeze_at=7)
    with pytest.raises(ValueError, match="input_shape"):
        resnet_backbone(50, input_shape=(64, 64, 1))
    bad = tmp_path / "weights.npz"
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match="weights.npz"):
        resnet_backbone(50, weights=bad)
