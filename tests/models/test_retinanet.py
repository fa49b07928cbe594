import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.backbones import resnet_backbone, small_backbone
from kerasdet.models.retinanet import RetinaNet
from model_testutils import assert_keras_file_round_trip, tiny_batch


def tiny_model(**kwargs):
    args = dict(
        backbone=small_backbone(widths=(8, 16, 16, 16), blocks=(0, 0, 0, 0)),
        num_classes=3,
        min_level=3,
        max_level=5,
        fpn_channels=16,
        head_convs=1,
        head_channels=16,
        anchor_size=2.0,
        aspect_ratios=(1.0,),
        scales=(1.0, 1.5),
    )
    args.update(kwargs)
    return RetinaNet(**args)


def test_fit_loss_decreases_and_empty_images_stay_finite():
    keras.utils.set_random_seed(0)
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    images, labels = tiny_batch()
    history = model.fit(images, labels, batch_size=4, epochs=25, verbose=0)
    loss = history.history["loss"]
    assert np.all(np.isfinite(loss))
    assert loss[-1] < 0.5 * loss[0]
    assert {"cls_loss", "box_loss", "weight_decay"} <= set(history.history)
    # a batch with no objects at all: finite loss (normalizer is max(1, #pos))
    empty = {"boxes": np.zeros((2, 3, 4), "float32"), "classes": np.full((2, 3), -1, "int32")}
    logs = model.test_on_batch(images[:2], empty, return_dict=True)
    assert np.isfinite(logs["loss"]) and logs["box_loss"] == 0.0


def test_run_eagerly_with_numpy_batches_matches_graph_mode():
    # Keras hands numpy arrays to train_step under run_eagerly=True; the non-finite guard
    # must accept them, and one eager step must equal one compiled step.
    images, labels = tiny_batch()
    logs = []
    for eager in (True, False):
        keras.utils.set_random_seed(0)
        model = tiny_model()
        model.compile(optimizer=keras.optimizers.SGD(1e-2), run_eagerly=eager)
        logs.append(model.train_on_batch(images, labels, return_dict=True))
        assert model.nonfinite_steps == 0
    np.testing.assert_allclose(logs[0]["loss"], logs[1]["loss"], rtol=1e-5)


def test_loss_normalized_by_positive_count():
    keras.utils.set_random_seed(0)
    model = tiny_model(weight_decay=0.0)
    images, labels = tiny_batch(batch=2)
    outputs = model(images)
    anchors = tf.concat(model.forward(images)[2], axis=0)
    cls_t, box_t, match = model.compute_targets(anchors, labels)
    num_pos = float(tf.reduce_sum(tf.cast(match == 1, tf.float32)))
    assert num_pos > 0
    # hand computation of the focal sum / num_pos with numpy
    logits = outputs["class_logits"].numpy().astype("float64")
    onehot = np.eye(4)[np.where(cls_t.numpy() < 0, 3, cls_t.numpy())][..., :3]
    onehot[cls_t.numpy() == 3] = 0
    p = 1 / (1 + np.exp(-logits))
    pt = onehot * p + (1 - onehot) * (1 - p)
    at = onehot * 0.25 + (1 - onehot) * 0.75
    fl = -at * (1 - pt) ** 2 * np.log(pt)
    fl[match.numpy() < 0] = 0
    losses = model.losses_from_outputs(outputs["class_logits"], outputs["box_deltas"], anchors, labels)
    np.testing.assert_allclose(float(losses["cls_loss"]), fl.sum() / num_pos, rtol=1e-4)
    # ignoring the anchor normalizer would differ by orders of magnitude
    assert abs(float(losses["cls_loss"]) - fl.mean()) > 0.1 * fl.mean()


def test_crowd_boxes_are_not_targets():
    model = tiny_model()
    images = np.zeros((1, 64, 64, 3), "float32")
    labels = {
        "boxes": np.array([[[0, 0, 32, 32], [40, 40, 60, 60]]], "float32"),
        "classes": np.array([[2, 0]], "int32"),
        "is_crowd": np.array([[True, False]]),
    }
    anchors = tf.concat(model.forward(images)[2], axis=0)
    cls_t, _, match = model.compute_targets(anchors, labels)
    cls_t, match = cls_t.numpy()[0], match.numpy()[0]
    assert set(cls_t[match == 1].tolist()) == {0}  # only the real object is a target
    inside_crowd = (anchors[:, 0] >= 0) & (anchors[:, 2] <= 32) & (anchors[:, 1] >= 0) & (anchors[:, 3] <= 32)
    assert np.all(match[inside_crowd.numpy()] == -1)  # ignored, not taught as background
    without = model.compute_targets(anchors, dict(labels, is_crowd=np.array([[False, False]])))
    assert 2 in set(without[0].numpy()[0][without[2].numpy()[0] == 1].tolist())


def test_predict_outputs_and_xla_postprocess_agree():
    keras.utils.set_random_seed(1)
    model = tiny_model(prior_probability=0.2)
    images, _ = tiny_batch(batch=2)
    out = model.predict(images, batch_size=2, verbose=0)
    assert out["boxes"].shape == (2, 100, 4) and out["classes"].dtype == np.int32
    n = out["num_detections"]
    assert np.all(n > 0)
    assert np.all(out["boxes"] >= 0) and np.all(out["boxes"] <= 64)
    padded = model.detect(images, postprocessor=model.postprocess_xla)
    np.testing.assert_array_equal(padded["num_detections"], n)
    np.testing.assert_allclose(np.sort(padded["scores"].numpy(), 1), np.sort(out["scores"], 1), atol=1e-5)


def test_keras_file_round_trip_after_training(tmp_path):
    keras.utils.set_random_seed(0)
    model = tiny_model(prior_probability=0.2)
    images, labels = tiny_batch(batch=2)
    model.compile(optimizer=keras.optimizers.SGD(1e-2))
    model.train_on_batch(images, labels)
    loaded, _ = assert_keras_file_round_trip(model, images, tmp_path)
    np.testing.assert_allclose(loaded(images)["class_logits"], model(images)["class_logits"], rtol=0, atol=1e-6)


def resnet_param_count(blocks):
    """ResNet (keras.applications v1 layout: conv biases, BN with 4 params/channel)."""
    conv = lambda k, cin, cout: k * k * cin * cout + cout
    bn = lambda c: 4 * c
    total = conv(7, 3, 64) + bn(64)
    cin = 64
    for mid, n in zip((64, 128, 256, 512), blocks):
        out = 4 * mid
        for i in range(n):
            if i == 0:
                total += conv(1, cin, out) + bn(out)
            total += conv(1, cin, mid) + bn(mid) + conv(3, mid, mid) + bn(mid) + conv(1, mid, out) + bn(out)
            cin = out
    return total


def retinanet_param_count(num_classes, blocks=(3, 4, 6, 3), d=256, anchors=9):
    """The paper's layer list (§4.3, §5.4): ResNet + FPN P3-P7 + two 4-conv subnets."""
    conv = lambda k, cin, cout: k * k * cin * cout + cout
    fpn = conv(1, 512, d) + conv(1, 1024, d) + conv(1, 2048, d)  # laterals on C3..C5
    fpn += 3 * conv(3, d, d)  # smoothing P3..P5
    fpn += conv(3, 2048, d) + conv(3, d, d)  # P6 on C5, P7 on ReLU(P6)
    head = 2 * 4 * conv(3, d, d) + conv(3, d, num_classes * anchors) + conv(3, d, 4 * anchors)
    return resnet_param_count(blocks) + fpn + head


@pytest.mark.parametrize("depth,blocks,total", [(50, (3, 4, 6, 3), 38_048_372), (101, (3, 4, 23, 3), 57_118_836)])
def test_resnet_fpn_parameter_count_matches_paper_layer_list(depth, blocks, total):
    model = RetinaNet(backbone=resnet_backbone(depth), num_classes=80)
    model(np.zeros((1, 128, 128, 3), "float32"))
    expected = retinanet_param_count(80, blocks)
    # keras.applications ResNet50/101(include_top=False) counts
    assert resnet_param_count(blocks) == {50: 23_587_712, 101: 42_658_176}[depth]
    assert expected == total
    assert model.count_params() == expected
    print(f"RetinaNet R{depth}-FPN, 80 classes: {model.count_params():,} parameters")
