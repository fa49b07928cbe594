import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.backbones import resnet_backbone, small_backbone
from kerasdet.models.ssd import ASSD321_EXTRAS, ASSD513_EXTRAS, SSD
from model_testutils import assert_keras_file_round_trip, tiny_batch

TINY_EXTRAS = ((8, 16, 2, "same"), (8, 16, 2, "same"))


def tiny_ssd(**kwargs):
    args = dict(
        backbone=small_backbone(widths=(8, 16, 16, 16), blocks=(0, 0, 0, 0)),
        num_classes=3,
        extra_layers=TINY_EXTRAS,
        min_sizes=(0.15, 0.3, 0.5, 0.7, 0.85),
        aspect_ratios=((2.0,), (2.0,), (2.0,), (2.0,), (2.0,)),
        fusion_channels=8,
        weight_decay=1e-5,
    )
    args.update(kwargs)
    return SSD(**args)


def _torch_layout_count(model):
    """Parameters as the paper counts them: no BN moving statistics."""
    return sum(int(np.prod(v.shape)) for v in model.weights if not v.path.endswith(("moving_mean", "moving_variance")))


def test_assd513_parameters_and_boxes_match_the_paper():
    model = SSD(backbone=resnet_backbone(101), num_classes=20, attention=True, fusion=True, extra_layers=ASSD513_EXTRAS)
    assert model.fusion.alignment == "corners"  # exact on 513's 65 / 33 / 17 grids
    out = model(tf.zeros((1, 513, 513, 3)))
    assert out["class_logits"].shape == (1, 25_844, 21)  # paper Table 2: 25,844 boxes
    # keras.applications' ResNet convs carry biases that torchvision's do not: 52,672 of them.
    resnet_conv_biases = sum(
        int(np.prod(v.shape)) for v in model.backbone.weights if v.path.endswith("bias") and "_conv/" in v.path
    )
    assert resnet_conv_biases == 52_672
    total = _torch_layout_count(model)
    assert total - resnet_conv_biases == 67_546_820  # "ASSD513 67.5M" (spec 002 §1.7 breakdown)
    attention = sum(_torch_layout_count(a) for a in model.attention)
    fusion = _torch_layout_count(model.fusion)
    assert attention == 8_683_520 and fusion == 1_313_536
    assert total - resnet_conv_biases - attention - fusion == 57_549_764  # "SSD513 57.5M"
    # ASSD321 (derived, spec ambiguity 5): the same layers, conv9 stride 2 'same' instead of
    # 'valid', so the same 67,546,820 parameters; the paper's "66.7M" is not reproducible.
    assert [e[:2] for e in ASSD321_EXTRAS] == [e[:2] for e in ASSD513_EXTRAS]
    print(f"ASSD513 (VOC): {total - resnet_conv_biases:,} parameters (torchvision layout), "
          f"{model.count_params():,} in Keras (conv biases + BN statistics)")


@pytest.mark.parametrize("size,extras,count", [(513, ASSD513_EXTRAS, 25_844), (321, ASSD321_EXTRAS, 10_386)])
def test_source_geometry_of_assd513_and_assd321(size, extras, count):
    # Same strides as ResNet-101 (8/16/32), tiny widths: the maps and box counts of the paper's inputs.
    thin = tuple((8, 8, s, p) for _, _, s, p in extras)
    model = SSD(backbone=small_backbone(widths=(8, 8, 8, 8), blocks=(0, 0, 0, 0)), num_classes=2, extra_layers=thin)
    sources = model.sources(tf.zeros((1, size, size, 3)))
    expected = [65, 33, 17, 9, 5, 3, 1] if size == 513 else [41, 21, 11, 6, 3, 2, 1]
    assert [int(s.shape[1]) for s in sources] == expected
    assert model(tf.zeros((1, size, size, 3)))["class_logits"].shape[1] == count


@pytest.mark.parametrize("assd", [False, True])
def test_fit_loss_decreases_and_empty_images_stay_finite(assd):
    keras.utils.set_random_seed(0)
    model = tiny_ssd(attention=assd, fusion=assd)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    images, labels = tiny_batch()
    history = model.fit(images, labels, batch_size=4, epochs=20, verbose=0)
    loss = history.history["loss"]
    assert np.all(np.isfinite(loss)) and loss[-1] < 0.5 * loss[0]
    empty = {"boxes": np.zeros((2, 3, 4), "float32"), "classes": np.full((2, 3), -1, "int32")}
    logs = model.test_on_batch(images[:2], empty, return_dict=True)
    assert np.isfinite(logs["loss"]) and logs["box_loss"] == 0.0 and logs["cls_loss"] == 0.0
    out = model.predict(images, verbose=0)
    assert out["boxes"].shape == (4, 200, 4) and out["classes"].shape == (4, 200)
    n = out["num_detections"]
    assert all(((out["classes"][i, : n[i]] >= 0) & (out["classes"][i, : n[i]] < 3)).all() for i in range(4))
    assert (out["scores"][:, :] >= 0).all()


def test_targets_background_zero_classes_shifted_and_ssd_coding():
    model = tiny_ssd()
    anchors = tf.constant([[0, 0, 10, 10], [0, 0, 20, 20], [50, 50, 60, 60]], tf.float32)
    labels = {"boxes": tf.constant([[[0, 0, 10, 12], [0, 0, 0, 0]]], tf.float32), "classes": tf.constant([[2, -1]])}
    cls, box = model.compute_targets(anchors, labels)
    # IoU 10*10/(10*12) = 0.83 positive (class 2 -> softmax index 3); 0.3 and 0 background
    assert cls.numpy().tolist() == [[3, 0, 0]]
    # SSD coding with variances (0.1, 0.2): dx = (6 - 5) / (0.1 * 10), dw = log(12 / 10) / 0.2
    np.testing.assert_allclose(box.numpy()[0, 0], [0.0, 1.0, 0.0, np.log(1.2) / 0.2], rtol=1e-5, atol=1e-6)


def test_config_round_trip_and_bad_arguments():
    model = tiny_ssd(attention=True, fusion=True, attention_block_size=64)
    model.build((None, 64, 64, 3))
    config = model.get_config()
    clone = SSD.from_config(config)
    clone.build((None, 64, 64, 3))
    assert clone.get_config() == config
    assert clone.count_params() == model.count_params()
    # "auto" fusion grid: the small backbone's TF "same" convs; ResNet / VGG keep the authors' corners
    assert config["fusion_alignment"] == "auto" and model.fusion.alignment == "same_padding"
    assert tiny_ssd(fusion=True, fusion_alignment="corners").fusion.alignment == "corners"
    clone.set_weights(model.get_weights())
    x = tf.random.uniform((1, 64, 64, 3), 0, 255)
    np.testing.assert_allclose(clone(x)["class_logits"], model(x)["class_logits"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="default boxes have"):
        tiny_ssd(min_sizes=(0.1, 0.2), aspect_ratios=((2.0,), (2.0,)))
    with pytest.raises(ValueError, match="first three sources"):
        tiny_ssd(source_levels=("C5",), extra_layers=((8, 8, 2, "same"),), fusion=True, min_sizes=(0.2, 0.4),
                 aspect_ratios=((2.0,),) * 2)


@pytest.mark.parametrize("assd", [False, True])
def test_keras_file_round_trip_after_training(assd, tmp_path):
    # One SGD step moves the extras' BatchNorm statistics too: the file must carry them.
    keras.utils.set_random_seed(7)
    model = tiny_ssd(attention=assd, fusion=assd, attention_block_size=16 if assd else None, score_threshold=0.0)
    images, labels = tiny_batch(batch=2)
    model.compile(optimizer=keras.optimizers.SGD(1e-2))
    model.train_on_batch(images, labels)
    loaded, _ = assert_keras_file_round_trip(model, images, tmp_path)
    assert (loaded.attention is not None) == assd and (loaded.fusion is not None) == assd
    moving = [v for v in model.weights if v.path.endswith("moving_mean") and "extra" in v.path]
    assert moving and all(np.any(v.numpy() != 0) for v in moving)  # trained statistics, compared by the helper


@pytest.mark.parametrize("size,count,params", [(304, 8_732, 29_421_486), (512, 24_564, 30_177_988)])
def test_vgg_assd300_assd512_match_the_paper(size, count, params):
    from kerasdet.backbones import vgg16_backbone
    from kerasdet.models.ssd import SSD300_BOXES, SSD300_VGG_EXTRAS, SSD512_BOXES, SSD512_VGG_EXTRAS

    extras, boxes = (SSD300_VGG_EXTRAS, SSD300_BOXES) if size == 304 else (SSD512_VGG_EXTRAS, SSD512_BOXES)
    model = SSD(backbone=vgg16_backbone(), num_classes=20, source_levels=("block4_conv3",), fc7_from="block5_conv3",
                l2norm_scale=20.0, extra_layers=extras, attention=True, fusion=True, **boxes)
    assert model(tf.zeros((1, size, size, 3)))["class_logits"].shape == (1, count, 21)  # SSD300 8,732 / SSD512 24,564
    total = _torch_layout_count(model)
    extra_bn = sum(int(np.prod(v.shape)) for v in model.weights if "extra" in v.path and v.path.endswith(("gamma", "beta")))
    assert total == params  # paper Table 2: ASSD300 29.4M, ASSD512 30.2M
    attention, fusion = sum(_torch_layout_count(a) for a in model.attention), _torch_layout_count(model.fusion)
    if size == 304:  # without attention, fusion and our extras' BN: Caffe SSD300 (VOC) exactly
        assert total - attention - fusion - extra_bn == 26_285_486
