"""Detection post-processing: per-level top-k, box decoding and per-class NMS.

Graph-only (no Python loops over boxes or images); the same layer runs in ``predict_step``
and inside the exported serving signature.

* :func:`resolve_nms_method` — the one reading of a model's ``nms_method="auto"``.
* :func:`per_class_nms`, :func:`roi_detections`, :func:`decode_roi_boxes` and
  :func:`two_stage_detections` — the second stage of the two-stage detectors (Faster
  R-CNN, R-FCN / CoupleNet, SMN): softmax scores, boxes decoded from the RoIs and clipped,
  per-class NMS (Girshick, "Fast R-CNN", ICCV 2015, §3: each RoI's class posteriors and
  class-specific box offsets, then "non-maximum suppression independently for each class").
* :class:`DetectionPostProcessor` — the one-stage (RetinaNet, SSD) post-processing.
"""
import keras
import tensorflow as tf

from kerasdet import boxes as box_ops

NMS_METHODS = ("combined", "padded")
#: What a model's ``nms_method`` argument accepts: the two methods or ``"auto"``.
NMS_CHOICES = ("auto", "combined", "padded")
SCORE_ACTIVATIONS = ("sigmoid", "softmax")


def resolve_nms_method(nms_method, jit_compile=False):
    """The NMS backend of a model's ``nms_method`` setting: ``"combined"`` or ``"padded"``.

    ``"auto"`` is ``"padded"`` (``non_max_suppression_padded``, compiles with XLA) when
    ``jit_compile is True`` (the model compiled with ``jit_compile=True``) and
    ``"combined"`` (``combined_non_max_suppression``, the fast C++ kernel without an XLA
    kernel) otherwise, Keras' ``"auto"`` included. ``"combined"`` and ``"padded"`` are
    returned as they are.

    Raises:
        ValueError: ``nms_method`` is not one of :data:`NMS_CHOICES`.
    """
    if not isinstance(nms_method, str) or nms_method not in NMS_CHOICES:
        raise ValueError(f"nms_method must be 'auto', 'combined' or 'padded', got {nms_method!r}.")
    if nms_method == "auto":
        return "padded" if jit_compile is True else "combined"
    return nms_method


def format_detections(boxes, scores, classes, valid, max_detections):
    """The kerasdet detection dict from ``max_detections`` NMS rows of which the first
    ``valid`` are real: padding rows get zero boxes/scores and class -1."""
    valid = tf.cast(valid, tf.int32)
    keep = tf.range(max_detections)[None, :] < valid[:, None]
    return {
        "boxes": tf.where(keep[..., None], boxes, 0.0),
        "scores": tf.where(keep, scores, 0.0),
        "classes": tf.where(keep, classes, -1),
        "num_detections": valid,
    }


def padded_nms(boxes, scores, values, *, max_output_size, iou_threshold, score_threshold):
    """``tf.image.non_max_suppression_padded`` of a ``[B, N, 4]`` / ``[B, N]`` batch:
    ``(kept, valid [B])`` with ``kept`` the ``[B, max_output_size, ...]`` rows of each
    tensor of ``values`` (each ``[B, N, ...]``) in NMS order; rows past ``valid`` are
    padding.

    With a static batch of 1 (the LiteRT export) it runs the single-image form, one
    ``NonMaxSuppressionV4`` op (a LiteRT builtin, and an XLA kernel) instead of the batched
    tiled ``while_loop``, and gathers the rows of the single image (measured trap, TF 2.21 /
    LiteRT 2.3: a ``batch_dims=1`` gather of that op's indices converts with a static
    ``[1, K]`` index shape that the kernel resizes to ``[K]`` at run time, "GATHER failed
    to prepare"). Same rows as the batched form (tested).
    """
    if boxes.shape[0] == 1:
        index, valid = tf.image.non_max_suppression_padded(
            boxes[0], scores[0], max_output_size=max_output_size, iou_threshold=iou_threshold,
            score_threshold=score_threshold, pad_to_max_output_size=True)
        return [tf.gather(v[0], index)[None] for v in values], tf.reshape(valid, [1])
    index, valid = tf.image.non_max_suppression_padded(
        boxes, scores, max_output_size=max_output_size, iou_threshold=iou_threshold,
        score_threshold=score_threshold, pad_to_max_output_size=True)
    return [tf.gather(v, index, batch_dims=1) for v in values], valid


def per_class_nms(boxes, probs, image_shape, *, padded, max_detections, iou_threshold, score_threshold,
                  pre_nms_topk=1000):
    """Per-class NMS of two-stage detections (Faster R-CNN, R-FCN, CoupleNet).

    Args:
        boxes: ``[B, R, K, 4]`` class-specific or ``[B, R, 1, 4]`` class-agnostic decoded,
            clipped boxes (network-input px).
        probs: ``[B, R, K]`` class scores (background column removed).
        image_shape: ``(height, width)`` of the network input.
        padded: ``False``: ``tf.image.combined_non_max_suppression`` (fast C++ kernel, no
            XLA); ``True``: the top ``pre_nms_topk`` (RoI, class) pairs, shifted apart by
            class (the class-offset trick) through ``non_max_suppression_padded`` (XLA).
        max_detections, iou_threshold, score_threshold: NMS settings.

    Returns:
        The detection dict of :func:`format_detections`.
    """
    if not padded:
        nb, ns, nc, nv = tf.image.combined_non_max_suppression(
            boxes, probs, max_output_size_per_class=max_detections, max_total_size=max_detections,
            iou_threshold=iou_threshold, score_threshold=score_threshold, clip_boxes=False,
        )
        return format_detections(nb, ns, tf.cast(nc, tf.int32), nv, max_detections)
    batch = tf.shape(boxes)[0]
    num_classes = probs.shape[-1]
    num = probs.shape[1] * num_classes
    scores, index = tf.math.top_k(tf.reshape(probs, [batch, num]), k=min(pre_nms_topk, num))
    if boxes.shape[2] == 1:  # class-agnostic: one box per RoI
        cand = tf.gather(boxes[:, :, 0, :], index // num_classes, batch_dims=1)
    else:
        cand = tf.gather(tf.reshape(boxes, [batch, num, 4]), index, batch_dims=1)
    classes = index % num_classes
    extent = tf.cast(tf.maximum(image_shape[0], image_shape[1]), tf.float32) + 1.0
    offset = tf.cast(classes, tf.float32)[..., None] * extent
    scores = tf.where(scores > score_threshold, scores, 0.0)
    (cand, scores, classes), valid = padded_nms(cand + offset, scores, (cand, scores, classes),
                                                max_output_size=max_detections, iou_threshold=iou_threshold,
                                                score_threshold=score_threshold)
    return format_detections(cand, scores, classes, valid, max_detections)


def decode_roi_boxes(box_deltas, rois, image_shape, *, box_weights):
    """Second-stage boxes of ``rois`` ``[B, R, 4]`` (yxyx px), clipped to ``image_shape``.

    Args:
        box_deltas: ``[B, R, K+1, 4]`` class-specific deltas (background at index 0,
            dropped) or ``[B, R, 4]`` class-agnostic ones.
        rois: ``[B, R, 4]`` the boxes the deltas are relative to.
        image_shape: ``(height, width)`` of the network input.
        box_weights: the box coder's ``(wy, wx, wh, ww)``.

    Returns:
        ``[B, R, K, 4]`` (class-specific) or ``[B, R, 1, 4]`` (class-agnostic) boxes, the
        layout :func:`per_class_nms` takes.
    """
    if box_deltas.shape.rank == 3:
        boxes = box_ops.decode(box_deltas, rois, weights=box_weights)
        return box_ops.clip(boxes, image_shape[0], image_shape[1])[:, :, None, :]
    boxes = box_ops.decode(box_deltas[:, :, 1:, :], rois[:, :, None, :], weights=box_weights)
    return box_ops.clip(boxes, image_shape[0], image_shape[1])


def roi_detections(probs, boxes, valid, image_shape, *, nms_method, max_detections, iou_threshold,
                   score_threshold, pre_nms_topk=1000):
    """Per-class NMS of scored RoI boxes: the detection dict of :func:`format_detections`.

    Args:
        probs: ``[B, R, K+1]`` class probabilities with background at index 0 (dropped).
        boxes: ``[B, R, K, 4]`` or ``[B, R, 1, 4]`` decoded boxes (:func:`decode_roi_boxes`).
        valid: ``[B, R]`` bool: padding RoIs get score 0.
        image_shape: ``(height, width)`` of the network input.
        nms_method: ``"combined"`` or ``"padded"`` (:func:`resolve_nms_method`).
        max_detections, iou_threshold, score_threshold, pre_nms_topk: as :func:`per_class_nms`.
    """
    if nms_method not in NMS_METHODS:
        raise ValueError(f"nms_method must be one of {NMS_METHODS}, got {nms_method!r}.")
    scores = probs[..., 1:] * tf.cast(valid, tf.float32)[..., None]  # [B, R, K]
    return per_class_nms(boxes, scores, image_shape, padded=nms_method == "padded", max_detections=max_detections,
                         iou_threshold=iou_threshold, score_threshold=score_threshold, pre_nms_topk=pre_nms_topk)


def two_stage_detections(class_logits, box_deltas, rois, valid, image_shape, *, box_weights, nms_method,
                         max_detections, iou_threshold, score_threshold, pre_nms_topk=1000):
    """The two-stage detectors' inference: softmax of ``class_logits`` ``[B, R, K+1]``,
    :func:`decode_roi_boxes` of ``box_deltas`` on ``rois`` and :func:`roi_detections`
    (arguments as there). Returns the detection dict of :func:`format_detections`."""
    probs = tf.nn.softmax(class_logits, axis=-1)
    boxes = decode_roi_boxes(box_deltas, rois, image_shape, box_weights=box_weights)
    return roi_detections(probs, boxes, valid, image_shape, nms_method=nms_method, max_detections=max_detections,
                          iou_threshold=iou_threshold, score_threshold=score_threshold, pre_nms_topk=pre_nms_topk)


@keras.saving.register_keras_serializable(package="kerasdet")
class DetectionPostProcessor(keras.layers.Layer):
    """Turns per-level sigmoid logits and box deltas into final detections (§5.4).

    Per level: sigmoid, keep the ``pre_nms_topk`` highest (anchor, class) scores, decode
    only those. Then merge the levels, clip to the image, drop scores
    ``<= score_threshold`` and run per-class NMS at ``nms_iou_threshold`` keeping
    ``max_detections`` (per-class NMS and 100 detections: Detectron's choices, the thesis
    states neither: our choice).

    NMS implementations (``nms_method``):

    * ``"combined"`` — ``tf.image.combined_non_max_suppression``: the fast C++ kernel on CPU;
      it does not compile with XLA.
    * ``"padded"`` — class-offset trick (boxes of different classes are shifted apart so
      one class-agnostic NMS acts per class, as torchvision's ``batched_nms``) through
      ``tf.image.non_max_suppression_padded``, which compiles with XLA.

    Both give the same detections (tested).

    Call with ``(class_logits, box_deltas, anchors, image_shape=(h, w))``: lists (finest level
    first) of ``[B, N_l, K]`` logits, ``[B, N_l, 4]`` deltas and ``[N_l, 4]`` anchors, and
    the network-input ``(height, width)`` (keyword). Returns a dict ``boxes [B, D, 4]`` (yxyx,
    network-input pixels), ``scores [B, D]``, ``classes [B, D]`` int32 (-1 padding) and
    ``num_detections [B]`` int32 with ``D = max_detections``.

    Args:
        pre_nms_topk: candidates kept per level. Default 1000.
        score_threshold: minimum score. Default 0.05.
        nms_iou_threshold: Default 0.5.
        max_detections: Default 100.
        box_weights: the box coder's ``(wy, wx, wh, ww)``. Default (1, 1, 1, 1).
        nms_method: ``"combined"`` (default) or ``"padded"``.
        score_activation: ``"sigmoid"`` (default: K independent logits, RetinaNet) or
            ``"softmax"`` (``K + 1`` logits with background at index 0, SSD: scores are
            the softmax of the object classes, the background column is dropped).
    """

    def __init__(
        self,
        *,
        pre_nms_topk=1000,
        score_threshold=0.05,
        nms_iou_threshold=0.5,
        max_detections=100,
        box_weights=(1.0, 1.0, 1.0, 1.0),
        nms_method="combined",
        score_activation="sigmoid",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if nms_method not in NMS_METHODS:
            raise ValueError(f"nms_method must be one of {NMS_METHODS}, got {nms_method!r}.")
        self.pre_nms_topk = int(pre_nms_topk)
        self.score_threshold = float(score_threshold)
        self.nms_iou_threshold = float(nms_iou_threshold)
        self.max_detections = int(max_detections)
        self.box_weights = tuple(float(w) for w in box_weights)
        self.nms_method = nms_method
        if score_activation not in SCORE_ACTIVATIONS:
            raise ValueError(f"score_activation must be one of {SCORE_ACTIVATIONS}, got {score_activation!r}.")
        self.score_activation = score_activation

    def _scores(self, logits):
        logits = tf.cast(logits, tf.float32)
        if self.score_activation == "softmax":
            return tf.nn.softmax(logits, axis=-1)[..., 1:]
        return tf.sigmoid(logits)

    def _level_candidates(self, logits, deltas, anchors):
        """The level's ``pre_nms_topk`` best (anchor, class) pairs, decoded.

        Two-stage exact top-k: a pair ranked in the top k of all ``N x K`` pairs lies on an
        anchor whose best class is in the top k of the ``N`` per-anchor maxima (fewer than
        k anchors can beat it), so ``top_k`` runs over the ``N`` anchor maxima and then over
        the ``k x K`` pairs of the kept anchors instead of over all ``N x K`` pairs (P3 of a
        512x512 COCO RetinaNet: 2.9M -> 37k + 80k entries). For sigmoid heads the ranking
        is done on the logits (sigmoid is monotonic) and the sigmoid is evaluated on the k
        kept pairs only. Equal to the plain top-k up to the order of exactly tied scores.
        """
        logits = tf.cast(logits, tf.float32)
        rank = tf.nn.softmax(logits, axis=-1)[..., 1:] if self.score_activation == "softmax" else logits
        num_classes = rank.shape[-1] or tf.shape(rank)[-1]
        batch = tf.shape(rank)[0]
        num_anchors = rank.shape[1] if rank.shape[1] is not None else tf.shape(rank)[1]
        k_anchors = tf.minimum(self.pre_nms_topk, num_anchors)
        if isinstance(num_anchors, int):
            k_anchors = min(self.pre_nms_topk, num_anchors)
        _, top_anchors = tf.math.top_k(tf.reduce_max(rank, axis=-1), k=k_anchors, sorted=False)
        pairs = tf.reshape(tf.gather(rank, top_anchors, batch_dims=1), [batch, -1])
        num_pairs = pairs.shape[1] if pairs.shape[1] is not None else tf.shape(pairs)[1]
        k = min(self.pre_nms_topk, num_pairs) if isinstance(num_pairs, int) else tf.minimum(self.pre_nms_topk, num_pairs)
        scores, index = tf.math.top_k(pairs, k=k, sorted=False)
        anchor_index = tf.gather(top_anchors, index // num_classes, batch_dims=1)
        classes = index % num_classes
        if self.score_activation == "sigmoid":
            scores = tf.sigmoid(scores)
        deltas = tf.gather(tf.cast(deltas, tf.float32), anchor_index, batch_dims=1)
        boxes = box_ops.decode(deltas, tf.gather(anchors, anchor_index), weights=self.box_weights)
        return boxes, scores, classes

    def call(self, class_logits, box_deltas, anchors, *, image_shape):
        candidates = [self._level_candidates(c, d, a) for c, d, a in zip(class_logits, box_deltas, anchors)]
        boxes = tf.concat([c[0] for c in candidates], axis=1)
        scores = tf.concat([c[1] for c in candidates], axis=1)
        classes = tf.concat([c[2] for c in candidates], axis=1)
        boxes = box_ops.clip(boxes, image_shape[0], image_shape[1])
        num_classes = class_logits[0].shape[-1] or tf.shape(class_logits[0])[-1]
        if self.score_activation == "softmax":
            num_classes = num_classes - 1
        if self.nms_method == "combined":
            return self._combined_nms(boxes, scores, classes, num_classes)
        return self._padded_nms(boxes, scores, classes, image_shape)

    def _combined_nms(self, boxes, scores, classes, num_classes):
        per_class = tf.one_hot(classes, num_classes, dtype=scores.dtype) * scores[..., None]
        nmsed_boxes, nmsed_scores, nmsed_classes, valid = tf.image.combined_non_max_suppression(
            boxes[:, :, None, :],
            per_class,
            max_output_size_per_class=self.max_detections,
            max_total_size=self.max_detections,
            iou_threshold=self.nms_iou_threshold,
            score_threshold=self.score_threshold,
            clip_boxes=False,
        )
        return self._format(nmsed_boxes, nmsed_scores, tf.cast(nmsed_classes, tf.int32), valid)

    def _padded_nms(self, boxes, scores, classes, image_shape):
        # Shift each class's boxes by class * (image extent + 1) so boxes of different classes
        # never overlap: one class-agnostic NMS then acts per class.
        extent = tf.cast(tf.maximum(image_shape[0], image_shape[1]), tf.float32) + 1.0
        offset = tf.cast(classes, tf.float32)[..., None] * extent
        scores = tf.where(scores > self.score_threshold, scores, 0.0)
        (out_boxes, out_scores, out_classes), valid = padded_nms(
            boxes + offset, scores, (boxes, scores, classes), max_output_size=self.max_detections,
            iou_threshold=self.nms_iou_threshold, score_threshold=self.score_threshold)
        return self._format(out_boxes, out_scores, out_classes, valid)

    def _format(self, boxes, scores, classes, valid):
        return format_detections(boxes, scores, classes, valid, self.max_detections)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "pre_nms_topk": self.pre_nms_topk,
                "score_threshold": self.score_threshold,
                "nms_iou_threshold": self.nms_iou_threshold,
                "max_detections": self.max_detections,
                "box_weights": list(self.box_weights),
                "nms_method": self.nms_method,
                "score_activation": self.score_activation,
            }
        )
        return config
