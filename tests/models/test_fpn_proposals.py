"""FPN mask proposals (thesis §4.6): the paper configuration's size against a count from the
layer list, target assignment and mask targets on a hand-made example, the 14 / 28 mask
option, training on a tiny batch, pasting, saving and export with masks."""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.backbones import resnet_backbone, small_backbone
from kerasdet.models.fpn_proposals import FPNProposals


def conv(k, cin, cout):
    return k * k * cin * cout + cout


def dense(cin, cout):
    return cin * cout + cout


def fpn_proposals_param_count(resnet_params, d=128, hidden=512, mask=14, windows=(5, 7)):
    """§4.6's layer list: ResNet C2-C5 + FPN (1x1 laterals, 3x3 smoothing, P6 parameter-free)
    + one MLP per window size (k x k conv to ``hidden``, sibling fc layers to m^2 and 1)."""
    fpn = sum(conv(1, c, d) for c in (256, 512, 1024, 2048)) + 4 * conv(3, d, d)
    mlps = sum(conv(k, d, hidden) + dense(hidden, mask * mask) + dense(hidden, 1) for k in windows)
    return resnet_params + fpn + mlps


def test_paper_configuration_parameter_count():
    backbone = resnet_backbone(50)
    model = FPNProposals(backbone=backbone)
    model.build()
    expected = fpn_proposals_param_count(23_587_712)  # keras.applications ResNet50 notop
    assert expected == 29_722_890 and model.count_params() == expected
    double = FPNProposals(backbone=backbone, mask_size=28)  # Table 4.6 "+ 2x mask resolution"
    double.build()
    assert double.count_params() == fpn_proposals_param_count(23_587_712, mask=28) == 30_326_178
    assert model.levels == (2, 3, 4, 5, 6) and model.fpn.num_channels == 128
    np.testing.assert_allclose(model.kind_scales()[::2], [32, 64, 128, 256, 512])  # 5x5 MLP: 8x the stride
    np.testing.assert_allclose(model.kind_scales()[1::2], np.array([32, 64, 128, 256, 512]) * 2 ** 0.5)


def _model(**kwargs):
    backbone = small_backbone(widths=(8, 8, 16, 16), blocks=(0, 0, 0, 0), levels=("C2", "C3", "C4", "C5"))
    args = dict(backbone=backbone, max_level=5, fpn_channels=8, hidden=16, canonical_size=16.0, num_proposals=10,
                weight_decay=0.0)
    args.update(kwargs)
    model = FPNProposals(**args)
    model.build()
    return model


def _labels():
    """Image 0: a 32 px square object at (8, 8)-(40, 40) (scale index u = 2 log2(32/16) = 2:
    P3's 5x5 MLP); image 1: a 20.75 px object (u = 2 log2(20.75/16) = 0.75: P2's 7x7 MLP,
    ignored by P2's 5x5 MLP)."""
    boxes = np.zeros([2, 3, 4], np.float32)
    classes = -np.ones([2, 3], np.int32)
    masks = np.zeros([2, 3, 64, 64], np.uint8)
    boxes[0, 0] = (8, 8, 40, 40)
    classes[0, 0] = 4
    masks[0, 0, 8:40, 8:40] = 1
    side = 16 * 2 ** 0.375
    boxes[1, 1] = (30, 30, 30 + side, 30 + side)
    classes[1, 1] = 7
    masks[1, 1, 30:51, 30:51] = 1
    return {"boxes": tf.constant(boxes), "classes": tf.constant(classes), "masks": tf.constant(masks)}


def _cells(targets, key, image, kind, level):
    """The (row, col) cells of ``level`` whose window of ``kind`` is flagged ``key``."""
    w = targets["windows"]
    flag = targets[key][image].numpy() & (w["kind"].numpy() == kind)
    centers = w["centers"].numpy()[flag]
    return sorted(map(tuple, (centers / 2 ** level - 0.5).astype(int).tolist()))


def test_target_assignment_and_mask_targets_by_hand():
    model = _model()
    images = tf.zeros([2, 64, 64, 3])
    labels = _labels()
    targets = model.training_targets(images, labels)
    # windows: P2..P5 of a 64 px image (16, 8, 4, 2 cells a side) x 2 MLPs
    assert targets["positive"].shape == (2, 2 * (256 + 64 + 16 + 4))
    # image 0: centre (24, 24); P3 cell centres 4 + 8 i within 8 px: rows / cols 2, 3; kind 2 = (P3, 5x5)
    assert _cells(targets, "positive", 0, 2, 3) == [(2, 2), (2, 3), (3, 2), (3, 3)]
    assert int(tf.reduce_sum(tf.cast(targets["positive"][0], tf.int32))) == 4
    assert not np.any(~targets["positive"][0].numpy() & ~targets["negative"][0].numpy())  # u = 2: no ignores
    np.testing.assert_array_equal(targets["matched"][0].numpy()[targets["positive"][0].numpy()], 0)
    # image 1: centre 40.375; P2 cell centres 2 + 4 i within 4 px: 38, 42 (cells 9, 10)
    assert _cells(targets, "positive", 1, 1, 2) == [(9, 9), (9, 10), (10, 9), (10, 10)]
    ignored = ~targets["positive"][1].numpy() & ~targets["negative"][1].numpy()
    assert ignored.sum() == 4 and np.all(targets["windows"]["kind"].numpy()[ignored] == 0)  # |0.75 - 0| in (0.5, 1)
    np.testing.assert_array_equal(targets["matched"][1].numpy()[targets["positive"][1].numpy()], 1)
    # the mask target of P3 cell (2, 2) (kind 2, canonical 32 px): the region 1.25 x 32 = 40 px around (20, 20)
    w = targets["windows"]
    index = int(np.nonzero(targets["positive"][0].numpy())[0][0])
    np.testing.assert_allclose(w["regions"][index], [0, 0, 40, 40])
    mask = model.mask_targets(labels["masks"][:1], w["regions"][index][None, None], tf.zeros([1, 1], tf.int32))
    # samples at (i + 0.5) * 40 / 14 px: the object (pixels 8..39) from sample 3 on (8.57 px) to the end
    line = (np.arange(14) >= 3).astype(np.float32)
    np.testing.assert_array_equal(mask[0, 0].numpy(), np.outer(line, line))
    # a crowd object is matched by no window
    crowd = dict(labels, is_crowd=tf.constant([[True, False, False], [False, False, False]]))
    assert not np.any(model.training_targets(images, crowd)["positive"][0].numpy())


def test_shapes_and_the_2x_mask_resolution():
    for size in (14, 28):
        model = _model(mask_size=size)
        out = model.forward(tf.zeros([2, 64, 64, 3]))
        assert out["hidden"].shape == (2, 680, 16) and out["score_logits"].shape == (2, 680)
        kind = tf.constant([[0, 1, 7]])
        assert model.mask_logits(out["hidden"][:1, :3], kind).shape == (1, 3, size, size)
        det = model.detect(tf.zeros([2, 64, 64, 3]))
        assert det["masks"].shape == (2, 10, 64, 64) and det["boxes"].shape == (2, 10, 4)
    with pytest.raises(ValueError, match="class-agnostic"):
        _model(num_classes=3)
    single = _model(window_sizes=(5,))  # Table 4.6's single-MLP row: one kind per level
    assert single.num_kinds == 4 and single.forward(tf.zeros([1, 64, 64, 3]))["hidden"].shape == (1, 340, 16)


def test_loss_decreases_on_a_tiny_batch():
    keras.utils.set_random_seed(0)
    model = _model()
    rng = np.random.RandomState(0)
    images = rng.uniform(0, 60, size=(2, 64, 64, 3)).astype(np.float32)
    labels = _labels()
    images[0, 8:40, 8:40] = 250.0
    images[1, 30:51, 30:51] = 250.0
    images = tf.constant(images)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), run_eagerly=True)
    first = {k: float(v) for k, v in model.detection_losses(images, labels, training=False).items()}
    assert first["mask_loss"] > 0 and first["score_loss"] > 0
    ds = tf.data.Dataset.from_tensors((images, labels)).repeat()
    model.fit(ds, steps_per_epoch=10, epochs=1, verbose=0)
    last = {k: float(v) for k, v in model.detection_losses(images, labels, training=False).items()}
    # measured: mask 0.222 -> 0.147, score 0.588 -> 0.018
    assert last["mask_loss"] < 0.8 * first["mask_loss"] and last["score_loss"] < 0.5 * first["score_loss"]
    # the top proposal of each image lies on its object (measured IoU 0.64 / 0.55)
    from kerasdet.boxes import iou

    det = model.detect(images)
    overlap = iou(det["boxes"][:, :1], labels["boxes"]).numpy()[:, 0]
    assert overlap[0, 0] > 0.4 and overlap[1, 1] > 0.4


def test_masks_are_pasted_at_their_windows():
    model = _model(num_proposals=3)
    for head in (*model.score_heads, *model.mask_heads):
        head.kernel.assign(tf.zeros_like(head.kernel))
    for head in model.score_heads:
        head.bias.assign(tf.zeros_like(head.bias))
    for head in model.mask_heads:
        head.bias.assign(tf.fill(head.bias.shape, 10.0))  # every mask all object
    det = model.detect(tf.zeros([1, 64, 64, 3]))
    # equal scores: top_k keeps the lowest indices, P2's 5x5 windows at cells (0, 0), (0, 1), (0, 2);
    # regions 1.25 x 16 = 20 px around (2, 2 + 4 j): rows [-8, 12), cols [-8 + 4 j, 12 + 4 j)
    np.testing.assert_allclose(det["scores"][0], [0.5] * 3)
    for j in range(3):
        expected = np.zeros((64, 64), np.float32)
        expected[0:12, max(0, -8 + 4 * j):12 + 4 * j] = 1
        np.testing.assert_array_equal(det["masks"][0, j].numpy(), expected)
        np.testing.assert_array_equal(det["boxes"][0, j], [0, max(0, -8 + 4 * j), 12, 12 + 4 * j])
    assert det["num_detections"].numpy().tolist() == [3] and np.all(det["classes"].numpy() == 0)
    few = _model(num_proposals=700).detect(tf.zeros([1, 64, 64, 3]))  # 680 windows: 20 padded
    assert few["num_detections"].numpy().tolist() == [680] and np.all(few["classes"][0, 680:].numpy() == -1)


def test_save_and_load(tmp_path):
    model = _model(mask_size=28, window_sizes=(5,))
    images = tf.random.uniform([1, 64, 64, 3], 0, 255, seed=1)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_config() == model.get_config() and loaded.mask_size == 28 and loaded.window_sizes == (5,)
    np.testing.assert_array_equal(loaded.detect(images)["masks"], model.detect(images)["masks"])
