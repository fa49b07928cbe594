"""VGG-16 backbone: outputs/strides, layout vs keras.applications, weights, preprocessing."""
import keras
import numpy as np
import pytest

from backbone_testutils import assert_same_weights_by_name, write_legacy_weights_h5
from kerasdet.backbones import VGG16_LAYERS, backbone_levels, vgg16_backbone


@pytest.fixture(scope="module")
def vgg():
    return vgg16_backbone()


def test_default_outputs_strides_and_channels(vgg):
    out = vgg(np.zeros((1, 128, 128, 3), "float32"))
    assert sorted(out) == ["block4_conv3", "block5_conv3"]
    assert tuple(out["block4_conv3"].shape) == (1, 16, 16, 512)  # stride 8 (SSD conv4_3)
    assert tuple(out["block5_conv3"].shape) == (1, 8, 8, 512)  # stride 16
    assert backbone_levels(vgg) == {"block4_conv3": (8, 512), "block5_conv3": (16, 512)}


def test_parameter_count_and_layout_match_keras_applications(vgg):
    ref = keras.applications.VGG16(include_top=False, weights=None)
    assert vgg.count_params() == ref.count_params() == 14_714_688
    ours = [layer.name for layer in vgg.layers if layer.weights]
    assert ours == [layer.name for layer in ref.layers if layer.weights]


def test_requested_layers_and_pruning():
    model = vgg16_backbone(output_layers=("block3_conv3",))
    out = model(np.zeros((1, 64, 64, 3), "float32"))
    assert list(out) == ["block3_conv3"] and tuple(out["block3_conv3"].shape) == (1, 16, 16, 256)
    assert not any(layer.name.startswith(("block4", "block5")) for layer in model.layers)
    assert backbone_levels(model) == {"block3_conv3": VGG16_LAYERS["block3_conv3"]}
    with pytest.raises(ValueError, match="output_layers"):
        vgg16_backbone(output_layers=("fc7",))


def test_preprocessing_equals_keras_applications_preprocess_input(vgg, images_64):
    pre = keras.Model(vgg.input, vgg.get_layer("caffe_preprocess").output)
    expected = keras.applications.vgg16.preprocess_input(images_64.copy())
    np.testing.assert_allclose(pre(images_64).numpy(), expected, rtol=0, atol=1e-5)


def test_weights_from_keras_applications_files(tmp_path, images_64):
    ref = keras.applications.VGG16(include_top=False, weights=None)
    # Keras 3 .weights.h5 and a legacy weights-only .h5 (official *_notop.h5 layout).
    ref.save_weights(str(tmp_path / "vgg16.weights.h5"))
    legacy = write_legacy_weights_h5(ref, tmp_path / "vgg16_notop.h5")
    full = vgg16_backbone(weights=tmp_path / "vgg16.weights.h5")
    assert_same_weights_by_name(ref, full)
    expected = keras.Model(ref.input, ref.get_layer("block5_conv3").output)(
        keras.applications.vgg16.preprocess_input(images_64.copy())
    )
    np.testing.assert_allclose(full(images_64)["block5_conv3"], expected, rtol=1e-5, atol=1e-4)
    # A pruned backbone (fewer weighted layers than the file) loads by name.
    pruned = vgg16_backbone(weights=legacy, output_layers=("block3_conv3",))
    assert_same_weights_by_name(ref, pruned)


def test_weight_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="local"):
        vgg16_backbone(weights="imagenet")
    with pytest.raises(FileNotFoundError, match="vgg16_notop.h5"):
        vgg16_backbone(weights=tmp_path / "vgg16_notop.h5")
