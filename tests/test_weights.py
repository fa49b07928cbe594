"""kerasdet.weights: keras-hub presets (built offline from config, random weights) load into
kerasdet with the same raw outputs; fine-tuning to a new class list; config errors."""
import json
import os

import numpy as np
import pytest

import keras

from kerasdet import weights as kw
from kerasdet.errors import UserInputError

SIZE = 128  # a multiple of 2**7: keras-hub's FPN does not crop odd upsampled maps
TOL = 1e-4  # float32, measured ~2e-6 on logits/deltas and ~5e-6 on C3-C5


def _hub_retinanet(num_classes, use_p5=True, seed=0):
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(seed)
    enc = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 128, 256, 512],
        stackwise_num_blocks=[3, 4, 6, 3], stackwise_num_strides=[1, 2, 2, 2], block_type="bottleneck_block",
        use_pre_activation=False)
    rng = np.random.default_rng(seed)
    for layer in enc.layers:  # non-trivial BN statistics, so BN mapping errors show
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c),
                               rng.uniform(0.5, 1.5, c)])
    backbone = keras_hub.models.RetinaNetBackbone(image_encoder=enc, min_level=3, max_level=7, use_p5=use_p5)
    converter = keras_hub.layers.RetinaNetImageConverter(
        scale=[1 / (255 * 0.229), 1 / (255 * 0.224), 1 / (255 * 0.225)],
        offset=[-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225], image_size=(SIZE, SIZE))
    det = keras_hub.models.RetinaNetObjectDetector(
        backbone=backbone, num_classes=num_classes,
        preprocessor=keras_hub.models.RetinaNetObjectDetectorPreprocessor(image_converter=converter))
    for v in det.classification_head.weights + det.box_head.weights + backbone.feature_pyramid.weights:
        v.assign(rng.normal(0, 0.02, v.shape).astype("float32"))
    return det, converter


@pytest.fixture(scope="module")
def hub_preset(tmp_path_factory):
    det, converter = _hub_retinanet(num_classes=5)
    path = str(tmp_path_factory.mktemp("hub") / "retinanet")
    det.save_to_preset(path)
    return det, converter, path


@pytest.fixture(scope="module")
def hub_preset_80(tmp_path_factory):
    """An 80-class keras-hub RetinaNet preset (COCO's class count), random but fixed weights."""
    det, converter = _hub_retinanet(num_classes=80, seed=1)
    path = str(tmp_path_factory.mktemp("hub80") / "retinanet")
    det.save_to_preset(path)
    return det, converter, path


def _images(n=2, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")


def _hub_normalize(converter, x):
    return x * np.asarray(converter.scale, "float32") + np.asarray(converter.offset, "float32")


def _hub_to_kerasdet_order(values, level_sizes, depth, num_scales=3, num_ratios=3):
    """keras-hub's anchor order within a location is ratio-major, kerasdet's scale-major."""
    out, start = [], 0
    b = values.shape[0]
    for n in level_sizes:
        seg = values[:, start:start + n].reshape(b, n // (num_scales * num_ratios), num_ratios, num_scales, depth)
        out.append(seg.transpose(0, 1, 3, 2, 4).reshape(b, n, depth))
        start += n
    return np.concatenate(out, axis=1)


def test_retinanet_preset_same_raw_outputs_and_anchors(hub_preset):
    det, converter, path = hub_preset
    model, report = kw.retinanet_from_keras_hub(path)
    assert report.zero_filled and all("conv" in p for p in report.zero_filled)  # keras-hub has no conv biases
    assert model.num_classes == 5
    x = _images()
    hub = det(_hub_normalize(converter, x))
    kd = model(x)
    hub_anchors = det.anchor_generator(x)
    sizes = [int(a.shape[0]) for a in hub_anchors.values()]
    cls = _hub_to_kerasdet_order(np.asarray(hub["cls_logits"]), sizes, 5)
    box = _hub_to_kerasdet_order(np.asarray(hub["bbox_regression"]), sizes, 4)[..., [1, 0, 3, 2]]
    np.testing.assert_allclose(np.asarray(kd["class_logits"]), cls, atol=TOL)
    np.testing.assert_allclose(np.asarray(kd["box_deltas"]), box, atol=TOL)
    assert np.abs(cls).max() > 0.05  # not trivially zero
    anchors = np.concatenate([np.asarray(a) for a in hub_anchors.values()])[None]
    kd_anchors = np.concatenate([np.asarray(a) for a in model.forward(x)[2]])
    np.testing.assert_array_equal(kd_anchors, _hub_to_kerasdet_order(anchors, sizes, 4)[0])

    # Backbone C3-C5 equal keras-hub's encoder pyramid outputs.
    feats = det.backbone.layers[1](_hub_normalize(converter, x))
    ours = model.backbone(x)
    for lvl in (3, 4, 5):
        np.testing.assert_allclose(np.asarray(ours[f"C{lvl}"]), np.asarray(feats[f"P{lvl}"]), atol=TOL)


def _dominant_class(kernel, bias, k=2, num_classes=5):
    """Class ``k``'s output scaled up (varied, many scores > 0.5), the others pushed to ~0."""
    kernel, bias = kernel.copy(), bias.copy()
    kernel[..., k::num_classes] *= 20
    bias[k::num_classes] += 1.0
    for c in range(num_classes):
        if c != k:
            bias[c::num_classes] = -30.0
    return [kernel, bias]


def test_retinanet_preset_same_detections_where_postprocessing_agrees(hub_preset):
    """With one class dominant (per-class NMS == class-agnostic NMS), kerasdet's threshold
    raised to keras-hub's 0.5, no pre-NMS top-k and keras-hub's boxes clipped to the image
    (kerasdet clips before NMS, keras-hub does not), both keep the same boxes."""
    det, converter, path = hub_preset
    model, _ = kw.retinanet_from_keras_hub(path, score_threshold=0.5, pre_nms_topk=100000, max_detections=100)
    x = _images(1, seed=3)
    xn = _hub_normalize(converter, x)
    # Class 2 dominant with varied scores: shift its output bias in both models alike.
    hub_layer = det.classification_head.prediction_layer
    k_hub, b_hub = hub_layer.get_weights()
    hub_layer.set_weights(_dominant_class(k_hub, b_hub))
    kd_layer = model.head.class_out
    k_kd, b_kd = kd_layer.get_weights()
    kd_layer.set_weights(_dominant_class(k_kd, b_kd))
    try:
        raw = det(xn)
        import keras.ops as ops
        anchors = ops.concatenate(list(det.anchor_generator(x).values()), axis=0)
        boxes = keras.utils.bounding_boxes.decode_deltas_to_boxes(
            anchors=anchors, boxes_delta=raw["bbox_regression"], encoded_format="center_xywh",
            anchor_format="yxyx", box_format="yxyx", image_shape=(SIZE, SIZE, 3))
        boxes = np.clip(np.asarray(boxes), 0, SIZE)
        hub_det = det.prediction_decoder(boxes, raw["cls_logits"], images=xn)
        kd_det = model.detect(x)
    finally:
        hub_layer.set_weights([k_hub, b_hub])
        kd_layer.set_weights([k_kd, b_kd])
    n_hub = int(np.asarray(hub_det["num_detections"])[0])
    n_kd = int(np.asarray(kd_det["num_detections"])[0])
    assert n_hub == n_kd and n_kd > 5
    assert set(np.asarray(kd_det["classes"])[0, :n_kd].tolist()) == {2}
    np.testing.assert_allclose(np.asarray(kd_det["boxes"])[0, :n_kd], np.asarray(hub_det["boxes"])[0, :n_hub],
                               atol=1e-2)
    np.testing.assert_allclose(np.asarray(kd_det["scores"])[0, :n_kd],
                               np.asarray(hub_det["confidence"])[0, :n_hub], atol=1e-4)


@pytest.mark.parametrize("depth", [50, 101])
def test_resnet_preset_same_features(tmp_path, depth):
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(1)
    enc = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 128, 256, 512],
        stackwise_num_blocks=[3, 4, 6, 3] if depth == 50 else [3, 4, 23, 3], stackwise_num_strides=[1, 2, 2, 2],
        block_type="bottleneck_block", use_pre_activation=False)
    rng = np.random.default_rng(1)
    for layer in enc.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c),
                               rng.uniform(0.5, 1.5, c)])
    path = str(tmp_path / f"resnet{depth}")
    enc.save_to_preset(path)  # a bare backbone preset: no image converter
    with pytest.raises(UserInputError, match="normalization is unknown"):
        kw.resnet_from_keras_hub(path)
    identity = {"mean": [0.0, 0.0, 0.0], "scale": [1.0, 1.0, 1.0], "reverse_channels": False}
    backbone, report = kw.resnet_from_keras_hub(path, normalization=identity)
    assert backbone.count_params() - enc.count_params() == sum(  # only keras.applications' conv biases differ
        layer.filters for layer in backbone.layers if isinstance(layer, keras.layers.Conv2D))
    x = _images(1, seed=5) / 255.0
    ref = keras.Model(enc.inputs, {f"C{l}": enc.pyramid_outputs[f"P{l}"] for l in (2, 3, 4, 5)})(x)
    ours = backbone(x)
    for lvl in (2, 3, 4, 5):
        np.testing.assert_allclose(np.asarray(ours[f"C{lvl}"]), np.asarray(ref[f"C{lvl}"]), atol=TOL)
    # A keras.applications-layout backbone (stride in the 1x1) is refused, naming the fix.
    from kerasdet.backbones import resnet_backbone
    with pytest.raises(UserInputError, match="stride_in_3x3"):
        kw.load_keras_hub_resnet(resnet_backbone(depth), path, normalization=identity)


def test_mismatches_are_errors_naming_the_piece(hub_preset, tmp_path):
    det, converter, path = hub_preset
    from kerasdet.backbones import resnet_backbone
    from kerasdet.models.retinanet import RetinaNet

    norm = kw.keras_hub_retinanet_config(path)["normalization"]
    bb = resnet_backbone(50, stride_in_3x3=True, batchnorm_epsilon=1e-5, normalization=norm)
    model = RetinaNet(backbone=bb, num_classes=5)  # kerasdet's own anchor grid
    with pytest.raises(UserInputError, match="anchor_center_offset"):
        kw.load_keras_hub_retinanet(model, path)
    with pytest.raises(UserInputError, match="max_level"):
        kw.retinanet_from_keras_hub(path, max_level=6)
    with pytest.raises(FileNotFoundError):
        kw.retinanet_from_keras_hub(str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"class_name": "ViTBackbone", "config": {}}))
    (bad / "model.weights.h5").write_text("")
    with pytest.raises(UserInputError, match="RetinaNetObjectDetector"):
        kw.retinanet_from_keras_hub(str(bad))
    task = json.load(open(os.path.join(path, "task.json")))
    task["config"]["use_prediction_head_norm"] = True
    other = tmp_path / "gn"
    os.makedirs(other)
    for name in os.listdir(path):
        if name != "task.json":
            os.symlink(os.path.join(path, name), other / name)
    (other / "task.json").write_text(json.dumps(task))
    with pytest.raises(UserInputError, match="use_prediction_head_norm"):
        kw.retinanet_from_keras_hub(str(other))


def test_finetune_new_class_list_keeps_every_other_weight_and_named_rows(hub_preset_80, tmp_path):
    """A pretrained 80-class detector (random but fixed weights) fine-tuned to 3 classes:
    every non-output weight kept at load, output re-initialized with the prior bias except
    the rows of the classes named in both lists; it trains and exports."""
    _, _, path = hub_preset_80
    src, _ = kw.retinanet_from_keras_hub(path)
    assert src.num_classes == 80
    source_names = ["person", "car", "dog", "cat", "bus"] + [f"class{i}" for i in range(5, 80)]
    model, report = kw.retinanet_from_keras_hub(path, num_classes=3, class_names=["dog", "zebra", "person"],
                                                source_class_names=source_names, freeze="backbone")
    assert report.kept_classes == {0: 2, 2: 0}
    out_ids = {id(model.head.class_out.kernel), id(model.head.class_out.bias)}
    src_out = {id(src.head.class_out.kernel), id(src.head.class_out.bias)}
    kept = [v for v in model.weights if id(v) not in out_ids]
    ref = [v for v in src.weights if id(v) not in src_out]
    assert len(kept) == len(ref)
    for a, b in zip(kept, ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kernel, bias = (np.asarray(v) for v in (model.head.class_out.kernel, model.head.class_out.bias))
    s_kernel, s_bias = (np.asarray(v) for v in (src.head.class_out.kernel, src.head.class_out.bias))
    a = model.head.num_anchors
    np.testing.assert_array_equal(kernel[..., np.arange(a) * 3 + 0], s_kernel[..., np.arange(a) * 80 + 2])
    np.testing.assert_array_equal(bias[np.arange(a) * 3 + 2], s_bias[np.arange(a) * 80 + 0])
    np.testing.assert_allclose(bias[np.arange(a) * 3 + 1], -np.log(0.99 / 0.01), rtol=1e-6)  # "zebra": prior
    assert not model.backbone.trainable and model.fpn.trainable

    # Trains (one step moves the head, not the frozen backbone) and exports.
    model.compile(optimizer=keras.optimizers.SGD(1e-3))
    x = _images(2)
    labels = {"boxes": np.array([[[10, 10, 60, 60], [0, 0, 0, 0]], [[20, 30, 90, 100], [0, 0, 0, 0]]], "float32"),
              "classes": np.array([[0, -1], [2, -1]], "int32")}
    before_bb = np.asarray(model.backbone.get_layer("conv5_block3_3_conv").kernel).copy()
    before_head = np.asarray(model.head.class_tower[0].kernel).copy()
    model.train_on_batch(x, labels)
    assert np.array_equal(before_bb, np.asarray(model.backbone.get_layer("conv5_block3_3_conv").kernel))
    assert not np.array_equal(before_head, np.asarray(model.head.class_tower[0].kernel))
    from kerasdet.export import export_saved_model
    export_saved_model(model, str(tmp_path / "export"), image_size=(SIZE, SIZE))
    assert os.path.isfile(tmp_path / "export" / "saved_model.pb") or any(
        f == "saved_model.pb" for _, _, files in os.walk(tmp_path / "export") for f in files)


def _tiny_retinanet(num_classes, seed=0):
    from kerasdet.backbones import get_backbone
    from kerasdet.models.retinanet import RetinaNet

    keras.utils.set_random_seed(seed)
    model = RetinaNet(backbone=get_backbone("small", widths=(8, 8, 8, 8), blocks=(0, 0, 0, 0)),
                      num_classes=num_classes, min_level=3, max_level=5, fpn_channels=8, head_convs=1,
                      head_channels=8)
    model.build()
    return model


def test_kerasdet_weights_file_to_new_class_count(tmp_path):
    source = _tiny_retinanet(4, seed=0)
    file = str(tmp_path / "src.weights.h5")
    source.save_weights(file)
    target = _tiny_retinanet(2, seed=1)
    report = kw.load_detector_weights(target, file, class_names=["b", "x"], source_class_names=list("abcd"))
    assert report.kept_classes == {0: 1}
    np.testing.assert_array_equal(np.asarray(target.fpn.lateral["p3"].kernel), np.asarray(source.fpn.lateral["p3"].kernel))
    same = _tiny_retinanet(4, seed=2)
    kw.load_detector_weights(same, file)
    for a, b in zip(same.weights, source.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(UserInputError, match="no such file"):
        kw.load_detector_weights(same, str(tmp_path / "missing.weights.h5"))


def test_config_model_weights_key(tmp_path):
    from kerasdet.engine.recipes import load_recipe
    from kerasdet.errors import ConfigError

    recipe = load_recipe("retinanet")
    config = recipe.config("digits", {"model.weights": str(tmp_path / "nothing"), "model.freeze": "backbone"})
    assert config.model["weights"].endswith("nothing")
    with pytest.raises(UserInputError, match="no such file or folder"):
        recipe.build_model(config, 3)
    config = recipe.config("digits", {"model.freeze": "everything"})
    with pytest.raises(ConfigError, match="model.freeze"):
        recipe.build_model(config, 3)
