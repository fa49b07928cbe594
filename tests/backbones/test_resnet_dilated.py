"""Layer-by-layer ResNet: keras.applications layout, dilated conv5, cascade attention inside."""
import keras
import numpy as np
import pytest

from backbone_testutils import (
    assert_same_weights_by_name,
    randomize_batchnorm_statistics,
    write_legacy_weights_h5,
)
from kerasdet.backbones import backbone_levels, get_backbone, resnet_dilated_backbone
from kerasdet.backbones.resnet import load_local_weights
from kerasdet.layers.attention import CascadeAttention

R50_LEVEL_LAYERS = {"C2": "conv2_block3_out", "C3": "conv3_block4_out", "C4": "conv4_block6_out",
                    "C5": "conv5_block3_out"}


def _layout(model):
    return [(l.name, [tuple(w.shape) for w in l.weights]) for l in model.layers if l.weights]


def _attention_params(in_channels, channels):
    """Two 3x3 convs: in -> channels (+bias), channels -> 1 (+bias)."""
    return 9 * in_channels * channels + channels + 9 * channels + 1


@pytest.fixture(scope="module")
def keras_r50():
    return keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3))


@pytest.fixture(scope="module")
def att50():
    """Dilated ResNet-50 with attention after conv2/3/4 (the paper's placement)."""
    return resnet_dilated_backbone(50, attention_levels=(2, 3, 4), attention_channels=16)


def test_plain_layout_and_outputs_equal_keras_applications(keras_r50, images_64):
    ours = resnet_dilated_backbone(50, dilate_c5=False, freeze_at=0, frozen_batchnorm=False)
    assert _layout(ours) == _layout(keras_r50)  # same names, shapes and order
    assert ours.count_params() == keras_r50.count_params() == 23_587_712
    randomize_batchnorm_statistics(keras_r50, seed=5)
    for layer in ours.layers:
        if layer.weights:
            layer.set_weights(keras_r50.get_layer(layer.name).get_weights())
    reference = keras.Model(
        keras_r50.input, {lv: keras_r50.get_layer(n).output for lv, n in R50_LEVEL_LAYERS.items()}
    )(keras.applications.resnet.preprocess_input(images_64.copy()))
    out = ours(images_64)
    assert sorted(out) == ["C2", "C3", "C4", "C5"]
    for level in out:
        np.testing.assert_allclose(out[level], reference[level], rtol=1e-5, atol=1e-4, err_msg=level)
    assert backbone_levels(ours) == {"C2": (4, 256), "C3": (8, 512), "C4": (16, 1024), "C5": (32, 2048)}


def test_dilated_c5_has_stride_16_and_same_weights_layout(att50, keras_r50, images_64):
    levels = backbone_levels(att50)
    assert levels["C4"] == (16, 1024) and levels["C5"] == (16, 2048)
    out = att50(images_64)
    assert tuple(out["C5"].shape) == (1, 4, 4, 2048) and tuple(out["C4"].shape) == (1, 4, 4, 1024)
    for b in (1, 2, 3):
        assert att50.get_layer(f"conv5_block{b}_2_conv").dilation_rate == (2, 2)
        assert att50.get_layer(f"conv5_block{b}_1_conv").strides == (1, 1)
    assert att50.get_layer("conv5_block1_0_conv").strides == (1, 1)
    assert att50.get_layer("conv4_block1_1_conv").strides == (2, 2)
    assert att50.get_layer("conv4_block1_2_conv").dilation_rate == (1, 1)
    # dilation adds no weights: without the attention blocks the layout is keras.applications'
    plain = [item for item in _layout(att50) if not item[0].startswith("attention_")]
    assert plain == _layout(keras_r50)


def test_attention_blocks_inside_the_network(att50, images_64):
    assert sorted(att50.output) == ["A2", "A3", "A4", "C2", "C3", "C4", "C5"]
    out = att50(images_64)
    for level, size in ((2, 16), (3, 8), (4, 4)):
        block = att50.get_layer(f"attention_c{level}")
        assert isinstance(block, CascadeAttention) and block.channels == 16
        assert tuple(out[f"A{level}"].shape) == (1, size, size, 1)
    # C{level} is the attended stage output A * f, and it feeds the next stage
    stage = keras.Model(att50.input, att50.get_layer("conv2_block3_out").output)(images_64)
    a2 = 1.0 / (1.0 + np.exp(-out["A2"].numpy()))
    np.testing.assert_allclose(out["C2"], a2 * stage.numpy(), rtol=1e-5, atol=1e-5)
    assert att50.get_layer("conv3_block1_1_conv").input is att50.get_layer("attention_c2").output[0]
    assert att50.get_layer("conv5_block1_1_conv").input is att50.get_layer("attention_c4").output[0]
    assert att50.output["C5"] is att50.get_layer("conv5_block3_out").output
    # attention blocks are new layers: trainable under the default freeze (stem + conv2, BN)
    assert all(att50.get_layer(f"attention_c{k}").trainable for k in (2, 3, 4))
    assert not att50.get_layer("conv2_block1_1_conv").trainable
    assert not att50.get_layer("conv3_block1_1_bn").trainable
    assert len(att50.trainable_weights) == 84 + 3 * 4


def test_r101_dilated_parameter_counts():
    model = resnet_dilated_backbone(101, attention_levels=(2, 3, 4), freeze_at=0, frozen_batchnorm=False)
    attention = sum(model.get_layer(f"attention_c{k}").count_params() for k in (2, 3, 4))
    expected_attention = sum(_attention_params(c, 256) for c in (256, 512, 1024))
    assert attention == expected_attention == 4_136_451
    # the dilated ResNet-101 itself has exactly the parameters of the plain keras.applications
    # ResNet-101 (pinned in test_resnet.py): dilation adds none
    assert model.count_params() - attention == 42_658_176
    assert model.count_params() == 46_794_627
    assert backbone_levels(model)["C5"] == (16, 2048)


def test_loads_keras_applications_file(tmp_path, keras_r50):
    randomize_batchnorm_statistics(keras_r50, seed=6)
    path = write_legacy_weights_h5(keras_r50, tmp_path / "resnet50_notop.h5")
    plain = resnet_dilated_backbone(50, weights=path, dilate_c5=False)
    assert_same_weights_by_name(keras_r50, plain)
    # also through load_local_weights directly (the direct topological path)
    fresh = resnet_dilated_backbone(50, dilate_c5=False)
    load_local_weights(fresh, path)
    assert_same_weights_by_name(keras_r50, fresh)


@pytest.mark.slow  # four ResNet-50 builds (~30 s on a busy 2-core CPU)
def test_loads_keras_applications_file_into_attention_backbone(tmp_path, images_64, keras_r50):
    randomize_batchnorm_statistics(keras_r50, seed=7)
    path = write_legacy_weights_h5(keras_r50, tmp_path / "resnet50_notop.h5")
    # with attention: ResNet layers from the file, attention blocks keep their init
    att = resnet_dilated_backbone(50, weights=path, attention_levels=(3,), attention_channels=8)
    for layer in att.layers:
        if layer.weights and not layer.name.startswith("attention_"):
            for a, b in zip(layer.get_weights(), keras_r50.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(a, b, err_msg=layer.name)
    assert len(att.trainable_weights) == 84 + 4  # freezing applied after loading
    # round trip of the attention backbone's own Keras 3 weights file
    own = tmp_path / "att.weights.h5"
    att.get_layer("attention_c3").logits_conv.bias.assign([0.7])
    att.save_weights(str(own))
    again = resnet_dilated_backbone(50, weights=own, attention_levels=(3,), attention_channels=8)
    a, b = att(images_64), again(images_64)
    for level in a:
        np.testing.assert_array_equal(a[level].numpy(), b[level].numpy())


def test_registry_config_round_trip_and_bad_arguments(images_64):
    model = get_backbone("ResNet-50_dilated", attention_levels=(4,), attention_channels=8,
                         dilate_c5=False, freeze_at=0)
    assert backbone_levels(model) == {
        "A4": (16, 1), "C2": (4, 256), "C3": (8, 512), "C4": (16, 1024), "C5": (32, 2048)}
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    a, b = model(images_64), clone(images_64)
    for level in a:
        np.testing.assert_allclose(a[level], b[level], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="depth"):
        resnet_dilated_backbone(152)
    with pytest.raises(ValueError, match="attention_levels"):
        resnet_dilated_backbone(50, attention_levels=(1,))
    with pytest.raises(ValueError, match="local"):
        resnet_dilated_backbone(50, weights="imagenet")
    with pytest.raises(ValueError, match="input_shape"):
        resnet_dilated_backbone(50, input_shape=(64, 64, 1))
