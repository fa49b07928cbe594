"""kerasdet.models.decompnet: targets grouped by category, the three training stages by
model.fit (which parts train, losses fall), detection without NMS, the stop rule, an
absent category's maps black after training, config and SavedModel round trips."""
import json

import numpy as np
import pytest
import tensorflow as tf

import keras

from kerasdet.callbacks import DecompositionWarmup
from kerasdet.models.decompnet import DecompNet
from model_testutils import assert_keras_file_round_trip

TINY = dict(num_classes=3, image_size=(40, 40), steps=4, max_instances=3, units=32, instance_filters=8,
            category_widths=(8, 8, 8, 8, 8, 8), box_hidden=16, weight_decay=0.0)


def _data(n=16, seed=0, absent=2):
    """Bright squares: class 0 intensity 255, class 1 intensity 128; ``absent`` never appears."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 40, 40, 3), np.float32)
    boxes = np.zeros((n, 4, 4), np.float32)
    classes = -np.ones((n, 4), np.int32)
    masks = np.zeros((n, 4, 40, 40), np.uint8)
    present = [c for c in range(3) if c != absent]
    for i in range(n):
        for j, (y, x) in enumerate([(2, 2), (22, 22)][: rng.integers(1, 3)]):
            c = present[rng.integers(len(present))]
            y, x = y + rng.integers(0, 6), x + rng.integers(0, 6)
            boxes[i, j] = [y, x, y + 12, x + 12]
            classes[i, j] = c
            masks[i, j, y:y + 12, x:x + 12] = 1
            images[i, y:y + 12, x:x + 12] = 255.0 if c == 0 else 128.0
    return images, {"boxes": boxes, "classes": classes, "masks": masks}


def test_instance_targets_group_by_category_in_label_order():
    model = DecompNet(**TINY)
    images, labels = _data(2)
    labels["classes"][0, :3] = [1, 0, 1]
    labels["masks"][0, 2] = 0
    labels["masks"][0, 2, :20, :20] = 1
    masks, valid, boxes = model.instance_targets(labels)
    assert masks.shape == (2, 3, 3, 20, 20)
    np.testing.assert_array_equal(valid.numpy()[0], [[True, False, False], [True, True, False], [False] * 3])
    # class 1's second instance is label row 2: a 20x20 mask -> 10x10 at map resolution
    assert float(tf.reduce_sum(masks[0, 1, 1])) == 100.0
    np.testing.assert_allclose(boxes.numpy()[0, 0, 0], [(labels["boxes"][0, 1, 1] + 12 / 2) / 40,
                                                         (labels["boxes"][0, 1, 0] + 12 / 2) / 40, 0.3, 0.3])


def test_box_targets_rasterize_filled_boxes():
    model = DecompNet(**dict(TINY, target="boxes"))
    _, labels = _data(1)
    labels.pop("masks")
    masks, valid, _ = model.instance_targets(labels)
    assert float(tf.reduce_sum(masks)) == 36.0 * float(tf.reduce_sum(tf.cast(valid, tf.float32)))


def test_stages_freeze_the_right_parts():
    model = DecompNet(**TINY)
    model.build((None, 40, 40, 3))
    model.set_stage("instance")
    assert not model.category_net.trainable and model.decomposer.trainable
    model.set_stage("box")
    box_ids = {id(v) for v in model.box_regressor.trainable_variables}
    assert box_ids and {id(v) for v in model.trainable_variables} == box_ids
    with pytest.raises(ValueError, match="stage"):
        model.set_stage("bogus")


@pytest.mark.slow
def test_staged_training_losses_fall_and_absent_category_maps_are_black():
    keras.utils.set_random_seed(0)
    images, labels = _data(32)
    # p = lam = gamma = 0.3 throughout (the paper's start value; 1.0 from the start gives the
    # trivial all-dark solution it warns of), so first and last epochs compare; batch 4
    # gives enough steps (360) for the BN moving statistics used at inference to settle
    model = DecompNet(**dict(TINY, instance_activation="relu", p=0.3, lam=0.3, gamma=0.3))
    model.build((None, 40, 40, 3))
    first_last = {}
    for stage, epochs, lr in (("category", 15, 3e-3), ("instance", 25, 2e-3), ("joint", 5, 5e-4)):
        model.set_stage(stage)
        model.compile(optimizer=keras.optimizers.Adam(lr))
        hist = model.fit(images, labels, batch_size=4, epochs=epochs, verbose=0).history
        first_last[stage] = (hist["loss"][0], hist["loss"][-1])
    for stage, (first, last) in first_last.items():
        assert last < first, (stage, first_last)
    _, maps = model(images, training=False)
    peaks = tf.reduce_max(maps, axis=[-2, -1]).numpy()  # [B, C, T]
    assert peaks[:, 2].max() < model.stop_threshold  # class 2 never appears: all black
    assert peaks[:, :2, 0].mean() > model.stop_threshold  # present classes are not
    out = model.predict(images, verbose=0)
    assert (out["classes"] != 2).all()


def test_warmup_callback_sets_p_lam_gamma():
    model = DecompNet(**dict(TINY, p=0.0, lam=0.0, gamma=0.0))
    warm = DecompositionWarmup(start=0.3, end=1.0, epochs=1)
    warm.set_model(model)
    warm.on_epoch_begin(0)
    assert [round(float(v.numpy()), 6) for v in (model.p, model.lam, model.gamma)] == [0.3] * 3
    warm.on_epoch_begin(1)
    assert [float(v.numpy()) for v in (model.p, model.lam, model.gamma)] == [1.0] * 3


def test_detect_shapes_no_nms_and_stop_rule():
    model = DecompNet(**TINY)
    images, _ = _data(2)
    out = model.predict(images, verbose=0)
    k = 3 * 4
    assert out["boxes"].shape == (2, k, 4) and out["masks"].shape == (2, k, 40, 40)
    assert out["scores"].shape == (2, k) and out["mask_scores"].shape == (2, k)
    counts = model.count_instances(images).numpy()
    np.testing.assert_array_equal(out["num_detections"], counts.sum(1))
    for b in range(2):
        n = out["num_detections"][b]
        assert (out["classes"][b, n:] == -1).all() and (np.diff(out["scores"][b, :n]) <= 1e-6).all()

    # stop rule by hand: peaks [0.9, 0.2, 0.8, 0.0] -> first_black keeps 1 step, bright 2, none 3
    maps = np.zeros((1, 3, 4, 20, 20), np.float32)
    for t, v in enumerate([0.9, 0.2, 0.8, 0.0]):
        maps[0, 0, t, 5, 5] = v
    model.call = lambda images, training=None: (None, tf.constant(maps))
    assert model.count_instances(images[:1]).numpy().tolist() == [[1, 0, 0]]
    model.stop = "bright"
    assert model.count_instances(images[:1]).numpy().tolist() == [[2, 0, 0]]
    model.stop = "none"
    assert model.count_instances(images[:1]).numpy().tolist() == [[3, 0, 0]]


def test_changing_the_stop_rule_after_predict_takes_effect():
    # predict traces detect once; the stop rule and threshold are read at trace time, so
    # setting them must drop the traced function (a stale rule would silently keep counting)
    model = DecompNet(**TINY)
    images, _ = _data(1)
    maps = np.zeros((1, 3, 4, 20, 20), np.float32)
    for t, v in enumerate([0.9, 0.2, 0.8, 0.0]):
        maps[0, 1, t, 5, 5] = v
    model.call = lambda images, training=None: (None, tf.constant(maps))
    assert model.predict(images, verbose=0)["num_detections"].tolist() == [1]
    model.stop = "bright"
    assert model.predict(images, verbose=0)["num_detections"].tolist() == [2]
    model.stop_threshold = 0.1
    assert model.predict(images, verbose=0)["num_detections"].tolist() == [3]
    assert model.get_config()["stop"] == "bright" and model.get_config()["stop_threshold"] == 0.1
    with pytest.raises(ValueError, match="stop must be one of"):
        model.stop = "last_black"


def test_config_round_trip_and_export_with_masks(tmp_path):
    from kerasdet.export import export_saved_model

    model = DecompNet(**dict(TINY, stop="none", stop_threshold=0.0))
    model.build((None, 40, 40, 3))
    clone = DecompNet.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    images, _ = _data(2)
    ref = model.predict(images, verbose=0)
    export_saved_model(model, str(tmp_path / "sm"), image_size=(40, 40), category_ids=[4, 7, 10])
    with open(str(tmp_path / "sm" / "kerasdet_export.json")) as f:
        meta = json.load(f)
    assert meta["has_masks"] is True and meta["max_detections"] == 12 and meta["class_name"] == "DecompNet"
    assert {"detection_masks", "detection_mask_scores"} <= set(meta["signature"]["outputs"])
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    out = loaded.signatures["serving_default"](images=tf.constant(images.astype(np.uint8)))
    assert out["detection_masks"].shape == (2, 12, 40, 40)
    np.testing.assert_array_equal(out["num_detections"].numpy(), ref["num_detections"])
    np.testing.assert_array_equal(out["detection_masks"].numpy(), ref["masks"])
    ids = out["detection_classes"].numpy()
    np.testing.assert_array_equal(ids, np.where(ref["classes"] >= 0, np.array([4, 7, 10])[np.maximum(ref["classes"], 0)], -1))
    # an 80x80 input: masks come back at the input size
    big = tf.image.resize(images, (80, 80)).numpy().astype(np.uint8)
    assert loaded.signatures["serving_default"](images=tf.constant(big))["detection_masks"].shape[2:] == (80, 80)


def test_keras_file_round_trip_keeps_stage_stop_rule_and_loss_weights(tmp_path):
    keras.utils.set_random_seed(8)
    model = DecompNet(**TINY)
    model.build((None, 40, 40, 3))
    model.set_stage("box")
    model.stop = "bright"
    model.stop_threshold = 0.0  # every map is emitted (the untrained maps are dim)
    for var, value in ((model.p, 1.0), (model.lam, 0.7), (model.gamma, 0.9)):  # the warm-up's variables
        var.assign(value)
    images, _ = _data(2)
    loaded, _ = assert_keras_file_round_trip(model, images, tmp_path)
    assert loaded.stage == "box" and loaded.stop == "bright" and loaded.stop_threshold == 0.0
    assert not loaded.category_net.trainable and not loaded.decomposer.trainable and loaded.box_regressor.trainable
    assert [float(v.numpy()) for v in (loaded.p, loaded.lam, loaded.gamma)] == [1.0, np.float32(0.7),
                                                                                 np.float32(0.9)]


def test_box_source_maps_gives_the_maps_tight_boxes_and_switches_on_the_same_weights():
    model = DecompNet(**TINY)
    images, _ = _data(1)
    maps = np.zeros((1, 3, 4, 20, 20), np.float32)
    maps[0, 0, 0, 4:8, 10:16] = 0.9  # rows 4-7, cols 10-15 of the 20x20 map = 40x40 px / 2
    model.call = lambda images, training=None: (None, tf.constant(maps))
    regressed = model.predict(images, verbose=0)["boxes"][0, 0]
    model.box_source = "maps"
    out = model.predict(images, verbose=0)
    np.testing.assert_allclose(out["boxes"][0, 0], [8, 20, 16, 32], atol=1e-4)  # yxyx input pixels
    assert not np.allclose(regressed, out["boxes"][0, 0])
    assert out["scores"][0, 0] == pytest.approx(0.9)  # Eq. 5 on the tight box: the map's mean there
    assert model.get_config()["box_source"] == "maps"
    with pytest.raises(ValueError, match="box_source"):
        model.box_source = "nms"


def test_ordered_loss_trains_through_fit():
    """order='ordered' through fit: the instance stage's loss (ordered matching + black later
    steps; exact values in tests/test_decomposition_loss.py) falls; the option round-trips."""
    keras.utils.set_random_seed(0)
    images, labels = _data(16)
    model = DecompNet(**TINY, order="ordered", stage="instance", cell="conv_gru", conv_gru_filters=8)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    hist = model.fit(images, labels, batch_size=8, epochs=6, verbose=0).history
    assert hist["instance"][-1] < hist["instance"][0]
    assert DecompNet.from_config(model.get_config()).order == "ordered"
