"""Spatial Memory Network (kerasdet.models.smn): static memory shapes, gradients to the
memory only, flipped labels and sampling, selection modes, training, MLP control, config."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.backbones import small_backbone
from kerasdet.models.faster_rcnn import FasterRCNN
from kerasdet.models.smn import SMN, sample_groups

from model_testutils import assert_keras_file_round_trip, tiny_batch
from two_stage_fixtures import assert_legacy_keras_file_loads, assert_matches_fixture

K = 3


def _base(seed=0):
    keras.utils.set_random_seed(seed)
    base = FasterRCNN(
        architecture="c4", feature_level=4, num_classes=K, anchor_size=1.0, scales=(1.0, 2.0),
        backbone=small_backbone(widths=(8, 16, 16, 16), blocks=(0, 0, 0, 0), levels=("C4",)),
        roi_pooler="crop_pool", rpn_channels=8, fc_dim=16, rpn_post_nms_topk_train=16, rpn_post_nms_topk_test=16,
        num_rois=16, max_detections=20, score_threshold=0.0,
    )
    base.build((None, 64, 64, 3))
    return base


def _smn(base=None, **kwargs):
    args = dict(num_steps=3, num_base_writes=3, num_memory_steps=2, memory_channels=8, crop_size=5,
                memory_roi_crop=4, memory_roi_pool=1, memory_rpn_channels=8, memory_fc_dim=16, fusion_dim=16,
                num_rois=12, rpn_batch_size=16, max_detections=20, score_threshold=0.0)
    args.update(kwargs)
    model = SMN(base=base or _base(), **args)
    model.build((None, 64, 64, 3))
    return model


@pytest.fixture(scope="module")
def smn():
    return _smn()


def test_weights_saved_before_the_base_refactor_load_with_identical_outputs(tmp_path):
    """Legacy fixture (tests/fixtures/two_stage): an SMN on a C4 base written before the
    base's RegionProposalNetwork / public head methods: same paths, layout, detections, losses
    (the weights file, and a .keras archive of the old config and weights)."""
    assert_matches_fixture("smn", tmp_path)
    assert_legacy_keras_file_loads("smn", tmp_path)


def test_memory_state_shapes_are_static_across_steps(smn):
    images, _ = tiny_batch(batch=2)
    for mode, count in (("steps", 3), ("final", 3 + 2)):  # S_0 + writes
        smn.configure(inference=mode)
        fn = tf.function(smn.memory_states, input_signature=[tf.TensorSpec((None, 64, 64, 3), tf.float32)])
        states = fn.get_concrete_function().structured_outputs
        assert len(states) == count
        assert all(s.shape.as_list() == [None, 4, 4, 8] for s in states)  # 64 px / stride 16, D = 8
        eager = smn.memory_states(tf.constant(images))
        assert all(s.shape == (2, 4, 4, 8) for s in eager)
        # every step changed the memory (a write happened) but the prior is the same per image
        assert all(np.abs((b - a).numpy()).max() > 0 for a, b in zip(eager[:-1], eager[1:]))
    smn.configure(inference="final")


def test_gradients_reach_the_memory_but_not_the_frozen_base(smn):
    images, labels = tiny_batch(batch=2)
    base_vars = smn.base.weights
    assert not smn.base.trainable and not smn.base.trainable_weights
    assert {id(v) for v in smn.trainable_variables}.isdisjoint({id(v) for v in base_vars})
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([v.value for v in base_vars])
        terms = smn.detection_losses(tf.constant(images), labels, training=True)
        total = tf.add_n(list(terms.values()))
    assert all(np.isfinite(float(v)) for v in terms.values()) and float(terms["recon_cls_loss"]) > 0
    grads = tape.gradient(total, smn.trainable_variables)
    names = [v.path for v in smn.trainable_variables]
    missing = [n for n, g in zip(names, grads) if g is None]
    assert not missing, missing
    nonzero = {n for n, g in zip(names, grads) if np.abs(g.numpy()).sum() > 0}
    for part in ("memory_prior", "conv_gru", "input_module", "context_net", "m_fc6", "fuse_b", "rec_cls",
                 "rpn_residual", "rec_rpn"):
        assert any(part in n for n in nonzero), part
    base_grads = tape.gradient(total, [v.value for v in base_vars])
    assert all(g is None or not np.abs(g.numpy()).any() for g in base_grads)


def test_flipped_labels_and_three_way_sampling():
    model = SMN.__new__(SMN)  # _labels is pure: no weights needed
    iou = tf.constant([[[0.8, 0.0], [0.6, 0.55], [0.0, 0.7], [0.3, 0.1], [0.0, 0.0]]])  # [1, R=5, G=2]
    gt_classes = tf.constant([[4, 1]])
    valid = tf.constant([[True, True]])
    covered = tf.constant([[True, False]])
    pos, flip, neg, label, recon = SMN._labels(model, iou, gt_classes, valid, covered, 0.5, 0.5)
    # RoI 0 only overlaps the covered GT -> flipped (background); RoI 1 also overlaps the
    # uncovered GT at 0.55 -> positive of class 1; RoI 2 positive of class 1; 3, 4 negative.
    np.testing.assert_array_equal(pos.numpy()[0], [False, True, True, False, False])
    np.testing.assert_array_equal(flip.numpy()[0], [True, False, False, False, False])
    np.testing.assert_array_equal(neg.numpy()[0], [False, False, False, True, True])
    np.testing.assert_array_equal(label.numpy()[0], [0, 2, 2, 0, 0])
    np.testing.assert_array_equal(recon.numpy()[0], [5, 5, 0, 0, 0])  # reconstruction: covered GT's class

    rng = np.random.RandomState(0)
    groups = rng.randint(0, 3, (4, 200))
    masks = [tf.constant(groups == g) for g in range(3)]
    masks[1] = masks[1] & tf.constant(rng.rand(4, 200) < 0.1)  # few flipped
    sp, sf, sn = sample_groups(masks, [16, 16], 64)
    for b in range(4):
        n_pos, n_flip, n_neg = (int(tf.reduce_sum(tf.cast(x[b], tf.int32))) for x in (sp, sf, sn))
        assert n_pos == 16 and n_flip == min(16, int(tf.reduce_sum(tf.cast(masks[1][b], tf.int32))))
        assert n_pos + n_flip + n_neg == 64  # negatives fill the missing flipped quota
        assert not (sp[b] & ~masks[0][b]).numpy().any() and not (sf[b] & ~masks[1][b]).numpy().any()


def test_greedy_selection_softmax_and_hardmax(smn):
    probs = tf.constant([[[0.5, 0.1, 0.3, 0.1], [0.2, 0.1, 0.1, 0.6], [0.0, 0.0, 0.0, 1.0]]])  # [1, 3, K+1]
    boxes = tf.reshape(tf.range(3 * K * 4, dtype=tf.float32), [1, 3, K, 4])
    selectable = tf.constant([[True, True, False]])  # RoI 2 is padding
    box, dist, e_boxes, e_scores, e_classes = smn._select(probs, boxes, selectable)
    np.testing.assert_array_equal(box.numpy()[0], boxes.numpy()[0, 1, 2])  # RoI 1, class 2 (0.6)
    np.testing.assert_allclose(dist.numpy()[0], probs.numpy()[0, 1])
    np.testing.assert_allclose(e_scores.numpy()[0], [0.1, 0.1, 0.6])  # SoftMax: every class of RoI 1
    np.testing.assert_array_equal(e_classes.numpy()[0], [0, 1, 2])
    np.testing.assert_array_equal(e_boxes.numpy()[0], boxes.numpy()[0, 1])
    smn.selection = "hardmax"
    try:
        _, _, e_boxes, e_scores, e_classes = smn._select(probs, boxes, selectable)
    finally:
        smn.selection = "softmax"
    assert e_boxes.shape == (1, 1, 4)
    np.testing.assert_allclose(e_scores.numpy(), [[0.6]])
    np.testing.assert_array_equal(e_classes.numpy(), [[2]])


def test_inference_modes_output_counts(smn):
    images, _ = tiny_batch(batch=2)
    for mode, selection, most in (("steps", "softmax", 3 * K), ("steps", "hardmax", 3), ("base_topn", "softmax", 3 * K),
                                  ("final", "softmax", 3 + 2 * K)):
        smn.configure(inference=mode, selection=selection)
        out = smn.predict(images, verbose=0)
        assert out["boxes"].shape == (2, 20, 4)
        assert np.all(out["num_detections"] <= most) and np.all(out["num_detections"] > 0)
        assert np.all(np.diff(out["scores"], axis=1) <= 1e-6)  # ranked
    smn.configure(inference="final", selection="softmax")


def test_training_lowers_the_memory_losses_and_config_round_trip():
    model = _smn(_base(1), num_steps=2)
    images, labels = tiny_batch(batch=2)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    before = {v.path: v.numpy().copy() for v in model.base.weights}
    history = model.fit(images, labels, epochs=12, verbose=0).history
    assert history["mem_cls_loss"][-1] < history["mem_cls_loss"][0]
    assert history["recon_cls_loss"][-1] < history["recon_cls_loss"][0]
    for v in model.base.weights:  # the base stays frozen (weights and BN statistics)
        np.testing.assert_array_equal(v.numpy(), before[v.path])
    config = model.get_config()
    clone = SMN.from_config(config)
    assert clone.get_config() == config
    model.configure(num_steps=4)
    assert model.get_config()["num_steps"] == 4 and model.train_function is None


def test_mlp_control_has_no_memory_and_uses_nms():
    base = _base(2)
    mlp = _smn(base, context="mlp")
    assert not hasattr(mlp, "writer") and not hasattr(mlp, "prior")
    smn = _smn(base)
    mlp_names = {v.path.split("/")[-2] for v in mlp.trainable_variables}
    assert not any("gru" in n or "prior" in n for n in mlp_names)
    assert 0 < mlp.count_params() - base.count_params() < smn.count_params() - base.count_params()
    images, labels = tiny_batch(batch=2)
    terms = mlp.detection_losses(tf.constant(images), labels, training=True)
    assert float(terms["recon_cls_loss"]) == 0.0 and float(terms["mem_cls_loss"]) > 0
    out = mlp.predict(images, verbose=0)
    for b in range(2):  # per-class NMS at 0.5: no same-class pair above IoU 0.5
        n = out["num_detections"][b]
        bx, cl = out["boxes"][b, :n], out["classes"][b, :n]
        from kerasdet.boxes import iou
        ious = iou(bx, bx).numpy()
        same = (cl[:, None] == cl[None]) & ~np.eye(n, dtype=bool)
        assert not (ious[same] > 0.5 + 1e-5).any()


def test_mlp_control_matched_to_smn_parameter_count():
    from kerasdet.models.smn import inference_parameters, matched_mlp_channels

    base = _base(3)
    args = dict(num_steps=3, num_base_writes=3, num_memory_steps=2, memory_channels=8, crop_size=5,
                memory_roi_crop=4, memory_roi_pool=1, memory_rpn_channels=8, memory_fc_dim=16, fusion_dim=16,
                num_rois=12, rpn_batch_size=16, max_detections=20, score_threshold=0.0)
    channels, smn_params, mlp_params = matched_mlp_channels(base, (None, 64, 64, 3), **args)
    smn = _smn(base)
    # SMN's inference count by hand: everything outside the base except the rec_* branches
    rec = sum(int(np.prod(v.shape)) for v in smn.weights if any(p.startswith("rec_") for p in v.path.split("/")))
    assert rec > 0 and smn_params == smn.count_params() - base.count_params() - rec
    mlp = _smn(base, context="mlp", mlp_channels=channels)
    assert mlp.context_net.channels == channels != 8 and inference_parameters(mlp) == mlp_params
    # the closest width: one channel less or more is not closer
    for other in (channels - 1, channels + 1):
        count = inference_parameters(_smn(base, context="mlp", mlp_channels=other))
        assert abs(count - smn_params) >= abs(mlp_params - smn_params)
    assert abs(mlp_params - smn_params) < 0.05 * smn_params
    assert SMN.from_config(mlp.get_config()).context_net.channels == channels


@pytest.mark.parametrize("context", ["memory", "mlp"])
def test_keras_file_round_trip_with_the_nested_base(context, tmp_path):
    model = _smn(_base(4), context=context, selection="hardmax")
    images, _ = tiny_batch(batch=2)
    loaded, _ = assert_keras_file_round_trip(model, images, tmp_path)
    assert isinstance(loaded.base, FasterRCNN) and loaded.base.architecture == "c4"
    assert loaded.base.trainable is False and loaded.selection == "hardmax" and loaded.context == context
    assert loaded.base.get_config() == model.base.get_config()
    assert len(loaded.base.weights) == len(model.base.weights)
    for mine, theirs in zip(model.base.weights, loaded.base.weights):
        np.testing.assert_array_equal(theirs.numpy(), mine.numpy())
    if context == "memory":  # the training-only reconstruction branches are saved too
        assert any("rec_" in v.path for v in loaded.weights)


def test_balance_rms_gives_unit_rms_rows():
    from kerasdet.models.smn import balance_rms

    x = tf.constant([[3.0, 4.0], [0.0, 2.0]])
    # rows' RMS: sqrt((9 + 16) / 2) = 3.5355, sqrt(4 / 2) = 1.4142
    np.testing.assert_allclose(balance_rms(x).numpy(), [[3 / 3.5355339, 4 / 3.5355339], [0.0, 2 / 1.4142136]],
                               rtol=1e-5)
    np.testing.assert_allclose(np.sqrt(np.mean(balance_rms(x * 100.0).numpy() ** 2, axis=-1)), [1.0, 1.0], rtol=1e-5)


def test_fusion_norm_balances_fc7_and_m_fc7_and_old_configs_load_unbalanced():
    base = _base(3)
    model = _smn(base)
    assert model.fusion_norm == "rms"
    images, _ = tiny_batch(batch=1)
    b = model._base_pass(tf.constant(images), training=False)
    fc7, _, _ = model._base_heads(b["feat"], b["proposals"], b["image_shape"])
    m = model._context_map(model.prior(b["feat"]))
    res_rms, _ = model._memory_logits(m, b, fc7 * 1000.0, b["proposals"])
    res_plain, _ = model._memory_logits(m, b, fc7, b["proposals"])
    # a 1000x larger fc7 changes nothing once both sides are rescaled to unit RMS
    np.testing.assert_allclose(res_rms.numpy(), res_plain.numpy(), rtol=1e-4, atol=1e-6)
    config = model.get_config()
    del config["fusion_norm"]  # a config saved before the option
    assert SMN.from_config(config).fusion_norm == "none"
    with pytest.raises(ValueError, match="fusion_norm"):
        _smn(base, fusion_norm="l2")


def test_base_inference_mode_is_the_base_detector_with_nms():
    base = _base(4)
    model = _smn(base, inference="base")
    images, _ = tiny_batch(batch=2)
    ours = model.predict(images, verbose=0)
    theirs = base.predict(images, verbose=0)
    np.testing.assert_array_equal(ours["num_detections"], theirs["num_detections"])
    np.testing.assert_allclose(ours["scores"], theirs["scores"], atol=1e-5)
    np.testing.assert_allclose(ours["boxes"], theirs["boxes"], atol=1e-3)


def test_final_train_mode_writes_base_detections_then_trains_the_memory_steps():
    """train_mode="final" (Sec. 6.1 trained): the N1 writes cover exactly the ground truths a
    written base detection hits (IoU >= cover_iou), and the N2 memory steps' losses fall."""
    from kerasdet import boxes as box_ops

    base = _base(5)
    model = _smn(base, train_mode="final", num_base_writes=3, num_memory_steps=2)
    images, labels = tiny_batch(batch=2)
    b = model._base_pass(tf.constant(images), training=True)
    gt_boxes = tf.cast(labels["boxes"], tf.float32)
    gt_valid = tf.constant(np.asarray(labels["classes"]) >= 0)
    fc7, logits, class_boxes = model._base_heads(b["feat"], b["proposals"], b["image_shape"])
    memory, covered = model._write_base_detections(b["feat"], b, logits, class_boxes, gt_boxes, gt_valid,
                                                   b["image_shape"])
    assert memory.shape == (2, 4, 4, 8)
    dets = model._base_nms(tf.nn.softmax(logits, -1), class_boxes, b["valid"], b["image_shape"], 3)
    expected = np.zeros(gt_valid.shape, bool)
    for i in range(2):  # by hand: any of the image's written detections at IoU >= 0.5
        n = int(dets["num_detections"][i])
        iou = box_ops.iou(dets["boxes"][i:i + 1, :n], gt_boxes[i:i + 1]).numpy()[0]
        expected[i] = (iou >= 0.5).any(axis=0) & gt_valid.numpy()[i] if n else False
    np.testing.assert_array_equal(covered.numpy(), expected)

    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = model.fit(images, labels, epochs=10, verbose=0).history
    assert all(np.isfinite(history["mem_cls_loss"]))
    assert history["mem_cls_loss"][-1] < history["mem_cls_loss"][0]
    with pytest.raises(ValueError, match="train_mode"):
        _smn(base, context="mlp", train_mode="final")
    model.configure(train_mode="steps")
    assert model.get_config()["train_mode"] == "steps" and model.train_function is None
