"""Batched example sampling for two-stage detectors (RPN anchors, Fast R-CNN RoIs).

Everything here is graph code over padded ``[B, N]`` tensors: no Python loops over images
or boxes, static output sizes, and well-defined results for images without objects.

* :func:`sample_balanced` — pick at most ``num_samples`` examples per image of which at most
  ``positive_fraction`` are positive, uniformly at random (Faster R-CNN's mini-batch rule,
  used for the RPN's 256 anchors and for the 512 RoIs of the second stage). Random scores
  + ``top_k``: the k-th largest random score of each image is the cut-off, so the number
  taken may differ per image while every shape stays static.
* :func:`sample_rois` — the Fast R-CNN proposal-target step: append the ground-truth boxes
  to the proposals, match by IoU, sample a fixed number of RoIs per image with a
  foreground quota, and build class labels and class-specific box targets.
"""
import keras
import tensorflow as tf

from kerasdet import boxes as box_ops


def kth_largest(values, k):
    """Per-row k-th largest of ``values [B, N]`` for a per-row ``k [B]`` (1-based).

    Rows with ``k <= 0`` get ``+inf`` (nothing passes ``>=``); ``k`` is capped at ``N``.
    """
    n = values.shape[1] if values.shape[1] is not None else tf.shape(values)[1]
    kmax = tf.reduce_max(k)
    kmax = tf.clip_by_value(kmax, 1, n)
    top, _ = tf.math.top_k(values, k=kmax, sorted=True)  # [B, kmax]
    index = tf.clip_by_value(k - 1, 0, kmax - 1)
    kth = tf.gather(top, index, batch_dims=1)
    return tf.where(k > 0, kth, float("inf"))


def random_uniform(shape, minval=0.0, maxval=1.0, seed=None):
    """Uniform random numbers for training-time sampling.

    ``seed``: a ``keras.random.SeedGenerator`` (the detectors pass their own
    ``sampling_seed``: its state is a variable, saved with
    :mod:`kerasdet.random_state`, so a resumed run continues the same random stream), or
    an int / None: TensorFlow's stateful ``tf.random.uniform`` with that op seed (its
    stream restarts in every new process).
    """
    if isinstance(seed, keras.random.SeedGenerator):
        return keras.random.uniform(shape, minval=minval, maxval=maxval, seed=seed)
    return tf.random.uniform(shape, minval, maxval, seed=seed)


def sample_balanced(positive, negative, *, num_samples, positive_fraction, seed=None):
    """Random positive/negative sampling with a positive quota, batched.

    Args:
        positive: ``[B, N]`` bool, candidates that may be sampled as positives.
        negative: ``[B, N]`` bool, candidates that may be sampled as negatives (disjoint
            from ``positive``).
        num_samples: examples per image (e.g. 256 anchors or 512 RoIs).
        positive_fraction: at most ``int(num_samples * positive_fraction)`` positives; the
            rest are filled with negatives (Faster R-CNN: 0.5 for the RPN, 0.25 for RoIs).
        seed: a ``keras.random.SeedGenerator`` or an op seed (see :func:`random_uniform`).

    Returns:
        ``(sampled_positive, sampled_negative)``: ``[B, N]`` bool masks. Per image
        ``#pos = min(#positive, quota)`` and ``#neg = min(#negative, num_samples - #pos)``.
    """
    positive = tf.convert_to_tensor(positive, tf.bool)
    negative = tf.convert_to_tensor(negative, tf.bool) & ~positive
    quota = int(num_samples * positive_fraction)
    # Distinct random scores (ties have probability ~0) in [0, 1); excluded entries get -1.
    rand = random_uniform(tf.shape(positive), 0.0, 1.0, seed=seed)
    pos_scores = tf.where(positive, rand, -1.0)
    neg_scores = tf.where(negative, rand, -1.0)
    num_pos = tf.minimum(tf.reduce_sum(tf.cast(positive, tf.int32), axis=1), quota)
    num_neg = tf.minimum(tf.reduce_sum(tf.cast(negative, tf.int32), axis=1), num_samples - num_pos)
    sampled_pos = positive & (pos_scores >= kth_largest(pos_scores, num_pos)[:, None])
    sampled_neg = negative & (neg_scores >= kth_largest(neg_scores, num_neg)[:, None])
    return sampled_pos, sampled_neg


def sample_rois(
    proposals,
    proposal_valid,
    gt_boxes,
    gt_classes,
    *,
    num_classes,
    gt_crowd=None,
    num_samples=512,
    foreground_fraction=0.25,
    foreground_iou=0.5,
    background_iou_high=0.5,
    background_iou_low=0.0,
    box_weights=(10.0, 10.0, 5.0, 5.0),
    add_ground_truth=True,
    seed=None,
):
    """Fast R-CNN RoI sampling (the "proposal target" step), batched and fixed-size.

    Candidates are the proposals plus (``add_ground_truth``) the ground-truth boxes
    themselves, so every object has at least one perfect foreground RoI even when the RPN
    is still random. Each candidate takes the ground truth of highest IoU; foreground is
    ``IoU >= foreground_iou``, background ``background_iou_low <= IoU < background_iou_high``
    (FPN/Detectron: 0.5 and [0, 0.5)). ``num_samples`` RoIs are drawn per image with at most
    ``foreground_fraction`` foreground (:func:`sample_balanced`).

    The output always has exactly ``num_samples`` RoIs per image (static shape; an RoI head
    must never see zero boxes: measured with TensorFlow 2.21 on CPU, oneDNN's conv2d of a
    zero-size batch returns the wrong shape): sampled foreground first, then sampled
    background, then, only if an image had too few valid candidates, filler RoIs with
    ``weights == 0`` that take part in no loss.

    Args:
        proposals: ``[B, P, 4]`` yxyx proposals (network-input px), treated as constants.
        proposal_valid: ``[B, P]`` bool (False for padding rows of the proposal layer).
        gt_boxes: ``[B, N, 4]`` yxyx ground truth.
        gt_classes: ``[B, N]`` int32, 0-based, -1 padding.
        num_classes: K (object classes; background is index 0 of the labels returned).
        gt_crowd: optional ``[B, N]`` bool ``iscrowd`` flags: crowds are never matched and
            never added as candidates (Detectron drops them from the RoI targets).
        box_weights: box-coder weights of the targets; (10, 10, 5, 5) is the usual
            ``(0.1, 0.1, 0.2, 0.2)`` target scaling of Fast R-CNN.

    Returns:
        dict of
        ``rois [B, S, 4]``, ``labels [B, S]`` int32 (0 background, ``1..K`` object class
        ``c + 1``), ``box_targets [B, S, 4]`` (encoded against the RoI for the matched
        ground truth; zeros for background), ``weights [B, S]`` float32 (1 for sampled RoIs,
        0 for fillers), ``foreground [B, S]`` bool, ``max_iou [B, S]`` and ``matched [B, S]``
        int32 (the row of ``gt_boxes`` each RoI is matched to; meaningful for foreground,
        e.g. to pick its instance mask). All outputs are
        wrapped in ``stop_gradient`` (approximate joint training).
    """
    proposals = tf.stop_gradient(tf.cast(proposals, tf.float32))
    proposal_valid = tf.convert_to_tensor(proposal_valid, tf.bool)
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_classes = tf.cast(gt_classes, tf.int32)
    gt_valid = gt_classes >= 0
    if gt_crowd is not None:
        gt_valid = gt_valid & ~tf.cast(gt_crowd, tf.bool)

    if add_ground_truth:
        candidates = tf.concat([proposals, gt_boxes], axis=1)
        cand_valid = tf.concat([proposal_valid, gt_valid], axis=1)
    else:
        candidates, cand_valid = proposals, proposal_valid
    short = num_samples - (candidates.shape[1] or 0)
    if short > 0:  # fewer candidates than RoIs (tiny configs): pad with invalid rows
        batch = tf.shape(candidates)[0]
        candidates = tf.concat([candidates, tf.zeros([batch, short, 4])], axis=1)
        cand_valid = tf.concat([cand_valid, tf.zeros([batch, short], tf.bool)], axis=1)

    overlaps = box_ops.iou(candidates, gt_boxes)  # [B, P+N, N]
    overlaps = tf.where(gt_valid[:, None, :], overlaps, -1.0)
    if gt_boxes.shape[1] == 0:
        max_iou = tf.zeros(tf.shape(candidates)[:2], tf.float32)
        matched = tf.zeros(tf.shape(candidates)[:2], tf.int32)
    else:
        max_iou = tf.maximum(tf.reduce_max(overlaps, axis=2), 0.0)  # no objects -> 0
        matched = tf.argmax(overlaps, axis=2, output_type=tf.int32)
    foreground = cand_valid & (max_iou >= foreground_iou)
    background = cand_valid & (max_iou < background_iou_high) & (max_iou >= background_iou_low) & ~foreground

    take_fg, take_bg = sample_balanced(
        foreground, background, num_samples=num_samples, positive_fraction=foreground_fraction, seed=seed
    )
    # Order: sampled fg, sampled bg, then fillers; top_k over a priority gives static size.
    rand = random_uniform(tf.shape(max_iou), 0.0, 1.0, seed=seed)
    priority = tf.where(take_fg, 3.0, tf.where(take_bg, 2.0, tf.where(cand_valid, 1.0, 0.0))) + rand
    _, index = tf.math.top_k(priority, k=num_samples, sorted=True)  # [B, S]

    rois = tf.gather(candidates, index, batch_dims=1)
    sel_fg = tf.gather(take_fg, index, batch_dims=1)
    sel_bg = tf.gather(take_bg, index, batch_dims=1)
    sel_matched = tf.gather(matched, index, batch_dims=1)
    matched_boxes = tf.gather(gt_boxes, sel_matched, batch_dims=1) if gt_boxes.shape[1] != 0 else tf.zeros_like(rois)
    matched_classes = (
        tf.gather(gt_classes, sel_matched, batch_dims=1) if gt_boxes.shape[1] != 0 else tf.zeros(tf.shape(index), tf.int32)
    )
    labels = tf.where(sel_fg, matched_classes + 1, 0)
    targets = box_ops.encode(matched_boxes, rois, weights=box_weights)
    targets = tf.where(sel_fg[..., None], targets, 0.0)
    weights = tf.cast(sel_fg | sel_bg, tf.float32)
    out = {
        "rois": rois,
        "labels": labels,
        "box_targets": targets,
        "weights": weights,
        "foreground": sel_fg,
        "max_iou": tf.gather(max_iou, index, batch_dims=1),
        "matched": sel_matched,
    }
    return {k: tf.stop_gradient(v) for k, v in out.items()}


def ohem_select(losses, valid, *, num_keep):
    """Online hard example mining (Shrivastava et al. 2016; R-FCN's ``BoxAnnotatorOHEM``).

    Per image, the ``num_keep`` valid RoIs of highest loss, by ``tf.math.top_k`` over the
    stop-gradient losses (the selection is a constant for the gradient; only the kept RoIs
    are back-propagated). Ties go to the lower index (``top_k``'s rule). Images with fewer
    than ``num_keep`` valid RoIs keep all of them. No NMS among the RoIs (as the Caffe
    layer).

    Args:
        losses: ``[B, N]`` per-RoI loss (e.g. classification + box regression).
        valid: ``[B, N]`` bool, RoIs that may be selected (sampled, not padding).
        num_keep: RoIs kept per image (R-FCN: 128).

    Returns:
        ``[B, N]`` bool mask with exactly ``min(num_keep, #valid)`` True per image.
    """
    losses = tf.stop_gradient(tf.cast(losses, tf.float32))
    valid = tf.convert_to_tensor(valid, tf.bool)
    n = losses.shape[1] if losses.shape[1] is not None else tf.shape(losses)[1]
    k = min(int(num_keep), n) if isinstance(n, int) else tf.minimum(int(num_keep), n)
    scores = tf.where(valid, losses, float("-inf"))
    _, index = tf.math.top_k(scores, k=k, sorted=False)  # [B, k]
    chosen = tf.reduce_max(tf.one_hot(index, n, dtype=tf.float32), axis=1) > 0.0  # [B, N]
    return tf.stop_gradient(chosen & valid)


def ohem_indices(losses, valid, *, num_keep):
    """:func:`ohem_select` as indices, for heads that re-run only on the kept RoIs.

    R-FCN's OHEM runs the RoI heads twice: a read-only forward pass over every RoI scores
    them, then the hardest ``num_keep`` per image go through a second forward pass that is
    back-propagated; gathering them by index makes that second pass (and its backward)
    ``num_keep`` RoIs wide instead of all of them.

    Returns:
        ``(index [B, k] int32, kept [B, k] bool)`` with ``k = min(num_keep, N)``: the same
        RoIs as ``ohem_select`` (same ``top_k``), hardest first; ``kept`` is False for slots
        that fell on invalid RoIs (an image with fewer than ``k`` valid RoIs).
    """
    losses = tf.stop_gradient(tf.cast(losses, tf.float32))
    valid = tf.convert_to_tensor(valid, tf.bool)
    n = losses.shape[1] if losses.shape[1] is not None else tf.shape(losses)[1]
    k = min(int(num_keep), n) if isinstance(n, int) else tf.minimum(int(num_keep), n)
    scores = tf.where(valid, losses, float("-inf"))
    _, index = tf.math.top_k(scores, k=k, sorted=True)
    return tf.stop_gradient(index), tf.stop_gradient(tf.gather(valid, index, batch_dims=1))
