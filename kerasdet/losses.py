"""Detection losses as element-wise graph functions.

The functions return UNREDUCED losses; the detector sums them over the anchors it keeps
and divides by a normalizer all-reduced across replicas (see
:func:`global_normalizer`). That is the only scaling that stays correct under
``tf.distribute`` (gradients are all-reduce-SUMMED across replicas) — Keras' own
``BinaryFocalCrossentropy`` averages over the class axis and its reductions divide by the
element count, which is not the paper's normalization (by the number of positive anchors).
"""
import tensorflow as tf


def sigmoid_focal_loss(labels, logits, *, alpha=0.25, gamma=2.0):
    """Element-wise sigmoid focal loss ``-alpha_t (1 - p_t)^gamma log(p_t)`` (thesis Eq. 5.5).

    Computed from logits (log-sigmoid, no probability clipping): the thesis notes
    clipping at tau=1e-5 occasionally diverges; the logit form is exact and stable.

    Args:
        labels: 0/1 targets, same shape as ``logits``.
        logits: raw class scores.
        alpha: weight of the positive class (``1 - alpha`` for negatives). Default 0.25.
            ``None`` or a negative value disables the alpha balancing.
        gamma: focusing parameter. Default 2.0 (``gamma=0`` is cross-entropy).
    Returns:
        float32 loss of the same shape as ``logits``.
    """
    logits = tf.cast(logits, tf.float32)
    labels = tf.cast(labels, tf.float32)
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    p = tf.sigmoid(logits)
    p_t = labels * p + (1.0 - labels) * (1.0 - p)
    loss = ce
    if gamma:
        loss = tf.pow(1.0 - p_t, gamma) * loss
    if alpha is not None and alpha >= 0:
        alpha_t = labels * alpha + (1.0 - labels) * (1.0 - alpha)
        loss = alpha_t * loss
    return loss


def smooth_l1_loss(targets, predictions, *, beta=0.11):
    """Element-wise smooth L1: ``0.5 x^2 / beta`` if ``|x| < beta`` else ``|x| - 0.5 beta``.

    Equals ``keras.losses.Huber(delta=beta)`` divided by ``beta``. ``beta=0.11`` is
    Detectron's RetinaNet value (the thesis gives none); ``beta=0`` is plain L1.
    """
    x = tf.abs(tf.cast(predictions, tf.float32) - tf.cast(targets, tf.float32))
    if beta <= 0:
        return x
    return tf.where(x < beta, 0.5 * tf.square(x) / beta, x - 0.5 * beta)


def global_normalizer(count, *, minimum=1.0):
    """``max(minimum, count summed over all replicas)`` as float32.

    Call inside a replica context (``train_step``). Under the default strategy this is
    ``max(minimum, count)``.
    """
    count = tf.cast(count, tf.float32)
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, count)
    return tf.maximum(count, minimum)


def hard_negative_mask(negative_losses, negatives, num_positives, *, ratio=3.0, min_negatives=0):
    """SSD's hard negative mining (Liu et al. 2016 §2.2; ASSD §4): per image, the
    ``min(ratio * num_positives, num_anchors - 1)`` negatives of highest loss.

    Batched graph code: each anchor's rank among its image's candidate negatives comes
    from a stable double ``argsort`` (ties go to the lower anchor index, as a stable sort
    in the authors' PyTorch code), no loop over images.

    Args:
        negative_losses: ``[B, A]`` per-anchor background loss (e.g. ``logsumexp(logits)
            - logits[background]``); only entries where ``negatives`` is True compete.
        negatives: ``[B, A]`` bool, anchors that may be mined (not positive, not ignored).
        num_positives: ``[B]`` positives per image.
        ratio: negatives per positive. Default 3.0 (3:1).
        min_negatives: negatives kept even in an image with no positives. Default 0 (the
            SSD/ASSD code: an image without objects contributes no loss); a positive value
            lets empty images teach background.
    Returns:
        ``[B, A]`` bool mask of the mined negatives.
    """
    negative_losses = tf.cast(negative_losses, tf.float32)
    num_anchors = tf.shape(negative_losses)[1]
    scores = tf.where(negatives, negative_losses, tf.fill(tf.shape(negative_losses), float("-inf")))
    order = tf.argsort(scores, axis=1, direction="DESCENDING", stable=True)
    rank = tf.argsort(order, axis=1, stable=True)
    num_neg = tf.cast(tf.round(ratio * tf.cast(num_positives, tf.float32)), tf.int32)
    num_neg = tf.maximum(num_neg, int(min_negatives))
    num_neg = tf.minimum(num_neg, num_anchors - 1)
    return negatives & (rank < num_neg[:, None])


def multibox_loss(class_targets, class_logits, box_targets, box_deltas, *, negative_ratio=3.0,
                  min_negatives=0, smooth_l1_beta=1.0):
    """SSD multibox loss terms as LOCAL SUMS (divide by the global positive count).

    Args:
        class_targets: ``[B, A]`` int32: ``0`` background, ``1..K`` object classes, ``-1``
            ignored (softmax over ``K + 1`` with background at index 0, the SSD layout).
        class_logits: ``[B, A, K + 1]``.
        box_targets, box_deltas: ``[B, A, 4]`` encoded offsets (variances applied).
        negative_ratio, min_negatives: see :func:`hard_negative_mask`.
        smooth_l1_beta: Default 1.0 (SSD's smooth L1).
    Returns:
        ``(conf_sum, loc_sum, num_positives)``: softmax cross-entropy summed over positives
        and mined negatives, smooth L1 summed over positives, and the positive count (float32).
    """
    class_logits = tf.cast(class_logits, tf.float32)
    positive = class_targets > 0
    negative = tf.equal(class_targets, 0)
    num_pos = tf.reduce_sum(tf.cast(positive, tf.int32), axis=1)
    log_probs = tf.nn.log_softmax(class_logits, axis=-1)
    background_loss = -log_probs[..., 0]
    mined = hard_negative_mask(background_loss, negative, num_pos, ratio=negative_ratio, min_negatives=min_negatives)
    ce = -tf.gather(log_probs, tf.maximum(class_targets, 0), batch_dims=2)
    conf = tf.reduce_sum(tf.where(positive | mined, ce, 0.0))
    loc = tf.reduce_sum(tf.reduce_sum(smooth_l1_loss(box_targets, box_deltas, beta=smooth_l1_beta), axis=-1)
                        * tf.cast(positive, tf.float32))
    return conf, loc, tf.cast(tf.reduce_sum(num_pos), tf.float32)


def attention_targets(foreground, height, width, *, stride=None, threshold=0.5):
    """Class-agnostic attention targets of one ``height x width`` map (Attention CoupleNet §III-B).

    Args:
        foreground: ``[B, H, W]`` (uint8 or any int/float/bool) at input resolution: ``1``
            object, ``0`` background, ``255`` ignore (crowd regions).
        height, width: size of the attention map (static ints or scalar tensors).
        stride: input pixels per map cell (int or scalar tensor). Default: ``H / height``
            rounded to the nearest power of two (the backbones' strides 4, 8, 16, ...).
        threshold: the object fraction of a cell's non-ignored pixels that makes it a
            positive. Default 0.5.

    Each map cell ``(i, j)`` covers the input block ``[s*i, s*i + s) x [s*j, s*j + s)``
    (the ceil-size convention of the backbones: ``height = ceil(H / s)``). The target is
    resized by AREA AVERAGE over that block, then thresholded (the paper leaves the
    rule open; area-average + 0.5 is our choice):

    * pixels outside the ``H x W`` input (blocks overhanging the border) count as ignore;
    * a cell is IGNORED when more than half of its block is ignore (``255`` or outside);
    * otherwise its target is ``1`` when objects cover at least ``threshold`` of the
      block's non-ignored pixels (``fg / (fg + bg) >= threshold``; default one half), else
      ``0``.

    The paper's label is per pixel ("a*_j is 1 if the pixel belongs to objects", Attention
    CoupleNet §III-C, Eq. 4), for objects far larger than the stride; the rule that carries it
    to a stride-s cell is ours. With thin masks the default loses objects: on the digits'
    ink masks (strokes 2-4 px) only 34% of the digits have a positive stride-16 cell at 0.5
    (94% at stride 8), against 91% at 0.25 (100% at stride 8; 300 validation images).

    Returns:
        ``(targets, valid)``: float32 ``[B, height, width]`` 0/1 targets and float32
        ``[B, height, width]`` 1/0 weights (0 = ignored cell).
    """
    foreground = tf.convert_to_tensor(foreground)
    if foreground.dtype == tf.bool:
        foreground = tf.cast(foreground, tf.uint8)
    shape = tf.shape(foreground)
    in_h, in_w = shape[1], shape[2]
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    if stride is None:
        ratio = tf.cast(in_h, tf.float32) / tf.cast(height, tf.float32)
        stride = tf.cast(tf.round(tf.pow(2.0, tf.round(tf.math.log(ratio) / tf.math.log(2.0)))), tf.int32)
        stride = tf.maximum(stride, 1)
    stride = tf.cast(stride, tf.int32)
    ignore = tf.cast(tf.equal(tf.cast(foreground, tf.int32), 255), tf.float32)
    objects = tf.cast(tf.greater(tf.cast(foreground, tf.float32), 0.0), tf.float32) * (1.0 - ignore)
    full_h, full_w = height * stride, width * stride
    # crop to the blocks' extent, then pad the overhang as ignore
    objects = objects[:, :full_h, :full_w]
    ignore = ignore[:, :full_h, :full_w]
    pad_h = full_h - tf.minimum(in_h, full_h)
    pad_w = full_w - tf.minimum(in_w, full_w)
    paddings = [[0, 0], [0, pad_h], [0, pad_w]]
    objects = tf.pad(objects, paddings)
    ignore = tf.pad(ignore, paddings, constant_values=1.0)

    def block_mean(x):
        x = tf.reshape(x, [shape[0], height, stride, width, stride])
        return tf.reduce_mean(x, axis=[2, 4])

    fg_fraction = block_mean(objects)
    ignore_fraction = block_mean(ignore)
    valid_fraction = 1.0 - ignore_fraction
    valid = tf.cast(ignore_fraction <= 0.5, tf.float32)
    targets = tf.cast(fg_fraction >= float(threshold) * valid_fraction, tf.float32) * valid
    return targets, valid


def attention_loss(logits_list, foreground, *, strides=None, threshold=0.5):
    """The attention term of Attention CoupleNet's Eq. 4 as a LOCAL SUM over the batch's images.

    ``sum_k (1 / N_k) sum_j BCE(sigmoid(g_kj), a*_kj)`` per image, summed over the images of
    the (local) batch: divide by the GLOBAL number of images (e.g.
    ``global_normalizer(batch_size)``), the house convention under ``tf.distribute``.

    Args:
        logits_list: list of K attention logit maps ``g_k``, ``[B, H_k, W_k, 1]`` or
            ``[B, H_k, W_k]`` (e.g. the ``"A{level}"`` outputs of the attention backbones).
        foreground: ``[B, H, W]`` uint8 at input resolution: ``1`` object (any instance),
            ``0`` background, ``255`` ignore (crowd). Resized to each map by
            :func:`attention_targets` (area average, ``threshold``, mostly-ignore cells
            ignored).
        strides: optional list of K strides (input pixels per cell); default inferred per
            map as the power of two nearest ``H / H_k``.
        threshold: :func:`attention_targets`' object fraction of a positive cell (0.5).

    N_k is the number of non-ignored cells of map k in that image (``H_k * W_k`` when
    nothing is ignored, the paper's 1/N_k); an image whose map k is entirely ignored adds 0
    for that map. The cross-entropy is the logit form (stable), in float32.

    Returns:
        float32 scalar.
    """
    if isinstance(logits_list, (tf.Tensor, tf.Variable)) or not isinstance(logits_list, (list, tuple)):
        logits_list = [logits_list]
    if strides is None:
        strides = [None] * len(logits_list)
    if len(strides) != len(logits_list):
        raise ValueError(f"attention_loss: {len(logits_list)} maps but {len(strides)} strides")
    total = tf.constant(0.0, tf.float32)
    for logits, stride in zip(logits_list, strides):
        logits = tf.cast(logits, tf.float32)
        if logits.shape.rank == 4:
            logits = tf.squeeze(logits, axis=-1)
        shape = tf.shape(logits)
        targets, valid = attention_targets(foreground, shape[1], shape[2], stride=stride, threshold=threshold)
        ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits) * valid
        per_image = tf.reduce_sum(ce, axis=[1, 2]) / tf.maximum(tf.reduce_sum(valid, axis=[1, 2]), 1.0)
        total += tf.reduce_sum(per_image)
    return total


def weighted_l2(predictions, targets, *, p=1.0, axis=(-2, -1)):
    """decompNet's weighted mask distance, Eq. 2 (Szegedy et al. 2013's DetectorNet loss):
    ``D_p(x, y) = ||sqrt(Diag(y) + p I) (x - y)||^2 = sum_i (y_i + p) (x_i - y_i)^2``,
    summed over ``axis`` (the pixels). Foreground pixels weigh ``1 + p`` (more where
    summed masks overlap), background ``p``: the term that keeps the network away from
    the all-zero map. The root and the square are those of Szegedy et al.'s loss, which Eq. 2
    follows."""
    predictions = tf.cast(predictions, tf.float32)
    targets = tf.cast(targets, tf.float32)
    return tf.reduce_sum((targets + p) * tf.square(predictions - targets), axis=axis)


#: Cost given to padding (invalid) ground-truth columns in the set matching: equal for
#: every row, so it never changes which valid pairs are matched.
_PAD_COST = 1e7


def match_instance_maps(maps, masks, valid, *, ordered=False):
    """Hungarian matching of emitted instance maps to ground-truth masks (decompNet §2.2).

    Costs are plain squared L2 ``||o_t - m_k||^2`` (as the paper states) of stop-gradient
    maps, computed with matmuls; scipy's ``linear_sum_assignment`` solves each (image,
    category) problem (:func:`kerasdet.matching.hungarian_match`).

    Args:
      maps: ``[N, T, S, S']`` emitted maps.
      masks: ``[N, K, S, S']`` ground-truth masks (padding rows arbitrary).
      valid: ``[N, K]`` bool, real ground-truth rows.
      ordered: match the ``n`` real masks of an item to its FIRST ``n`` steps only (the
        order the paper's stop rule reads; see :func:`decomposition_set_loss`).

    Returns:
      ``[N, T]`` int32: the ground-truth row matched to each step, -1 for unmatched steps.
    """
    from kerasdet.matching import hungarian_match

    maps = tf.stop_gradient(tf.cast(maps, tf.float32))
    masks = tf.cast(masks, tf.float32)
    n, t = tf.shape(maps)[0], tf.shape(maps)[1]
    k = tf.shape(masks)[1]
    o = tf.reshape(maps, [n, t, -1])
    m = tf.reshape(masks, [n, k, -1])
    cost = (tf.reduce_sum(o * o, -1)[:, :, None] - 2.0 * tf.matmul(o, m, transpose_b=True)
            + tf.reduce_sum(m * m, -1)[:, None, :])
    cost = tf.where(valid[:, None, :], tf.maximum(cost, 0.0), _PAD_COST)
    if ordered:  # steps t >= n cost as much as a padding column: the n masks go to steps < n
        n_valid = tf.reduce_sum(tf.cast(valid, tf.int32), axis=1)
        late = tf.range(t)[None, :] >= n_valid[:, None]
        cost = tf.where(late[:, :, None], _PAD_COST, cost)
    assignment = hungarian_match(cost)
    safe = tf.maximum(assignment, 0)
    matched_valid = tf.gather(valid, safe, batch_dims=1) & (assignment >= 0)
    return tf.where(matched_valid, assignment, -1)


def decomposition_set_loss(maps, masks, valid, *, lam=1.0, gamma=1.0, eta=1.0, unmatched="sum",
                           order="free", assignment=None):
    """decompNet's instance loss (Eq. 3 of §2.2, written from the paper's account of its two terms), per item:

    ``L = sum_{t matched} D_lam(o_t, m_idx(t)) + eta * D_gamma(sum_t o_t, sum_k m_k)``

    The first term compares each matched step with its ground truth; the second (the
    "sum term") compares the sum of all emitted maps with the sum of the masks, which is
    what teaches the network to stop (surplus maps must be black).

    Args:
      maps: ``[N, T, S, S']`` instance maps of one category each.
      masks: ``[N, K, S, S']`` ground-truth masks; ``valid`` ``[N, K]`` marks real rows.
      lam, gamma: the ``p`` of ``D_lam`` / ``D_gamma`` (warmed up 0.3 -> 1.0 by
        :class:`kerasdet.callbacks.DecompositionWarmup`); scalars or variables.
      eta: weight of the sum term (1 in every experiment of the paper).
      unmatched: ``"sum"`` (default, the paper): surplus steps are penalized by the sum
        term only; ``"zero"``: each surplus step is also matched to an all-zero mask
        (adds ``lam * ||o_t||^2``).
      order: ``"free"`` (default, the paper's Hungarian loss over all T steps) or
        ``"ordered"``: the ``n`` ground-truth masks of an item are matched (Hungarian, same
        costs) to its first ``n`` steps only and every later step is pushed to black
        (``D_lam(o_t, 0)``, as ``unmatched="zero"``). The paper's inference stops at the
        first black map, but neither its matched term nor its sum term depends on the
        order of the maps, so nothing teaches "objects first, then black": at a CPU budget
        the ConvGRU cell put its black maps first (README, decompNet). The ordered loss is
        zero exactly for ``n`` maps equal to the masks (in any order among themselves)
        followed by black maps.
      assignment: precomputed :func:`match_instance_maps` result (else computed here).

    Returns:
      ``(instance_term [N], sum_term [N], assignment [N, T])``.
    """
    if unmatched not in ("sum", "zero"):
        raise ValueError(f"unmatched must be 'sum' or 'zero', got {unmatched!r}")
    if order not in ("free", "ordered"):
        raise ValueError(f"order must be 'free' or 'ordered', got {order!r}")
    maps = tf.cast(maps, tf.float32)
    masks = tf.cast(masks, tf.float32)
    if assignment is None:
        assignment = match_instance_maps(maps, masks, valid, ordered=order == "ordered")
    matched = assignment >= 0
    targets = tf.gather(masks, tf.maximum(assignment, 0), batch_dims=1)
    targets = targets * tf.cast(matched, tf.float32)[:, :, None, None]
    per_step = weighted_l2(maps, targets, p=lam)  # [N, T]
    weight = tf.ones_like(per_step) if unmatched == "zero" or order == "ordered" else tf.cast(matched, tf.float32)
    instance_term = tf.reduce_sum(per_step * weight, axis=1)
    gt_sum = tf.reduce_sum(masks * tf.cast(valid, tf.float32)[:, :, None, None], axis=1)
    sum_term = eta * weighted_l2(tf.reduce_sum(maps, axis=1), gt_sum, p=gamma)
    return instance_term, sum_term, assignment
