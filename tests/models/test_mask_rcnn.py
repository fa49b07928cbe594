"""Mask R-CNN (FasterRCNN with a mask_head part): training, mask pasting, config, export, parameter count."""
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.backbones import resnet_backbone
from kerasdet.layers.mask_head import MaskHead, mask_targets
from kerasdet.models.faster_rcnn import FasterRCNN
from model_testutils import assert_keras_file_round_trip, tiny_batch
from test_faster_rcnn import faster_rcnn_fpn_param_count, tiny_model


def tiny_mask_model(**kwargs):
    return tiny_model(mask_head=MaskHead(num_classes=3, num_convs=2, channels=16, roi_output_size=7,
                                         name="mask_head"), **kwargs)


def masked_batch(batch=4, seed=0):
    """tiny_batch with instance masks: each painted square without its top-left quarter (an
    L shape, so a mask differs from its box)."""
    images, labels = tiny_batch(batch=batch, seed=seed)
    masks = np.zeros((batch, 3, 64, 64), np.uint8)
    for b in range(batch):
        for j in range(3):
            if labels["classes"][b, j] < 0:
                continue
            y0, x0, y1, x1 = labels["boxes"][b, j].astype(int)
            masks[b, j, y0:y1, x0:x1] = 1
            masks[b, j, y0:(y0 + y1) // 2, x0:(x0 + x1) // 2] = 0
    return images, dict(labels, masks=masks)


def test_without_mask_head_nothing_changes():
    model = tiny_model()
    config = model.get_config()
    assert "mask_head" not in config and "mask_threshold" not in config
    assert model.mask_head is None and model.LOSS_NAMES == ("rpn_cls_loss", "rpn_box_loss", "cls_loss", "box_loss")
    model.build((None, 64, 64, 3))
    assert "masks" not in model.predict(tiny_batch(batch=1)[0], verbose=0)
    with pytest.raises(ValueError, match="mask_head has 2 classes"):
        tiny_model(mask_head=MaskHead(num_classes=2))


def test_fit_mask_loss_falls_and_empty_images_stay_finite():
    keras.utils.set_random_seed(0)
    model = tiny_mask_model()
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    images, labels = masked_batch()
    history = model.fit(images, labels, batch_size=4, epochs=20, verbose=0).history
    assert {"rpn_cls_loss", "rpn_box_loss", "cls_loss", "box_loss", "mask_loss", "weight_decay"} <= set(history)
    assert all(np.all(np.isfinite(v)) for v in history.values())
    assert history["mask_loss"][0] > 0.5  # ~log 2 at the N(0, 0.001) predictor
    # the sampled RoIs move as the RPN learns, so the mask loss is noisy: compare the last epochs' mean
    assert np.mean(history["mask_loss"][-5:]) < 0.9 * history["mask_loss"][0]
    assert history["loss"][-1] < 0.6 * history["loss"][0]
    empty = {"boxes": np.zeros((2, 3, 4), "float32"), "classes": np.full((2, 3), -1, "int32"),
             "masks": np.zeros((2, 3, 64, 64), np.uint8)}
    logs = model.test_on_batch(images[:2], empty, return_dict=True)
    assert all(np.isfinite(v) for v in logs.values()) and logs["mask_loss"] == 0.0
    with pytest.raises(ValueError, match="labels need 'masks'"):
        model.train_on_batch(images, {k: v for k, v in labels.items() if k != "masks"})


def test_pasted_masks_are_the_predicted_class_mask_inside_its_box():
    model = tiny_mask_model()
    model.build((None, 64, 64, 3))
    # the predictor says "object" everywhere for class 1, "background" for classes 0 and 2
    pred = model.mask_head.predictor
    pred.kernel.assign(np.zeros(pred.kernel.shape, np.float32))
    pred.bias.assign(np.array([-10.0, 10.0, -10.0], np.float32))
    images = tf.constant(tiny_batch(batch=1)[0])
    feats = model.features(images)
    boxes = tf.constant([[[10.0, 20.0, 30.0, 50.0], [5.3, 7.6, 40.2, 21.4], [10.0, 20.0, 30.0, 50.0],
                          [0.0, 0.0, 0.0, 0.0]]])
    classes = tf.constant([[1, 1, 0, -1]])
    masks = model.detection_masks(feats, boxes, classes, (64, 64)).numpy()
    assert masks.shape == (1, 4, 64, 64)
    centre = np.arange(64) + 0.5
    for i in range(2):
        y0, x0, y1, x1 = boxes.numpy()[0, i]
        inside = (((centre >= y0) & (centre < y1))[:, None] & ((centre >= x0) & (centre < x1))[None, :])
        np.testing.assert_array_equal(masks[0, i], inside.astype(np.float32))
    assert masks[0, 0, 10:30, 20:50].all() and masks[0, 0].sum() == 20 * 30
    assert not masks[0, 2].any()  # class 0's channel says background
    assert not masks[0, 3].any()  # padding row


def test_mask_branch_skips_trailing_padding_slots_only():
    """Outside XLA the mask branch runs on the slots up to the last real one of any image; a
    padding slot between real ones, and the skipped tail, come back as zero masks."""
    keras.utils.set_random_seed(3)
    model = tiny_mask_model()
    model.build((None, 64, 64, 3))
    model.mask_head.predictor.bias.assign(np.full((3,), 0.5, np.float32))
    images = tf.constant(tiny_batch(batch=2)[0])
    feats = model.features(images)
    boxes = tf.constant([[[10.0, 20.0, 30.0, 50.0], [0.0, 0.0, 0.0, 0.0], [5.3, 7.6, 40.2, 21.4], [0.0, 0.0, 0.0, 0.0],
                          [0.0, 0.0, 0.0, 0.0]],
                         [[8.0, 8.0, 40.0, 30.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0],
                          [0.0, 0.0, 0.0, 0.0]]])
    classes = tf.constant([[1, -1, 2, -1, -1], [0, -1, -1, -1, -1]])
    masks = model.detection_masks(feats, boxes, classes, (64, 64)).numpy()
    assert masks.shape == (2, 5, 64, 64)
    assert masks[0, 0].sum() > 0 and masks[0, 2].sum() > 0 and masks[1, 0].sum() > 0
    assert not masks[0, 1].any() and not masks[:, 3:].any() and not masks[1, 1:].any()
    # each real slot's mask is the one computed on that box alone
    for b, i in ((0, 0), (0, 2), (1, 0)):
        alone = model.detection_masks(feats, tf.tile(boxes[:, i:i + 1], [1, 1, 1]),
                                      tf.constant([[int(classes[b, i])]] * 2), (64, 64)).numpy()
        np.testing.assert_array_equal(masks[b, i], alone[b, 0])
    none = model.detection_masks(feats, boxes, tf.fill([2, 5], -1), (64, 64)).numpy()
    assert none.shape == (2, 5, 64, 64) and not none.any()


def test_predict_masks_match_detections_and_keras_file_round_trip(tmp_path):
    keras.utils.set_random_seed(2)
    model = tiny_mask_model(score_threshold=0.0)
    model.build((None, 64, 64, 3))
    # a mask head whose masks cover part of each box
    model.mask_head.predictor.bias.assign(np.full((3,), 0.5, np.float32))
    images, _ = tiny_batch(batch=2)
    _, out = assert_keras_file_round_trip(model, images, tmp_path)
    assert out["masks"].shape == (2, 20, 64, 64) and out["masks"].dtype == np.float32
    assert set(np.unique(out["masks"])) <= {0.0, 1.0}
    n = out["num_detections"]
    centre = np.arange(64) + 0.5
    for b in range(2):
        assert not out["masks"][b, n[b]:].any()
        for i in range(n[b]):
            y0, x0, y1, x1 = out["boxes"][b, i]
            ys, xs = np.nonzero(out["masks"][b, i])
            assert np.all((centre[ys] >= y0) & (centre[ys] < y1) & (centre[xs] >= x0) & (centre[xs] < x1))
    assert out["masks"].sum() > 0
    config = model.get_config()
    assert config["mask_head"]["class_name"] == "MaskHead" and config["mask_threshold"] == 0.5


def test_export_detection_masks_equal_predict_masks(tmp_path):
    from kerasdet.export import export_saved_model

    keras.utils.set_random_seed(3)
    model = tiny_mask_model(score_threshold=0.0)
    model.build((None, 64, 64, 3))
    model.mask_head.predictor.bias.assign(np.full((3,), 0.5, np.float32))
    images = np.round(tiny_batch(batch=2)[0]).astype(np.uint8)
    ref = model.predict(images.astype(np.float32), verbose=0)
    export_saved_model(model, str(tmp_path / "sm"), image_size=(64, 64))
    with open(str(tmp_path / "sm" / "kerasdet_export.json")) as f:
        meta = json.load(f)
    assert meta["has_masks"] is True and "detection_masks" in meta["signature"]["outputs"]
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    out = loaded.signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_array_equal(out["num_detections"].numpy(), ref["num_detections"])
    assert out["detection_masks"].shape == (2, 20, 64, 64) and ref["masks"].sum() > 0
    np.testing.assert_array_equal(out["detection_masks"].numpy(), ref["masks"])
    # a 128x128 input: masks come back at the input size
    big = tf.image.resize(images, (128, 128)).numpy().astype(np.uint8)
    assert loaded.signatures["serving_default"](images=tf.constant(big))["detection_masks"].shape[2:] == (128, 128)
    # the encoded-image and tf.Example signatures: a batch of differently sized images, each
    # image's masks in its top-left corner equal to the uint8 signature's for it alone
    import cv2

    from kerasdet.export import encode_example

    rng = np.random.RandomState(0)
    mixed = [rng.randint(0, 256, shape).astype(np.uint8) for shape in ((96, 80, 3), (50, 70, 3))]
    files = [cv2.imencode(".png", cv2.cvtColor(im, cv2.COLOR_RGB2BGR))[1].tobytes() for im in mixed]
    sigs = loaded.signatures
    enc = {k: v.numpy() for k, v in sigs["encoded_image"](image_bytes=tf.constant(files)).items()}
    exa = sigs["tf_example"](serialized_examples=tf.constant([encode_example(f) for f in files]))
    np.testing.assert_array_equal(exa["detection_masks"].numpy(), enc["detection_masks"])
    for i, image in enumerate(mixed):
        alone = sigs["serving_default"](images=tf.constant(image[None]))
        h, w = image.shape[:2]
        assert int(alone["num_detections"][0]) > 0 and alone["detection_masks"].numpy()[0].any()
        np.testing.assert_array_equal(enc["detection_masks"][i, :, :h, :w], alone["detection_masks"].numpy()[0])
        assert not enc["detection_masks"][i, :, h:].any() and not enc["detection_masks"][i, :, :, w:].any()


def mask_rcnn_fpn_param_count(num_classes, resnet_params, d=256):
    """Faster R-CNN R50-FPN's layer list plus the Mask R-CNN FPN mask head (Fig. 4 right):
    four 3x3 convs d, a 2x2 deconv d and a 1x1 conv to K masks."""
    conv = lambda k, cin, cout: k * k * cin * cout + cout
    mask = 4 * conv(3, d, d) + conv(2, d, d) + conv(1, d, num_classes)
    return faster_rcnn_fpn_param_count(num_classes, resnet_params) + mask


def test_r50_fpn_mask_rcnn_parameter_count_matches_paper_layer_list():
    model = FasterRCNN(backbone=resnet_backbone(50), num_classes=80, mask_head=MaskHead(num_classes=80),
                       rpn_pre_nms_topk_test=50, rpn_post_nms_topk_test=10, max_detections=5)
    model.build((None, 64, 64, 3))
    expected = mask_rcnn_fpn_param_count(80, resnet_params=23_587_712)
    assert expected == 41_836_836 + 4 * (3 * 3 * 256 * 256 + 256) + (2 * 2 * 256 * 256 + 256) + (256 * 80 + 80)
    assert expected == 44_480_116
    assert model.count_params() == expected
    assert model.mask_head.count_params() == expected - 41_836_836


def test_class_agnostic_mask_head_trains_and_predicts():
    keras.utils.set_random_seed(5)
    model = tiny_model(mask_head=MaskHead(num_classes=3, num_convs=1, channels=4, class_agnostic=True,
                                          roi_output_size=7), score_threshold=0.0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    images, labels = masked_batch(batch=2)
    logs = model.train_on_batch(images, labels, return_dict=True)
    assert np.isfinite(logs["mask_loss"]) and logs["mask_loss"] > 0
    out = model.predict(images, verbose=0)
    assert out["masks"].shape == (2, 20, 64, 64) and model.mask_head.predictor.filters == 1


def test_xla_compiled_masks_and_targets_equal_the_graph_ones():
    """jit_compile=True: the mask targets and pastes use the matmul resampling (no
    crop_and_resize kernel in XLA) and the mask RoIAlign its gather form. On the same boxes
    the XLA-compiled masks and mask targets are the graph ones. (A whole XLA train step
    compiles for minutes on 2 cores: checked by hand, not here.)"""
    keras.utils.set_random_seed(4)
    model = tiny_mask_model(score_threshold=0.0)
    model.build((None, 64, 64, 3))
    model.mask_head.predictor.bias.assign(np.full((3,), 0.5, np.float32))
    images, labels = masked_batch(batch=2)
    boxes = tf.constant([[[10.0, 20.0, 30.0, 50.0], [5.3, 7.6, 40.2, 21.4], [0.0, 0.0, 0.0, 0.0]],
                         [[8.0, 8.0, 40.0, 30.0], [30.5, 2.0, 63.0, 20.7], [0.0, 0.0, 0.0, 0.0]]])
    classes = tf.constant([[1, 2, -1], [0, 1, -1]])
    feats = model.features(tf.constant(images))
    ref = model.detection_masks(feats, boxes, classes, (64, 64)).numpy()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=True)
    assert model._mask_resampling() == "matmul"
    xla = tf.function(lambda f, b, c: model.detection_masks(f, b, c, (64, 64)), jit_compile=True)
    got = xla(feats, boxes, classes).numpy()
    assert got.shape == ref.shape == (2, 3, 64, 64) and ref.sum() > 0
    assert np.mean(got != ref) < 1e-3  # pixels at the 0.5 threshold may flip (RoIAlign forms differ ~1e-6)
    # the training targets, XLA-compiled, equal the crop_and_resize ones
    matched = tf.constant([[0, 1, 2], [2, 0, 1]])
    want = mask_targets(labels["masks"], boxes, matched, size=14).numpy()
    have = tf.function(lambda m, b, i: mask_targets(m, b, i, size=14, backend=model._mask_resampling()),
                       jit_compile=True)(labels["masks"], boxes, matched).numpy()
    assert want.sum() > 0 and np.mean(have != want) < 1e-3


MIRRORED_SCRIPT = r'''
import sys, json
sys.path.insert(0, sys.argv[1])
from kerasdet.distribute import split_cpu
split_cpu(2)
import keras, numpy as np, tensorflow as tf
from test_mask_rcnn import masked_batch, tiny_mask_model
keras.utils.set_random_seed(0)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
images, labels = masked_batch(batch=4)
ds = tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(4, drop_remainder=True)
with strategy.scope():
    model = tiny_mask_model()
    model.build((None, 64, 64, 3))
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
hist = model.fit(ds, steps_per_epoch=4, epochs=4, verbose=0).history
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "history": hist}))
'''


@pytest.mark.slow
def test_fit_under_mirrored_strategy_two_replicas(tmp_path):
    """Mask R-CNN trains by model.fit under MirroredStrategy (2 logical CPUs, its own
    process): every loss, mask_loss included, finite; the total falling."""
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
    for key in ("rpn_cls_loss", "rpn_box_loss", "cls_loss", "box_loss", "mask_loss", "loss"):
        assert key in hist and np.all(np.isfinite(hist[key])), key
    assert hist["loss"][-1] < 0.8 * hist["loss"][0]
