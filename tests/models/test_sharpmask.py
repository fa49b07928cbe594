"""DeepMask head C / SharpMask: the paper configuration's size against a count by hand,
shapes and crops, the loss against a hand computation, the two stages' frozen parts,
training, saving."""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.backbones import resnet_backbone, small_backbone
from kerasdet.models.sharpmask import (RESNET_TRUNK_LAYERS, SharpMask, small_trunk_layers,
                                       truncated_backbone)


def conv(k, cin, cout, bias=True):
    return k * k * cin * cout + (cout if bias else 0)


def bn(c):
    return 4 * c  # gamma, beta, moving mean, moving variance


def resnet50_to_conv4():
    """keras.applications ResNet-50 (v1, convs with biases) through conv4_block6, by hand."""
    total = conv(7, 3, 64) + bn(64)
    cin = 64
    for filters, blocks in ((64, 3), (128, 4), (256, 6)):
        for i in range(blocks):
            if i == 0:
                total += conv(1, cin, 4 * filters) + bn(4 * filters)
            total += conv(1, cin, filters) + bn(filters) + conv(3, filters, filters) + bn(filters)
            total += conv(1, filters, 4 * filters) + bn(4 * filters)
            cin = 4 * filters
    return total


def test_paper_configuration_sizes():
    trunk = truncated_backbone(resnet_backbone(50), RESNET_TRUNK_LAYERS)
    model = SharpMask(backbone=trunk)
    model.build()
    trunk_params = resnet50_to_conv4()
    assert trunk_params == 8_589_184 and trunk.count_params() == trunk_params
    head_c = conv(1, 1024, 128) + conv(10, 128, 512) + conv(1, 512, 56 * 56) + conv(1, 512, 1024) + conv(1, 1024, 1)
    refinement = conv(1, 512, 32 * 10 * 10) + conv(3, 2, 1)
    for (kf, km, ks, km_next) in ((1024, 32, 32, 16), (512, 16, 16, 8), (256, 8, 8, 4), (64, 4, 4, 2)):
        refinement += conv(3, kf, 64) + conv(3, 64, ks) + conv(3, km + ks, km_next)
    assert model.count_params() == trunk_params + head_c + refinement
    deepmask = trunk_params + head_c
    assert 16.5e6 < deepmask < 17.5e6  # "~17M" (thesis §3.5.1)
    assert refinement < 3e6  # "fewer than 3M additional parameters" (§3.5.3)
    assert (deepmask, refinement) == (17_409_601, 2_757_821)
    out = model.forward(tf.zeros([1, 192, 192, 3]), refine=True)
    assert out["mask_logits"].shape == (1, 56, 56) and out["refined_logits"].shape == (1, 160, 160)


def _small_model(**kwargs):
    widths, blocks = (8, 8, 16, 16), (1, 1, 1, 1)
    backbone = small_backbone(widths=widths, blocks=blocks, levels=("C4",))
    args = dict(backbone=truncated_backbone(backbone, small_trunk_layers(blocks)), patch_size=32, context=32,
                features=8, embedding=16, mask_size=8, score_hidden=16, k=16, skip_hidden=8, weight_decay=0.0)
    args.update(kwargs)
    model = SharpMask(**args)
    model.build()
    return model


def _patches(n=4, seed=0):
    rng = np.random.RandomState(seed)
    patches = rng.uniform(0, 255, size=(n, 64, 64, 3)).astype("float32")
    masks = np.zeros((n, 32, 32), np.float32)
    masks[:, 8:24, 10:22] = 1
    masks[n // 2:] = 0
    patches[: n // 2, 16 + 8:16 + 24, 16 + 10:16 + 22] = 255.0  # bright object at the mask
    score = np.array([1.0] * (n // 2) + [-1.0] * (n - n // 2 - 1) + [0.0], np.float32)
    return tf.constant(patches), {"score": tf.constant(score), "masks": tf.constant(masks)}


def test_trunk_crops_and_shapes():
    model = _small_model()
    feats = model.trunk(tf.zeros([2, 64, 64, 3]))
    # 16 px of context per side: 1 cell at stride 16, ... 8 cells at stride 2
    assert {k: tuple(v.shape[1:3]) for k, v in feats.items()} == {"C4": (2, 2), "C3": (4, 4), "C2": (8, 8),
                                                                   "C1": (16, 16)}
    out = model.forward(tf.zeros([2, 64, 64, 3]), refine=True)
    assert out["score_logits"].shape == (2,) and out["mask_logits"].shape == (2, 8, 8)
    assert out["refined_logits"].shape == (2, 32, 32)
    det = model.predict_step(tf.zeros([2, 64, 64, 3]))
    assert det["masks"].shape == (2, 32, 32) and det["scores"].shape == (2,)
    with pytest.raises(ValueError, match="context"):
        _small_model(context=16)


def test_loss_matches_hand_computation():
    model = _small_model()
    patches, labels = _patches()
    out = model.forward(patches, training=False)
    losses = model.detection_losses(patches, labels, training=False)
    f = tf.image.resize(out["mask_logits"][..., None], [32, 32], method="bilinear")[..., 0].numpy()
    m = 2 * labels["masks"].numpy() - 1
    y = labels["score"].numpy()
    s = out["score_logits"].numpy()
    per_patch = np.log1p(np.exp(-m * f)).mean(axis=(1, 2))
    n = (y != 0).sum()
    np.testing.assert_allclose(losses["mask_loss"], ((1 + y) / 2 * per_patch * (y != 0)).sum() / n, rtol=1e-5)
    np.testing.assert_allclose(losses["score_loss"], (np.log1p(np.exp(-y * s)) * (y != 0)).sum() / 32 / n,
                               rtol=1e-5)
    model.set_stage("refine")
    refined = model.forward(patches)["refined_logits"].numpy()
    expected = (np.log1p(np.exp(-m * refined)).mean(axis=(1, 2)) * (y > 0)).sum() / n
    np.testing.assert_allclose(model.detection_losses(patches, labels, training=False)["mask_loss"], expected,
                               rtol=1e-5)


def test_two_stages_train_their_own_parts():
    keras.utils.set_random_seed(0)
    model = _small_model()
    patches, labels = _patches(8)
    ds = tf.data.Dataset.from_tensors((patches, labels)).repeat()
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    first = model.evaluate(patches, labels, verbose=0, return_dict=True)["loss"]
    model.fit(ds, steps_per_epoch=15, epochs=1, verbose=0)
    assert model.evaluate(patches, labels, verbose=0, return_dict=True)["loss"] < 0.8 * first
    refine_names = {v.path for layer in model.refine_layers for v in layer.weights}
    assert not refine_names & {v.path for v in model.trainable_variables}

    model.set_stage("refine")
    assert {v.path for v in model.trainable_variables} == refine_names
    fixed = model.backbone.weights + [v for layer in model.head_layers for v in layer.weights]
    frozen = [v.numpy().copy() for v in fixed]
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    before = model.evaluate(patches, labels, verbose=0, return_dict=True)["mask_loss"]
    model.fit(ds, steps_per_epoch=15, epochs=1, verbose=0)
    assert model.evaluate(patches, labels, verbose=0, return_dict=True)["mask_loss"] < 0.9 * before
    for old, new in zip(frozen, fixed):
        np.testing.assert_array_equal(old, new.numpy())  # trunk, BN statistics and head C untouched


def test_save_and_load(tmp_path):
    model = _small_model(upsampling="nearest", stage="refine")
    patches, _ = _patches()
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_config() == model.get_config() and loaded.stage == "refine"
    np.testing.assert_allclose(loaded.predict_step(patches)["masks"], model.predict_step(patches)["masks"], atol=1e-6)
    assert SharpMask(**{**model.get_config(), "backbone": model.backbone, "refinement": False,
                                         "stage": "deepmask"}).skip_levels == ()
