"""R-FCN / CoupleNet / Attention CoupleNet (kerasdet.models.rfcn): shapes, training, OHEM,
context boxes, coupling options, inference format, config round trip, paper parameter counts."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.backbones import get_backbone, small_backbone
from kerasdet.layers.region_proposal import RegionProposalNetwork
from kerasdet.models.rfcn import COUPLING_NORMS, COUPLING_OPS, RFCN, Coupling, context_boxes
from kerasdet.sampling import ohem_indices, ohem_select, sample_rois
from model_testutils import assert_keras_file_round_trip, tiny_batch
from two_stage_fixtures import assert_legacy_keras_file_loads, assert_matches_fixture

VARIANTS = {
    "rfcn": dict(global_branch=False),
    "couplenet": dict(global_branch=True),
    "acouplenet": dict(global_branch=True, attention=True),
}


def tiny_backbone(attention=False):
    return small_backbone(widths=(8, 16, 16, 16), blocks=(0, 0, 0, 0), levels=("C4", "C5"), dilate_c5=True,
                          attention_levels=(2, 3, 4) if attention else (), attention_channels=8)


def tiny_model(variant="couplenet", **kwargs):
    args = dict(VARIANTS[variant])
    attention = args.pop("attention", False)
    args.update(
        backbone=tiny_backbone(attention), num_classes=3, conv_new_channels=16, group_size=3, psroi_method="align",
        global_pool_size=3, global_channels=16, rpn_channels=16, anchor_size=1.0, scales=(1.0, 2.0),
        rpn_pre_nms_topk_train=200, rpn_post_nms_topk_train=48, rpn_pre_nms_topk_test=100,
        rpn_post_nms_topk_test=32, rpn_min_size=0.0, ohem_rois=24, max_detections=20,
    )
    args.update(kwargs)
    return RFCN(**args)


def with_foreground(labels, size=64):
    """labels + ``foreground`` uint8 [B, H, W]: the union of the (box-shaped) objects."""
    fg = np.zeros((labels["boxes"].shape[0], size, size), np.uint8)
    for b, (boxes, classes) in enumerate(zip(labels["boxes"], labels["classes"])):
        for (y0, x0, y1, x1), c in zip(boxes.astype(int), classes):
            if c >= 0:
                fg[b, y0:y1, x0:x1] = 1
    return dict(labels, foreground=fg)


def _finite(logs):
    return all(np.all(np.isfinite(v)) for v in logs.values())


# --- building blocks ---------------------------------------------------------------------
def test_context_boxes_hand_computed():
    boxes = tf.constant([[[10.0, 20.0, 30.0, 60.0],     # h 20, w 40 about (20, 40)
                          [0.0, 0.0, 10.0, 10.0],       # crosses the top-left corner
                          [50.0, 90.0, 64.0, 100.0]]])  # crosses the bottom / right edges
    out = context_boxes(boxes, (64, 100)).numpy()[0]
    np.testing.assert_allclose(out[0], [0.0, 0.0, 40.0, 80.0])
    np.testing.assert_allclose(out[1], [0.0, 0.0, 15.0, 15.0])
    np.testing.assert_allclose(out[2], [43.0, 85.0, 64.0, 100.0])
    np.testing.assert_allclose(context_boxes(boxes[:, :1], (200, 200), scale=3.0).numpy()[0, 0],
                               [-10.0 + 10.0, -20.0 + 20.0, 50.0, 100.0])


def test_ohem_keeps_exactly_the_hardest_valid_rois():
    losses = tf.constant([[0.5, 3.0, 0.1, 2.0, 9.0, 1.0],
                          [4.0, 4.0, 1.0, 0.0, 0.0, 5.0],
                          [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    valid = tf.constant([[True, True, True, True, False, True],   # 9.0 is padding: never kept
                         [True, True, True, True, True, True],
                         [False, True, False, False, False, False]])  # fewer valid than k
    keep = ohem_select(losses, valid, num_keep=3).numpy()
    np.testing.assert_array_equal(keep[0], [False, True, False, True, False, True])  # 3.0, 2.0, 1.0
    np.testing.assert_array_equal(keep[1], [True, True, False, False, False, True])  # 5.0, 4.0, 4.0
    np.testing.assert_array_equal(keep[2], [False, True, False, False, False, False])
    # the spec's 128 of ~300 RoIs: exactly the 128 largest
    rng = np.random.RandomState(0)
    big = rng.permutation(600).astype("float32").reshape(2, 300)
    keep = ohem_select(big, tf.ones((2, 300), tf.bool), num_keep=128).numpy()
    assert keep.sum(1).tolist() == [128, 128]
    for b in range(2):
        np.testing.assert_array_equal(np.sort(big[b][keep[b]]), np.sort(big[b])[-128:])
    # the selection is a constant for the gradient
    x = tf.Variable(big)
    with tf.GradientTape() as tape:
        mask = ohem_select(x * 2.0, tf.ones((2, 300), tf.bool), num_keep=128)
        loss = tf.reduce_sum(tf.cast(mask, tf.float32) * x)
    grad = tape.gradient(loss, x).numpy()
    np.testing.assert_array_equal(grad, keep.astype("float32"))


@pytest.mark.parametrize("norm", COUPLING_NORMS)
@pytest.mark.parametrize("op", COUPLING_OPS)
def test_coupling_options_hand_computed(norm, op):
    local = tf.constant([[[3.0, 4.0, 0.0]]])
    glob = tf.constant([[[0.0, 1.0, -2.0]]])
    layer = Coupling(num_outputs=3, norm=norm, op=op, l2_scale=10.0)
    layer.build()
    out = layer(local, glob).numpy()[0, 0]
    a, b = local.numpy()[0, 0], glob.numpy()[0, 0]
    if norm == "l2":
        a, b = 10 * a / np.linalg.norm(a), 10 * b / np.linalg.norm(b)
    expected = {"sum": a + b, "product": a * b, "max": np.maximum(a, b)}[op]  # conv starts as identity
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    params = {"conv": 3 * 3 + 3, "none": 0, "l2": 2 * 3}[norm]
    assert layer.count_params() == params


# --- model -------------------------------------------------------------------------------
def test_forward_shapes_each_variant():
    images, _ = tiny_batch(batch=2)
    rois = tf.constant(np.tile([[[4.0, 4.0, 30.0, 40.0], [0.0, 0.0, 64.0, 64.0], [10, 12, 14, 13]]], (2, 1, 1)),
                       tf.float32)
    for variant in VARIANTS:
        model = tiny_model(variant)
        model.build((None, 64, 64, 3))
        feats = model.backbone(images)
        assert feats["C4"].shape[1:3] == (4, 4) and feats["C5"].shape[1:3] == (4, 4)  # both stride 16
        assert model.is_attention == (variant == "acouplenet")
        logits, deltas = model.heads(feats["C5"], rois, (64, 64))
        assert logits.shape == (2, 3, 4) and deltas.shape == (2, 3, 4)
        assert model.cls_maps.filters == 3 * 3 * 4 and model.box_maps.filters == 3 * 3 * 4
        assert (model.global_head is not None) == (variant != "rfcn")


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fit_losses_fall(variant):
    """20 fit steps on one batch (~20-40 s each on the loaded 2-core CPU, mostly tracing)."""
    keras.utils.set_random_seed(0)
    model = tiny_model(variant)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    images, labels = tiny_batch()
    labels = with_foreground(labels)
    history = model.fit(images, labels, batch_size=4, epochs=20, verbose=0).history
    names = {"rpn_cls_loss", "rpn_box_loss", "cls_loss", "box_loss", "weight_decay"}
    if variant == "acouplenet":
        names.add("attention_loss")
        assert history["attention_loss"][-1] < 0.5 * history["attention_loss"][0]
    assert names <= set(history) and _finite(history)
    assert ("attention_loss" in history) == (variant == "acouplenet")
    assert history["rpn_cls_loss"][-1] < 0.5 * history["rpn_cls_loss"][0]
    assert history["cls_loss"][-1] < 0.5 * history["cls_loss"][0]
    assert history["loss"][-1] < 0.6 * history["loss"][0]


def test_attention_model_needs_the_foreground_mask():
    model = tiny_model("acouplenet")
    images, labels = tiny_batch(batch=2)
    with pytest.raises(ValueError, match="foreground"):
        model.detection_losses(tf.constant(images), labels, training=True)


def test_ohem_normalizer_is_fixed_per_image():
    """cls_loss = sum of the kept RoIs' CE / (ohem_rois x images), and exactly ohem_rois kept
    (the candidates, 48 proposals + 3 GT per image, outnumber them)."""
    keras.utils.set_random_seed(5)
    images, labels = tiny_batch(batch=2)
    a = tiny_model("rfcn", ohem_rois=24)
    a.build((None, 64, 64, 3))
    b = tiny_model("rfcn", ohem_rois=48)
    b.build((None, 64, 64, 3))
    b.set_weights(a.get_weights())
    tf.random.set_seed(1)
    la = a.detection_losses(tf.constant(images), labels, training=True)
    tf.random.set_seed(1)
    lb = b.detection_losses(tf.constant(images), labels, training=True)
    # the 24 hardest are a subset of the 48 hardest: a's mean CE is at least b's
    assert float(la["cls_loss"]) * 24 <= float(lb["cls_loss"]) * 48 + 1e-4
    assert float(la["cls_loss"]) >= float(lb["cls_loss"]) - 1e-5


def test_two_pass_ohem_equals_masked_loss_over_all_rois():
    """The model's read-only pass + re-run of the kept RoIs gives the same head losses as
    scoring all RoIs once and masking with ohem_select (sum over the kept / (k x images))."""
    keras.utils.set_random_seed(6)
    images, labels = tiny_batch(batch=2)
    model = tiny_model("couplenet", ohem_rois=16)
    model.build((None, 64, 64, 3))
    x = tf.constant(images)
    terms = model.detection_losses(x, labels, training=True)
    feats = model.backbone(x, training=True)
    logits, deltas, anchors = model.rpn(feats["C4"])
    proposals, _, valid = model.proposals(logits, deltas, anchors, (64, 64), training=True)
    samples = sample_rois(proposals, valid, labels["boxes"], labels["classes"], num_classes=3,
                          num_samples=proposals.shape[1] + 3, foreground_fraction=1.0, box_weights=(10, 10, 5, 5))
    ce, box = model._roi_losses(*model.heads(feats["C5"], samples["rois"], (64, 64)), samples)
    keep = tf.cast(ohem_select(ce + box, samples["weights"] > 0, num_keep=16), tf.float32)
    assert keep.numpy().sum() == 2 * 16
    np.testing.assert_allclose(float(terms["cls_loss"]), float(tf.reduce_sum(ce * keep)) / 32, rtol=1e-4)
    np.testing.assert_allclose(float(terms["box_loss"]), float(tf.reduce_sum(box * keep)) / 32, rtol=1e-4, atol=1e-6)
    index, kept = ohem_indices(ce + box, samples["weights"] > 0, num_keep=16)
    assert kept.numpy().all()
    chosen = np.zeros(keep.shape, bool)
    np.put_along_axis(chosen, index.numpy(), True, axis=1)
    np.testing.assert_array_equal(chosen, keep.numpy() > 0)


@pytest.mark.parametrize("norm,op", [("none", "sum"), ("l2", "product"), ("conv", "max")])
def test_each_coupling_option_trains_and_predicts(norm, op):
    keras.utils.set_random_seed(1)
    model = tiny_model("couplenet", coupling_norm=norm, coupling_op=op)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True)  # eager: no tracing cost
    images, labels = tiny_batch(batch=2)
    images, labels = tf.constant(images), {k: tf.constant(v) for k, v in labels.items()}
    for _ in range(2):  # (tensors: base.py's eager non-finite guard reads images.dtype.is_floating)
        logs = model.train_on_batch(images, labels, return_dict=True)
        assert _finite(logs)
    out = model.predict(images, verbose=0)
    assert out["boxes"].shape == (2, 20, 4)


def test_predict_format_and_padded_nms_agrees():
    keras.utils.set_random_seed(2)
    model = tiny_model("couplenet", score_threshold=0.2)
    images, _ = tiny_batch(batch=2)
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
    model.jit_compile = True  # read by the model to pick the padded (XLA-compatible) NMS; run eagerly
    padded = model.detect(tf.constant(images))
    model.jit_compile = False
    np.testing.assert_array_equal(padded["num_detections"], n)
    np.testing.assert_allclose(np.sort(padded["scores"].numpy(), 1), np.sort(out["scores"], 1), atol=1e-5)


@pytest.mark.parametrize("variant,kwargs", [
    ("rfcn", {}),
    ("couplenet", {}),
    ("acouplenet", dict(coupling_norm="l2", coupling_op="max")),
])
def test_keras_file_round_trip(variant, kwargs, tmp_path):
    keras.utils.set_random_seed(6)
    model = tiny_model(variant, score_threshold=0.0, **kwargs)
    images, _ = tiny_batch(batch=2)
    if model.coupling is not None and model.coupling.norm == "l2":
        model.build((None, 64, 64, 3))
        model.coupling.local_scale.assign([3.0, 5.0, 7.0, 9.0])  # a learned (not initial) value
    loaded, _ = assert_keras_file_round_trip(model, images, tmp_path)
    assert loaded.is_attention == (variant == "acouplenet") and loaded.global_branch == (variant != "rfcn")
    if variant == "acouplenet":
        assert loaded.coupling.norm == "l2" and loaded.coupling.op == "max"
        np.testing.assert_array_equal(loaded.coupling.local_scale.numpy(), [3.0, 5.0, 7.0, 9.0])


# --- paper configurations ----------------------------------------------------------------
RESNET101_NOTOP = 42_658_176  # keras.applications.ResNet101(include_top=False).count_params()


@pytest.mark.parametrize("name", ["rfcn", "couplenet"])
def test_weights_saved_before_the_parts_refactor_load_with_identical_outputs(name, tmp_path):
    """Legacy fixture (tests/fixtures/two_stage): same weight paths, .weights.h5 layout and
    parameter count; the old config and weights file (also as a .keras archive) give bitwise
    the old detections and losses."""
    assert_matches_fixture(name, tmp_path)
    assert_legacy_keras_file_loads(name, tmp_path)


def test_proposal_network_part_passed_in():
    keras.utils.set_random_seed(8)
    default = tiny_model("rfcn", score_threshold=0.0)
    default.build((None, 64, 64, 3))
    rpn = RegionProposalNetwork(min_level=4, max_level=4, anchor_size=1.0, scales=(1.0, 2.0), channels=16,
                                pre_nms_topk_train=200, post_nms_topk_train=48, pre_nms_topk_test=100,
                                post_nms_topk_test=32, min_size=0.0, name="my_rpn")
    model = tiny_model("rfcn", score_threshold=0.0, proposal_network=rpn)
    model.build((None, 64, 64, 3))
    assert model.count_params() == default.count_params() and model.rpn_head is rpn.head
    model.set_weights(default.get_weights())
    images, _ = tiny_batch(batch=2)
    ref, out = default.detect(tf.constant(images)), model.detect(tf.constant(images))
    for key in ref:
        np.testing.assert_array_equal(out[key].numpy(), ref[key].numpy(), err_msg=key)
    config = model.get_config()
    assert "proposal_network" in config and "proposal_network" not in default.get_config()
    clone = RFCN.from_config(config)
    assert clone.get_config() == config and clone.proposal_network.name == "my_rpn"
    with pytest.raises(ValueError, match="feature_level=4"):
        tiny_model("rfcn", proposal_network=RegionProposalNetwork(min_level=3, max_level=4))


def conv(k, cin, cout):
    return k * k * cin * cout + cout


def paper_param_counts(num_classes=20, k=7, d=1024, anchors=9):
    """Parameter counts of the paper configurations from the layer list (spec §1)."""
    n = num_classes + 1
    rpn = conv(3, 1024, 512) + conv(1, 512, anchors) + conv(1, 512, 4 * anchors)  # sigmoid objectness
    local = conv(1, 2048, d) + conv(1, d, k * k * n) + conv(1, d, k * k * 4)  # conv_new_1, rfcn_cls, rfcn_bbox
    context_conv = conv(7, 2 * d, 1024)
    global_ = context_conv + conv(1, 1024, 1024) + conv(1, 1024, n) + conv(1, 1024, 4)
    coupling = conv(1, n, n)
    attention = sum(conv(3, c, 256) + conv(3, 256, 1) for c in (256, 512, 1024))
    rfcn = RESNET101_NOTOP + rpn + local
    couplenet = rfcn + global_ + coupling
    return {"rfcn": rfcn, "couplenet": couplenet, "acouplenet": couplenet + attention,
            "context_conv": context_conv, "global": global_, "attention": attention}


def test_paper_layer_list_numbers():
    counts = paper_param_counts()
    assert counts["context_conv"] == 102_760_448 + 1024  # spec: ~102.8M = 49 * 2048 * 1024
    assert counts["global"] == 103_836_697
    assert counts["attention"] == 4_136_451
    assert (counts["rfcn"], counts["couplenet"], counts["acouplenet"]) == (50_754_166, 154_591_325, 158_727_776)


@pytest.mark.slow
def test_paper_configurations_parameter_counts():
    """ResNet-101 dilated + heads, VOC (20 classes), built without a forward pass."""
    counts = paper_param_counts()
    reference = keras.applications.ResNet101(include_top=False, weights=None).count_params()
    assert reference == RESNET101_NOTOP
    for variant, kwargs in VARIANTS.items():
        kwargs = dict(kwargs)
        attention = kwargs.pop("attention", False)
        backbone = get_backbone("resnet101_dilated", weights=None, attention_levels=(2, 3, 4) if attention else ())
        model = RFCN(backbone=backbone, num_classes=20, **kwargs)
        model.build((None, 64, 64, 3))
        assert model.backbone.count_params() == RESNET101_NOTOP + (counts["attention"] if attention else 0)
        assert model.count_params() == counts[variant], variant
        if model.global_head is not None:
            assert model.global_head.conv1.kernel.shape == (7, 7, 2048, 1024)
            assert model.global_head.count_params() == counts["global"]
            assert model.global_head.conv1.count_params() == 102_760_448 + 1024
        assert model.cls_maps.filters == 7 * 7 * 21 and model.box_maps.filters == 7 * 7 * 4
        del model, backbone
        keras.backend.clear_session()
