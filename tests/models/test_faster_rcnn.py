"""Faster R-CNN (FPN and C4): training, edge cases, inference format, config, parameter count."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.backbones import resnet_backbone, small_backbone, vgg16_backbone
from kerasdet.layers.region_proposal import RegionProposalNetwork
from kerasdet.layers.roi_align import RoIAlign
from kerasdet.models.faster_rcnn import BoxHead, FasterRCNN
from model_testutils import assert_keras_file_round_trip, tiny_batch
from two_stage_fixtures import assert_legacy_keras_file_loads, assert_matches_fixture


def tiny_model(**kwargs):
    args = dict(
        backbone=small_backbone(widths=(8, 16, 16, 16), blocks=(0, 0, 0, 0), levels=("C2", "C3", "C4", "C5")),
        num_classes=3,
        fpn_channels=16,
        rpn_channels=16,
        anchor_size=4.0,
        canonical_size=112.0,
        rpn_pre_nms_topk_train=200,
        rpn_post_nms_topk_train=100,
        rpn_pre_nms_topk_test=100,
        rpn_post_nms_topk_test=50,
        num_rois=32,
        fc_dim=32,
        max_detections=20,
    )
    args.update(kwargs)
    return FasterRCNN(**args)


def _finite(logs):
    return all(np.all(np.isfinite(v)) for v in logs.values())


def test_fit_rpn_and_head_losses_fall_and_empty_images_stay_finite():
    keras.utils.set_random_seed(0)
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    images, labels = tiny_batch()
    history = model.fit(images, labels, batch_size=4, epochs=20, verbose=0).history
    assert {"rpn_cls_loss", "rpn_box_loss", "cls_loss", "box_loss", "weight_decay"} <= set(history)
    assert _finite(history)
    assert history["rpn_cls_loss"][-1] < 0.3 * history["rpn_cls_loss"][0]
    assert history["cls_loss"][-1] < 0.5 * history["cls_loss"][0]
    assert history["loss"][-1] < 0.6 * history["loss"][0]
    # a batch without any object: valid all-background samples, zero box losses
    empty = {"boxes": np.zeros((2, 3, 4), "float32"), "classes": np.full((2, 3), -1, "int32")}
    logs = model.train_on_batch(images[:2], empty, return_dict=True)
    assert _finite(logs)
    logs = model.test_on_batch(images[:2], empty, return_dict=True)
    assert _finite(logs) and logs["box_loss"] == 0.0 and logs["rpn_box_loss"] == 0.0


def test_proposals_all_outside_the_image_train_without_nan():
    keras.utils.set_random_seed(1)
    model = tiny_model()
    images, labels = tiny_batch(batch=2)
    model.compile(optimizer=keras.optimizers.SGD(1e-3))
    model.build((None, 64, 64, 3))
    # every decoded proposal lands 100 anchor heights below the image: clipped to nothing
    bias = np.tile(np.array([100.0, 100.0, 0.0, 0.0], "float32"), model.rpn_head.num_anchors)
    model.rpn_head.deltas.bias.assign(bias)
    feats = model.features(images)
    logits, deltas, anchors = model.rpn(feats)
    _, _, valid = model.proposals(logits, deltas, anchors, (64, 64), training=True)
    assert valid.numpy().sum() == 0
    for _ in range(2):
        logs = model.train_on_batch(images, labels, return_dict=True)
        assert _finite(logs)
    assert all(np.all(np.isfinite(v.numpy())) for v in model.trainable_variables)
    out = model.predict(images, verbose=0)
    assert np.all(out["num_detections"] == 0) and np.all(out["classes"] == -1)


def test_predict_format_and_padded_nms_agrees():
    keras.utils.set_random_seed(2)
    model = tiny_model(score_threshold=0.2)
    images, labels = tiny_batch(batch=2)
    model.build((None, 64, 64, 3))
    out = model.predict(images, batch_size=2, verbose=0)
    assert out["boxes"].shape == (2, 20, 4) and out["scores"].shape == (2, 20)
    assert out["classes"].dtype == np.int32 and out["num_detections"].dtype == np.int32
    n = out["num_detections"]
    assert np.all(n > 0)
    for b in range(2):
        assert np.all(out["classes"][b, n[b]:] == -1) and np.all(out["classes"][b, : n[b]] >= 0)
        assert np.all(out["classes"][b, : n[b]] < 3) and np.all(out["scores"][b, : n[b]] > 0.2)
        assert np.all(out["scores"][b, n[b]:] == 0)
    assert np.all(out["boxes"] >= 0) and np.all(out["boxes"] <= 64)
    model.nms_method = "padded"
    padded = model.detect(tf.constant(images))
    model.nms_method = "auto"
    np.testing.assert_array_equal(padded["num_detections"], n)
    np.testing.assert_allclose(np.sort(padded["scores"].numpy(), 1), np.sort(out["scores"], 1), atol=1e-5)


def test_xla_paths_match_default_paths():
    # padded NMS for proposals and detections (what jit_compile=True selects) vs combined NMS.
    # The RoIAlign backends differ only in the border band (tests/layers/test_roi_align.py),
    # so the gather backend is fixed here.
    keras.utils.set_random_seed(3)
    model = tiny_model(score_threshold=0.0, roi_method="gather")
    images, _ = tiny_batch(batch=2, seed=3)
    model.build((None, 64, 64, 3))
    ref = model.detect(tf.constant(images))
    model.jit_compile = True  # read by the model to pick XLA-compatible ops; run eagerly here
    xla = model.detect(tf.constant(images))
    model.jit_compile = False
    np.testing.assert_array_equal(xla["num_detections"], ref["num_detections"])
    np.testing.assert_allclose(np.sort(xla["scores"].numpy(), 1), np.sort(ref["scores"].numpy(), 1), atol=1e-4)


def test_c4_variant_trains_and_predicts():
    keras.utils.set_random_seed(4)
    model = tiny_model(
        architecture="c4", feature_level=4, backbone=small_backbone(widths=(8, 16, 16, 16), blocks=(0, 0, 0, 0),
                                                                    levels=("C4",)),
        anchor_size=1.0, scales=(1.0, 2.0), roi_pooler="crop_pool", dropout=0.5,
    )
    assert model.feature_name == "C4" and model.roi_layer.output_size == 7
    images, labels = tiny_batch(batch=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(images, labels, epochs=3, verbose=0).history
    assert _finite(history)
    out = model.predict(images, verbose=0)
    assert out["boxes"].shape == (2, 20, 4)


@pytest.mark.parametrize("architecture", ["fpn", "c4"])
def test_keras_file_round_trip(architecture, tmp_path):
    keras.utils.set_random_seed(5)
    if architecture == "c4":
        model = tiny_model(
            architecture="c4", feature_level=4, anchor_size=1.0, scales=(1.0, 2.0), roi_pooler="crop_pool",
            dropout=0.5, score_threshold=0.0,
            backbone=small_backbone(widths=(8, 16, 16, 16), blocks=(0, 0, 0, 0), levels=("C4",)),
        )
    else:
        model = tiny_model(score_threshold=0.0)
    images, _ = tiny_batch(batch=2)
    loaded, _ = assert_keras_file_round_trip(model, images, tmp_path)  # built by predict alone
    assert loaded.architecture == architecture and loaded.roi_layer.name == model.roi_layer.name


@pytest.mark.parametrize("name", ["faster_rcnn_fpn", "faster_rcnn_c4"])
def test_weights_saved_before_the_parts_refactor_load_with_identical_outputs(name, tmp_path):
    """Legacy fixture (tests/fixtures/two_stage): same weight paths, .weights.h5 layout and
    parameter count; the old config and weights file (also as a .keras archive) give bitwise
    the old detections and losses."""
    assert_matches_fixture(name, tmp_path)
    assert_legacy_keras_file_loads(name, tmp_path)


def _tiny_parts():
    """The parts tiny_model() builds from its flat arguments, made by hand."""
    return dict(
        proposal_network=RegionProposalNetwork(
            min_level=2, max_level=6, anchor_size=4.0, channels=16, pre_nms_topk_train=200, post_nms_topk_train=100,
            pre_nms_topk_test=100, post_nms_topk_test=50, name="my_rpn"),
        roi_layer=RoIAlign(min_level=2, max_level=5, canonical_size=112.0, name="my_roi"),
        box_head=BoxHead(num_classes=3, fc_dim=32, name="my_head"),
    )


def test_parts_passed_in_equal_the_default_parts_and_round_trip(tmp_path):
    keras.utils.set_random_seed(6)
    default = tiny_model(score_threshold=0.0)
    default.build((None, 64, 64, 3))
    model = tiny_model(score_threshold=0.0, **_tiny_parts())
    model.build((None, 64, 64, 3))
    assert model.proposal_network.name == "my_rpn" and model.rpn_head is model.proposal_network.head
    assert model.count_params() == default.count_params()
    assert [v.shape for v in model.weights] == [v.shape for v in default.weights]
    model.set_weights(default.get_weights())
    images, _ = tiny_batch(batch=2)
    ref, out = default.detect(tf.constant(images)), model.detect(tf.constant(images))
    for key in ref:
        np.testing.assert_array_equal(out[key].numpy(), ref[key].numpy(), err_msg=key)
    config = model.get_config()
    assert {"proposal_network", "roi_layer", "box_head"} <= set(config)
    assert not {"proposal_network", "roi_layer", "box_head"} & set(default.get_config())  # as before parts
    flat = {k: v for k, v in config.items() if k not in ("proposal_network", "roi_layer", "box_head", "name")}
    assert flat == {k: v for k, v in default.get_config().items() if k != "name"}  # the flat view of the parts
    loaded, _ = assert_keras_file_round_trip(model, images, tmp_path)
    assert loaded.proposal_network.name == "my_rpn" and loaded.box_head.name == "my_head"


def test_a_proposal_network_part_sets_the_rpn_levels():
    parts = _tiny_parts()
    parts["proposal_network"] = RegionProposalNetwork(min_level=3, max_level=5, anchor_size=4.0, channels=16)
    parts["roi_layer"] = RoIAlign(min_level=3, max_level=4, canonical_size=112.0)
    model = tiny_model(**parts)
    assert (model.min_level, model.max_level, model.roi_min_level, model.roi_max_level) == (3, 5, 3, 4)
    assert model.fpn.max_level == 5 and model.get_config()["max_level"] == 5
    with pytest.raises(ValueError, match="feature_level=4"):
        tiny_model(architecture="c4", backbone=small_backbone(widths=(8, 16, 16, 16), blocks=(0, 0, 0, 0),
                                                              levels=("C4",)),
                   proposal_network=RegionProposalNetwork(min_level=3, max_level=3))
    with pytest.raises(ValueError, match="classes"):
        tiny_model(box_head=BoxHead(num_classes=5))


def vgg16_c4_head_params(num_classes):
    dense = lambda i, o: i * o + o
    return dense(7 * 7 * 512, 4096) + dense(4096, 4096) + dense(4096, num_classes + 1) + dense(4096, 4 * (num_classes + 1))


def test_vgg16_c4_builds_with_fc6_fc7_head():
    model = FasterRCNN(
        backbone=vgg16_backbone(output_layers=("block5_conv3",)), num_classes=20, architecture="c4",
        roi_pooler="crop_pool", fc_dim=4096, rpn_channels=512, scales=(1.0, 2.0, 4.0), dropout=0.5,
        rpn_post_nms_topk_test=10, rpn_pre_nms_topk_test=50,
    )
    model.build((None, 64, 64, 3))
    assert model.feature_name == "block5_conv3"
    assert model.box_head.count_params() == vgg16_c4_head_params(20)
    # RPN: 3x3 conv 512->512, 1x1 -> 9 objectness, 1x1 -> 36 deltas (3 scales x 3 ratios)
    assert model.rpn_head.count_params() == (9 * 512 * 512 + 512) + (512 * 9 + 9) + (512 * 36 + 36)


def faster_rcnn_fpn_param_count(num_classes, resnet_params, d=256, anchors=3, fc=1024):
    """The paper's layer list (§4.3, §4.4): ResNet + FPN P2-P5 (P6 parameter-free) + shared
    RPN head + 2fc head with a (K+1)-way classifier and class-specific boxes."""
    conv = lambda k, cin, cout: k * k * cin * cout + cout
    dense = lambda i, o: i * o + o
    fpn = sum(conv(1, c, d) for c in (256, 512, 1024, 2048)) + 4 * conv(3, d, d)
    rpn = conv(3, d, d) + conv(1, d, anchors) + conv(1, d, 4 * anchors)
    head = dense(7 * 7 * d, fc) + dense(fc, fc) + dense(fc, num_classes + 1) + dense(fc, 4 * (num_classes + 1))
    return resnet_params + fpn + rpn + head


def test_r50_fpn_parameter_count_matches_paper_layer_list():
    model = FasterRCNN(backbone=resnet_backbone(50), num_classes=80, rpn_pre_nms_topk_test=50,
                       rpn_post_nms_topk_test=10)
    model.build((None, 64, 64, 3))
    expected = faster_rcnn_fpn_param_count(80, resnet_params=23_587_712)  # keras.applications ResNet50 notop
    assert expected == 41_836_836
    assert model.count_params() == expected
    assert model.box_head.cls.units == 81 and model.box_head.box.units == 324


MIRRORED_SCRIPT = r'''
import sys, json
sys.path.insert(0, sys.argv[1])
from kerasdet.distribute import split_cpu
split_cpu(2)
import keras, numpy as np, tensorflow as tf
from model_testutils import tiny_batch
from test_faster_rcnn import tiny_model
keras.utils.set_random_seed(0)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
images, labels = tiny_batch(batch=4)
ds = tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(4, drop_remainder=True)
with strategy.scope():
    model = tiny_model()
    model.build((None, 64, 64, 3))
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
hist = model.fit(ds, steps_per_epoch=4, epochs=6, verbose=0).history
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "history": hist}))
'''


@pytest.mark.slow
def test_fit_under_mirrored_strategy_two_replicas(tmp_path):
    """Faster R-CNN trains by model.fit under MirroredStrategy (2 logical CPUs, its own process):
    all four losses finite and the total falling."""
    import json
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT)
    out = subprocess.run([sys.executable, str(script), here], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    hist = result["history"]
    assert result["replicas"] == 2
    for key in ("rpn_cls_loss", "rpn_box_loss", "cls_loss", "box_loss", "loss"):
        assert key in hist and np.all(np.isfinite(hist[key])), key
    assert hist["loss"][-1] < 0.8 * hist["loss"][0]
