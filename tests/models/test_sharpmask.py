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
    # reflective padding in every conv of the trunk (thesis §3.5), weights as built
    from kerasdet.layers.padding import MirrorConv2D, MirrorPadding2D

    assert isinstance(model.backbone.get_layer("conv4_block6_2_conv"), MirrorConv2D)
    assert isinstance(model.backbone.get_layer("conv1_pad"), MirrorPadding2D)
    np.testing.assert_array_equal(model.backbone.get_layer("conv3_block1_2_conv").kernel.numpy(),
                                  trunk.get_layer("conv3_block1_2_conv").kernel.numpy())


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
    det = model.detect_patches(tf.zeros([2, 64, 64, 3]))
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
    model.compile(optimizer=keras.optimizers.Adam(3e-3), run_eagerly=True)
    first = float(model.compute_loss(patches, labels, training=False))
    model.fit(ds, steps_per_epoch=15, epochs=1, verbose=0)
    assert float(model.compute_loss(patches, labels, training=False)) < 0.8 * first
    refine_names = {v.path for layer in model.refine_layers for v in layer.weights}
    assert not refine_names & {v.path for v in model.trainable_variables}

    trunk_trainable = {v.path for v in model.backbone.trainable_variables}
    assert trunk_trainable and len(trunk_trainable) < len(model.backbone.weights)  # BN statistics are not
    model.set_stage("refine")
    assert {v.path for v in model.trainable_variables} == refine_names
    fixed = model.backbone.weights + [v for layer in model.head_layers for v in layer.weights]
    frozen = [v.numpy().copy() for v in fixed]
    model.compile(optimizer=keras.optimizers.Adam(1e-2), run_eagerly=True)
    before = float(model.detection_losses(patches, labels, training=False)["mask_loss"])
    model.fit(ds, steps_per_epoch=15, epochs=1, verbose=0)
    assert float(model.detection_losses(patches, labels, training=False)["mask_loss"]) < 0.9 * before
    for old, new in zip(frozen, fixed):
        np.testing.assert_array_equal(old, new.numpy())  # trunk, BN statistics and head C untouched
    model.set_stage("deepmask")  # back: the trunk trains again, frozen layers stay frozen
    assert {v.path for v in model.backbone.trainable_variables} == trunk_trainable


def test_save_and_load(tmp_path):
    model = _small_model(upsampling="nearest", stage="refine")
    patches, _ = _patches()
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_config() == model.get_config() and loaded.stage == "refine"
    np.testing.assert_allclose(loaded.detect_patches(patches)["masks"], model.detect_patches(patches)["masks"], atol=1e-6)
    assert SharpMask(**{**model.get_config(), "backbone": model.backbone, "refinement": False,
                                         "stage": "deepmask"}).skip_levels == ()


def _pointwise_trunk():
    """A trunk whose every cell sees only its own pixels (1x1 convs, 2x2 average pools),
    so a window of the full image and the patch cut at its box give the same head input."""
    images = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(images)
    outputs = {}
    for level, width in zip(("C1", "C2", "C3", "C4"), (4, 6, 6, 8)):
        x = keras.layers.AveragePooling2D(2)(x)
        x = keras.layers.Conv2D(width, 1, activation="tanh")(x)
        outputs[level] = x
    return keras.Model(images, outputs)


def test_full_image_windows_equal_patches_cut_at_their_boxes():
    from kerasdet.layers.windows import crop_windows

    keras.utils.set_random_seed(3)
    model = SharpMask(backbone=_pointwise_trunk(), patch_size=32, context=32, features=4, embedding=8, mask_size=8,
                      score_hidden=8, k=16, skip_hidden=4, weight_decay=0.0, scales=(1.0,), num_proposals=5,
                      stage="refine")
    model.build()
    image = tf.random.uniform([1, 48, 64, 3], 0, 255, seed=1)
    vectors, scores, windows, cells, _ = model.scale_outputs(image, 1.0)
    # (48 + 32) / 16 = 5 rows, (64 + 32) / 16 = 6 columns of trunk cells; 2x2 windows -> 4 x 5
    assert windows.shape == (20, 4) and scores.shape == (1, 20)
    np.testing.assert_allclose(windows[0], [-16, -16, 16, 16])
    np.testing.assert_allclose(windows[7], [0, 16, 32, 48])  # cell (1, 2)
    outer = windows + tf.constant([[-16.0, -16.0, 16.0, 16.0]])
    patches = crop_windows(image, outer, tf.zeros([20], tf.int32), 64, extrapolation_value=127.5)
    out = model.forward(patches)
    np.testing.assert_allclose(scores[0], out["score_logits"], atol=1e-4)
    np.testing.assert_allclose(model.mask_head(vectors[0][:, None, None]).numpy().reshape(20, 8, 8),
                               out["mask_logits"], atol=1e-4)
    det = model.detect(image)
    assert det["masks"].shape == (1, 5, 48, 64) and det["boxes"].shape == (1, 5, 4)
    top = np.argsort(-scores[0].numpy(), kind="stable")[:5]
    np.testing.assert_allclose(det["scores"][0], tf.sigmoid(tf.gather(scores[0], top)), atol=1e-5)
    # the refined masks of the top windows, pasted and binarized at 0.2, are where the windows are
    refined = tf.sigmoid(out["refined_logits"]).numpy()
    for rank, w in enumerate(top):
        y0, x0, y1, x1 = windows[w].numpy().astype(int)
        expected = np.zeros((48, 64), bool)
        crop = refined[w][max(0, -y0):, max(0, -x0):][: min(y1, 48) - max(y0, 0), : min(x1, 64) - max(x0, 0)]
        expected[max(y0, 0):min(y1, 48), max(x0, 0):min(x1, 64)] = crop > 0.2
        got = det["masks"][0, rank].numpy() > 0
        # skip features are shared over the image (not mirror-padded at each window): borders may differ
        assert np.mean(got == expected) > 0.9
        ys, xs = np.nonzero(got)
        if len(ys):
            np.testing.assert_array_equal(det["boxes"][0, rank], [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])
    assert det["num_detections"].numpy().tolist() == [5] and np.all(det["classes"].numpy() == 0)


def test_detect_pads_when_an_image_has_fewer_windows_and_exports(tmp_path):
    from kerasdet.export import export_saved_model

    model = _small_model(scales=(0.5, 1.0), num_proposals=12)
    image = tf.random.uniform([2, 32, 32, 3], 0, 255, seed=2)
    det = model.predict_step(image)
    # scale 0.5: (16 + 32) / 16 -> 3 cells -> 2x2 windows; scale 1: 4 cells -> 3x3: 13 windows
    assert det["num_detections"].numpy().tolist() == [12, 12]
    small = _small_model(scales=(0.5,), num_proposals=6)
    few = small.predict_step(image)
    assert few["num_detections"].numpy().tolist() == [4, 4]
    assert np.all(few["classes"][:, 4:].numpy() == -1) and np.all(few["masks"][:, 4:].numpy() == 0)
    export_saved_model(small, str(tmp_path / "sm"), image_size=(32, 32), category_ids=[1], warmup=False)
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    out = loaded.signatures["serving_default"](images=tf.cast(image, tf.uint8))
    assert out["detection_masks"].shape == (2, 6, 32, 32)
    ref = small.predict_step(tf.cast(tf.cast(image, tf.uint8), tf.float32))
    assert np.mean(out["detection_masks"].numpy() == ref["masks"].numpy()) > 0.99  # BN folded: round-off only
