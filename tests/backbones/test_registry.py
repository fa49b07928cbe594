"""Backbone registry and level queries."""
import keras
import pytest

from kerasdet.backbones import BACKBONES, backbone_levels, get_backbone


def test_registry_names():
    assert set(BACKBONES) == {"resnet50", "resnet101", "resnet152", "small", "vgg16"}


def test_get_backbone_passes_kwargs_and_normalizes_names():
    model = get_backbone("Small", widths=(8, 8, 8, 8), blocks=(0, 0, 0, 0), levels=("C4",))
    assert isinstance(model, keras.Model)
    assert backbone_levels(model) == {"C4": (16, 8)}


def test_get_backbone_resnet50_and_vgg16():
    r50 = get_backbone("resnet-50", freeze_at=0)
    assert backbone_levels(r50)["C5"] == (32, 2048)
    assert len(r50.trainable_weights) == 106  # freeze_at reached the builder
    vgg = get_backbone("vgg16", output_layers=("block4_conv3",))
    assert backbone_levels(vgg) == {"block4_conv3": (8, 512)}


def test_unknown_backbone():
    with pytest.raises(ValueError, match="resnet50"):
        get_backbone("mobilenet")


def test_backbone_levels_static_input_shape():
    model = get_backbone("small", input_shape=(96, 96, 3))
    assert backbone_levels(model) == {"C3": (8, 64), "C4": (16, 96), "C5": (32, 128)}
