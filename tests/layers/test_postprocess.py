import numpy as np
import pytest
import tensorflow as tf

from kerasdet import boxes as box_ops
from kerasdet.layers.postprocess import DetectionPostProcessor


def _logit(p):
    return np.log(p / (1 - p))


def _inputs():
    # level 0: 4 anchors, level 1: 2 anchors, 3 classes, zero deltas (boxes = anchors)
    anchors0 = np.array([[0, 0, 10, 10], [0, 1, 10, 11], [20, 20, 30, 30], [40, 40, 50, 50]], "float32")
    anchors1 = np.array([[0, 0, 10, 10], [60, 60, 90, 90]], "float32")
    logits0 = np.full((1, 4, 3), _logit(0.01), "float32")
    logits0[0, 0, 1] = _logit(0.9)   # A: class 1
    logits0[0, 1, 1] = _logit(0.8)   # overlaps A (IoU 0.82), same class -> suppressed
    logits0[0, 1, 2] = _logit(0.7)   # same box, other class -> kept
    logits0[0, 2, 0] = _logit(0.6)
    logits0[0, 3, 0] = _logit(0.04)  # under the 0.05 threshold
    logits1 = np.full((1, 2, 3), _logit(0.01), "float32")
    logits1[0, 0, 1] = _logit(0.5)   # duplicate of A on another level -> suppressed
    logits1[0, 1, 2] = _logit(0.3)
    deltas = [np.zeros((1, 4, 4), "float32"), np.zeros((1, 2, 4), "float32")]
    return [logits0, logits1], deltas, [anchors0, anchors1]


@pytest.mark.parametrize("method", ["combined", "padded"])
def test_nms_threshold_and_per_class(method):
    logits, deltas, anchors = _inputs()
    post = DetectionPostProcessor(max_detections=10, nms_method=method)
    out = post(logits, deltas, anchors, image_shape=(100, 100))
    n = int(out["num_detections"][0])
    assert n == 4
    np.testing.assert_allclose(out["scores"][0, :n], [0.9, 0.7, 0.6, 0.3], rtol=1e-5)
    np.testing.assert_array_equal(out["classes"][0, :n], [1, 2, 0, 2])
    np.testing.assert_allclose(out["boxes"][0, 0], [0, 0, 10, 10], atol=1e-4)
    np.testing.assert_allclose(out["boxes"][0, 3], [60, 60, 90, 90], atol=1e-4)
    assert np.all(out["classes"][0, n:] == -1) and np.all(out["scores"][0, n:] == 0)


def test_topk_per_level_and_clipping():
    logits, deltas, anchors = _inputs()
    post = DetectionPostProcessor(pre_nms_topk=1, max_detections=10)
    out = post(logits, deltas, anchors, image_shape=(80, 80))
    # one candidate per level: A (0.9) from level 0, the 0.5 duplicate from level 1 (suppressed by A)
    assert int(out["num_detections"][0]) == 1
    post = DetectionPostProcessor(max_detections=10)
    out = post(logits, deltas, anchors, image_shape=(80, 80))
    assert float(tf.reduce_max(out["boxes"])) <= 80.0


def test_methods_agree_on_random_inputs():
    rng = np.random.RandomState(0)
    logits = [rng.normal(-2, 2, size=(2, n, 4)).astype("float32") for n in (300, 60)]
    deltas = [rng.normal(0, 0.3, size=(2, n, 4)).astype("float32") for n in (300, 60)]
    anchors = []
    for n, s in ((300, 16), (60, 32)):
        c = rng.uniform(0, 128, size=(n, 2))
        anchors.append(np.concatenate([c - s / 2, c + s / 2], 1).astype("float32"))
    a = DetectionPostProcessor(nms_method="combined", max_detections=50)(logits, deltas, anchors, image_shape=(128, 128))
    b = DetectionPostProcessor(nms_method="padded", max_detections=50)(logits, deltas, anchors, image_shape=(128, 128))
    np.testing.assert_array_equal(a["num_detections"], b["num_detections"])
    for i in range(2):
        n = int(a["num_detections"][i])
        order_a = np.lexsort((a["classes"][i, :n], -a["scores"][i, :n].numpy()))
        order_b = np.lexsort((b["classes"][i, :n], -b["scores"][i, :n].numpy()))
        np.testing.assert_allclose(a["scores"][i, :n].numpy()[order_a], b["scores"][i, :n].numpy()[order_b], atol=1e-6)
        np.testing.assert_allclose(a["boxes"][i, :n].numpy()[order_a], b["boxes"][i, :n].numpy()[order_b], atol=1e-3)


def test_padded_compiles_with_xla():
    logits, deltas, anchors = _inputs()
    post = DetectionPostProcessor(max_detections=10, nms_method="padded")
    fn = tf.function(lambda l0, l1, d0, d1: post([l0, l1], [d0, d1], anchors, image_shape=(100, 100)), jit_compile=True)
    out = fn(logits[0], logits[1], deltas[0], deltas[1])
    assert int(out["num_detections"][0]) == 4


def test_config_round_trip():
    post = DetectionPostProcessor(pre_nms_topk=50, nms_method="padded")
    assert DetectionPostProcessor.from_config(post.get_config()).get_config() == post.get_config()
    with pytest.raises(ValueError):
        DetectionPostProcessor(nms_method="soft")


@pytest.mark.parametrize("method", ["combined", "padded"])
def test_softmax_scores_drop_background(method):
    # Softmax logits with background at index 0 whose class probabilities equal the
    # sigmoid test's scores must give the same detections (classes shifted down by one).
    logits, deltas, anchors = _inputs()
    softmax_logits = []
    for lg in logits:
        p = 1 / (1 + np.exp(-lg)) / 3.0  # class probabilities, sum < 1
        bg = 1 - p.sum(-1, keepdims=True)
        softmax_logits.append(np.log(np.concatenate([bg, p], axis=-1)).astype("float32"))
    post = DetectionPostProcessor(max_detections=10, nms_method=method, score_activation="softmax",
                                  score_threshold=0.05 / 3)
    out = post(softmax_logits, deltas, anchors, image_shape=(100, 100))
    n = int(out["num_detections"][0])
    assert n == 4
    np.testing.assert_allclose(out["scores"][0, :n], np.array([0.9, 0.7, 0.6, 0.3]) / 3, rtol=1e-5)
    np.testing.assert_array_equal(out["classes"][0, :n], [1, 2, 0, 2])
    with pytest.raises(ValueError, match="score_activation"):
        DetectionPostProcessor(score_activation="relu")


def test_per_class_nms_hand_checked_padded_equals_combined_agnostic_equals_broadcast():
    from kerasdet.layers.postprocess import per_class_nms

    # 3 RoIs, 2 classes. RoIs 0 and 1 overlap (IoU 0.81), RoI 2 is apart.
    boxes = np.array([[[0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30]]], "float32")
    probs = np.array([[[0.9, 0.1], [0.8, 0.7], [0.02, 0.6]]], "float32")
    args = dict(max_detections=5, iou_threshold=0.5, score_threshold=0.05)
    outs = []
    for padded in (False, True):
        for agnostic in (True, False):
            b = boxes[:, :, None, :] if agnostic else np.repeat(boxes[:, :, None, :], 2, axis=2)
            outs.append(per_class_nms(tf.constant(b), tf.constant(probs), (40, 40), padded=padded, **args))
    # class 0: RoI 0 (0.9) suppresses RoI 1 (0.8), RoI 2 below threshold; class 1: RoI 1 (0.7),
    # RoI 2 (0.6), RoI 0 (0.1) suppressed by RoI 1 -> 3 detections in score order.
    for out in outs:
        assert int(out["num_detections"][0]) == 3
        np.testing.assert_allclose(out["scores"][0, :3], [0.9, 0.7, 0.6], rtol=1e-6)
        assert out["classes"][0].numpy().tolist() == [0, 1, 1, -1, -1]
        np.testing.assert_allclose(out["boxes"][0, :3], boxes[0, [0, 1, 2]])
        assert np.all(out["boxes"][0, 3:].numpy() == 0)


@pytest.mark.parametrize("setting,jit_compile,expected", [
    ("auto", False, "combined"), ("auto", True, "padded"), ("auto", "auto", "combined"), ("auto", None, "combined"),
    ("combined", True, "combined"), ("padded", False, "padded"),
])
def test_resolve_nms_method(setting, jit_compile, expected):
    from kerasdet.layers.postprocess import resolve_nms_method

    assert resolve_nms_method(setting, jit_compile) == expected


def test_resolve_nms_method_rejects_unknown_methods():
    from kerasdet.layers.postprocess import resolve_nms_method

    for bad in ("soft", None, "Padded"):
        with pytest.raises(ValueError, match="nms_method must be 'auto', 'combined' or 'padded'"):
            resolve_nms_method(bad)


def test_decode_roi_boxes_class_specific_and_agnostic():
    from kerasdet.layers.postprocess import decode_roi_boxes

    rois = tf.constant([[[10.0, 10.0, 30.0, 50.0], [40.0, 40.0, 70.0, 90.0]]])  # RoI 1 crosses the border
    specific = np.zeros((1, 2, 3, 4), "float32")  # K + 1 = 3 (background first)
    specific[0, 0, 0] = [9.0, 9.0, 9.0, 9.0]  # the background slot is dropped
    specific[0, 0, 2] = [1.0, 0.0, 0.0, 0.0]  # class 1: dy = 1 / 10 of the height 20 -> +2 px
    out = decode_roi_boxes(tf.constant(specific), rois, (64, 80), box_weights=(10.0, 10.0, 5.0, 5.0)).numpy()
    assert out.shape == (1, 2, 2, 4)
    np.testing.assert_allclose(out[0, 0, 0], [10, 10, 30, 50], atol=1e-5)
    np.testing.assert_allclose(out[0, 0, 1], [12, 10, 32, 50], atol=1e-5)
    np.testing.assert_allclose(out[0, 1, 0], [40, 40, 64, 80], atol=1e-5)  # clipped to (64, 80)
    agnostic = decode_roi_boxes(tf.constant(specific[:, :, 2]), rois, (64, 80), box_weights=(10.0, 10.0, 5.0, 5.0))
    assert agnostic.shape == (1, 2, 1, 4)
    np.testing.assert_allclose(agnostic.numpy()[:, :, 0], out[:, :, 1], atol=1e-6)


@pytest.mark.parametrize("method", ["combined", "padded"])
@pytest.mark.parametrize("agnostic", [False, True])
def test_two_stage_detections_is_softmax_decode_clip_and_per_class_nms(method, agnostic):
    from kerasdet.layers.postprocess import per_class_nms, roi_detections, two_stage_detections

    rng = np.random.RandomState(0)
    rois = np.sort(rng.uniform(0, 60, (2, 30, 2, 2)), axis=2).transpose(0, 1, 3, 2).reshape(2, 30, 4)
    rois = tf.constant(rois.astype("float32"))
    logits = tf.constant(rng.normal(size=(2, 30, 4)).astype("float32") * 3)
    shape = (2, 30, 4) if agnostic else (2, 30, 4, 4)
    deltas = tf.constant(rng.normal(size=shape).astype("float32") * 0.5)
    valid = tf.constant(rng.uniform(size=(2, 30)) > 0.2)
    args = dict(max_detections=15, iou_threshold=0.5, score_threshold=0.05, pre_nms_topk=200)
    out = two_stage_detections(logits, deltas, rois, valid, (64, 64), box_weights=(10.0, 10.0, 5.0, 5.0),
                               nms_method=method, **args)
    probs = tf.nn.softmax(logits, -1)[..., 1:] * tf.cast(valid, tf.float32)[..., None]
    if agnostic:
        boxes = box_ops.clip(box_ops.decode(deltas, rois, weights=(10.0, 10.0, 5.0, 5.0)), 64, 64)[:, :, None]
    else:
        boxes = box_ops.clip(box_ops.decode(deltas[:, :, 1:], rois[:, :, None], weights=(10.0, 10.0, 5.0, 5.0)), 64, 64)
    ref = per_class_nms(boxes, probs, (64, 64), padded=method == "padded", **args)
    assert int(tf.reduce_sum(ref["num_detections"])) > 0
    for key in ref:
        np.testing.assert_array_equal(out[key].numpy(), ref[key].numpy(), err_msg=key)
    with pytest.raises(ValueError, match="nms_method"):
        roi_detections(tf.nn.softmax(logits, -1), boxes, valid, (64, 64), nms_method="auto", **args)


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("topk", [7, 50, 5000])
def test_two_stage_topk_equals_brute_force_over_all_pairs(activation, topk):
    # _level_candidates ranks anchors by their best class first, then the k best anchors'
    # pairs; it must select exactly the pairs of a top-k over all N x K pairs (numpy).
    rng = np.random.RandomState(1)
    b, n, k_cls = 2, 400, 6 if activation == "softmax" else 5
    logits = rng.normal(-2, 2, size=(b, n, k_cls)).astype("float32")
    deltas = rng.normal(0, 0.2, size=(b, n, 4)).astype("float32")
    c = rng.uniform(0, 100, size=(n, 2))
    anchors = np.concatenate([c - 8, c + 8], 1).astype("float32")
    post = DetectionPostProcessor(pre_nms_topk=topk, score_activation=activation)
    if activation == "sigmoid":
        probs = 1 / (1 + np.exp(-logits.astype("float64")))
    else:
        e = np.exp(logits.astype("float64") - logits.max(-1, keepdims=True))
        probs = (e / e.sum(-1, keepdims=True))[..., 1:]
    fn = tf.function(lambda l, d: post._level_candidates(l, d, anchors),
                     input_signature=[tf.TensorSpec([None, None, k_cls]), tf.TensorSpec([None, None, 4])])
    for boxes, scores, classes in (post._level_candidates(logits, deltas, anchors), fn(logits, deltas)):
        kk = min(topk, probs.shape[1] * probs.shape[2])
        assert scores.shape[1] == kk
        for i in range(b):
            flat = probs[i].reshape(-1)
            want = np.sort(flat)[::-1][:kk]
            got = np.sort(scores[i].numpy())[::-1]
            np.testing.assert_allclose(got, want, rtol=1e-5)
            # each selected (anchor, class) pair carries its own score and decoded box
            anchor_of = {}
            for j in range(kk):
                p = flat[np.argmin(np.abs(flat - scores[i, j].numpy()))]
                hits = np.argwhere(np.isclose(probs[i], p, rtol=0, atol=0))
                a_idx, cls = hits[0]
                assert int(classes[i, j]) == cls
                anchor_of[j] = a_idx
            sel = np.array([anchor_of[j] for j in range(kk)])
            want_boxes = box_ops.decode(tf.constant(deltas[i][sel]), tf.constant(anchors[sel])).numpy()
            np.testing.assert_allclose(boxes[i].numpy(), want_boxes, atol=1e-4)


def test_two_stage_topk_compiles_with_xla_and_matches_eager():
    rng = np.random.RandomState(2)
    logits = [rng.normal(-3, 2, size=(1, n, 4)).astype("float32") for n in (900, 100)]
    deltas = [rng.normal(0, 0.2, size=(1, n, 4)).astype("float32") for n in (900, 100)]
    anchors = []
    for n in (900, 100):
        c = rng.uniform(0, 128, size=(n, 2))
        anchors.append(np.concatenate([c - 10, c + 10], 1).astype("float32"))
    post = DetectionPostProcessor(pre_nms_topk=60, nms_method="padded", max_detections=30)
    eager = post(logits, deltas, anchors, image_shape=(128, 128))
    xla = tf.function(lambda: post(logits, deltas, anchors, image_shape=(128, 128)), jit_compile=True)()
    np.testing.assert_array_equal(eager["num_detections"], xla["num_detections"])
    np.testing.assert_allclose(eager["scores"], xla["scores"], atol=1e-6)
    np.testing.assert_allclose(eager["boxes"], xla["boxes"], atol=1e-3)


def test_padded_nms_single_image_form_equals_batched():
    """A static batch of 1 takes the single-image ``NonMaxSuppressionV4`` (LiteRT builtin);
    its indices and counts equal the batched tiled form's on the same image."""
    from kerasdet.layers.postprocess import padded_nms

    rng = np.random.RandomState(1)
    yx = rng.uniform(0, 100, (2, 400, 2))
    hw = rng.uniform(4, 30, (2, 400, 2))
    boxes = tf.constant(np.concatenate([yx, yx + hw], -1), tf.float32)
    scores = tf.constant(rng.uniform(0, 1, (2, 400)), tf.float32)
    args = dict(max_output_size=60, iou_threshold=0.5, score_threshold=0.2)
    ids = tf.broadcast_to(tf.range(400)[None], (2, 400))
    (batched_boxes, batched_ids), batched_valid = padded_nms(boxes, scores, (boxes, ids), **args)  # tiled form
    for i in range(2):
        (kept_boxes, kept_ids), valid = padded_nms(boxes[i:i + 1], scores[i:i + 1], (boxes[i:i + 1], ids[i:i + 1]),
                                                   **args)
        assert kept_ids.shape == (1, 60) and kept_boxes.shape == (1, 60, 4) and valid.shape == (1,)
        n = int(valid[0])
        assert n == int(batched_valid[i]) and n > 10
        np.testing.assert_array_equal(kept_ids[0, :n], batched_ids[i, :n])
        np.testing.assert_array_equal(kept_boxes[0, :n], batched_boxes[i, :n])
