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
