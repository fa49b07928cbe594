"""decompNet: learning to decompose for detection and instance segmentation.

Park & Berg, "Learning to decompose for object detection and instance segmentation", ICLR
2016 workshop track (arXiv:1511.06449).
No proposals and no NMS anywhere: a fully convolutional *category network* turns the
image into one response map per category (:class:`~kerasdet.layers.decomposer.
CategoryDecomposer`); a recurrent *instance network*, shared by all categories, reads one
category map and emits one instance map per step, a black map meaning "stop"
(:class:`~kerasdet.layers.decomposer.InstanceDecomposer`); a small regressor puts a box on
each instance map (:class:`~kerasdet.layers.decomposer.InstanceBoxRegressor`).

Training (``model.fit``; the stage is a constructor argument and :meth:`DecompNet.set_stage`
switches it between fits, then ``compile`` again):

* ``"category"`` (stage 1): ``L_cat = sum_c D_p(F_c(I), sum_k m_k^c)`` (Eq. 1/2, summed
  instance masks: "very critical to the performance").
* ``"instance"`` (stage 2): the category network frozen (BN in inference mode), its
  predicted maps are the instance network's input; ``L_inst`` = Hungarian-matched
  ``D_lam`` + ``eta * D_gamma`` sum term (Eq. 3, :func:`kerasdet.losses.
  decomposition_set_loss`).
* ``"joint"`` (stage 3): ``L_cat + L_inst`` end to end, 1:1 (our choice; App. B gives no weights).
* ``"box"``: only the box regressor trains (our choice: after stage 3).

The box regressor's smooth-L1 loss is on in stages 2, 3 and "box", always on
*stop-gradient* maps (it never shapes the maps) and on the ground-truth masks as well
(our choice; §2.3 does not say what the regressor trains on), so a separate box stage is
optional (it saves a pass over the data on a CPU).

``p``, ``lam`` and ``gamma`` are non-trainable variables: the paper's 0.3 -> 1.0 warm-up
after one epoch is :class:`kerasdet.callbacks.DecompositionWarmup`.

Inference (:meth:`DecompNet.detect`, static shapes, graph code): every category map is
decomposed into ``steps`` maps; with ``stop="first_black"`` (default, the paper's "the last
instance map ... is usually a black image and it works as a stop sign") a category's
sequence ends at its first map whose peak is below ``stop_threshold`` (0.5, choice); with
``stop="bright"`` (our option) every map whose peak reaches ``stop_threshold`` is kept
wherever it sits in the sequence (the Hungarian loss leaves the order of the maps free,
and the ConvGRU cell learns to put its black maps *first*, which "first_black" would read
as "no instance"); with ``stop="none"`` every non-zero map is kept and ranked by score.
Boxes: the regressor's box, scored by Eq. 5 (mean map value inside the box); masks: the
map resized to the input and thresholded at ``mask_threshold`` = 0.1 (Fig. 6), scored by
Eq. 6. The ``num_classes * steps`` candidates are sorted by box score; there is no NMS.

Ground truth: ``labels["masks"]`` (``make_dataset(masks="instances")``) with
``target="masks"`` (segmentation variant, §3.1), or filled box rectangles rasterized at
map resolution from ``labels["boxes"]`` with ``target="boxes"`` (the detection variant:
"our method will work as object detection when there is no segmentation label", §4).
Instance masks are area-downsampled to the map size and binarized at 0.5 (our choice; §3.1 defines
the masks at image resolution only).
At most ``max_instances`` objects per category and image are used (the protocol has at
most 10 digits per image).
"""
import keras
import tensorflow as tf

from kerasdet.layers.decomposer import (
    CategoryDecomposer,
    InstanceBoxRegressor,
    InstanceDecomposer,
    box_raster,
    box_score,
    boxes_from_maps,
    cxcywh_to_yxyx,
    mask_score,
)
from kerasdet.losses import decomposition_set_loss, global_normalizer, smooth_l1_loss, weighted_l2
from kerasdet.models.base import Detector

STAGES = ("category", "instance", "joint", "box")
STOP_RULES = ("first_black", "bright", "none")


@keras.saving.register_keras_serializable(package="kerasdet")
class DecompNet(Detector):
    """Category network + recurrent instance decomposer + box regressor.

    Args:
      num_classes: categories (the paper: 3, digits 3/6/9).
      image_size: ``(H, W)`` network input (the paper: 100x100 grayscale).
      full_resolution: False: 50x50 maps ("decomp"); True: 100x100 maps ("decomp full").
      steps: instance maps per category, T (default 11 = 10 digits + 1 stop map).
      max_instances: ground-truth instances per category and image, K (default 10).
      cell, units, recurrent_layers, conv_gru_filters, recurrent_norm, instance_filters,
        instance_activation, initial_state: :class:`InstanceDecomposer` options (paper:
        ``"fc"``, 2048, 2, -, ``"batch"``, 32, ``"relu"``, -; ``initial_state`` ``"zero"``
        or, for the ConvGRU cell, ``"input"``).
      category_widths: :class:`CategoryDecomposer` widths (App. B default).
      box_hidden, box_dropout: :class:`InstanceBoxRegressor` (paper: 4096, dropout 0.5).
      target: ``"masks"`` (instance masks, segmentation variant) or ``"boxes"`` (filled
        boxes, detection variant).
      p, lam, gamma: initial values of the ``D_p`` (category), ``D_lam``/``D_gamma``
        (instance) weights; 0.3 (the paper's warm-up start).
      eta: sum-term weight (paper: 1).
      unmatched: ``"sum"`` (paper) or ``"zero"``, see :func:`decomposition_set_loss`.
      order: ``"free"`` (default, the paper's Hungarian loss over all steps) or
        ``"ordered"`` (the n instances on the first n steps, later steps pushed to black:
        what the ``first_black`` stop rule reads; :func:`decomposition_set_loss`).
      box_source: where detection boxes come from: ``"regressor"`` (default, §2.3's box
        regressor) or ``"maps"`` (the tight box of each map above ``map_box_fraction`` of its
        peak, :func:`~kerasdet.layers.decomposer.boxes_from_maps`; the paper's "simple
        program" alternative). The regressor is trained either way.
      map_box_fraction: Default 0.5.
      loss_normalize: ``"sum"`` (default: sum over pixels, mean over images) or
        ``"mean"`` (also divided by the number of map pixels).
      box_loss_weight: weight of the box regressor's smooth-L1 term (default 1).
      stage: ``"category"``, ``"instance"``, ``"joint"`` (default) or ``"box"``.
      stop: ``"first_black"`` (default), ``"bright"`` or ``"none"`` (see the module doc);
        stop_threshold: a map is black when its peak is below this (default 0.5).
      mask_threshold: segmentation threshold and Eq. 6's delta (default 0.1, Fig. 6).
      weight_decay, nan_policy, bounding_box_format: :class:`~kerasdet.models.base.Detector`
        (label boxes and ``predict``'s boxes in ``bounding_box_format``; masks unchanged).
    """

    LOSS_NAMES = ("category", "instance", "sum", "box")

    def __init__(self, *, num_classes=3, image_size=(100, 100), full_resolution=False, steps=11,
                 max_instances=10, cell="fc", units=2048, recurrent_layers=2, conv_gru_filters=64,
                 recurrent_norm="batch", instance_filters=32, instance_activation="relu", initial_state="zero",
                 category_widths=(32, 32, 64, 64, 64, 64), box_hidden=4096, box_dropout=0.5,
                 target="masks", p=0.3, lam=0.3, gamma=0.3, eta=1.0, unmatched="sum", order="free",
                 box_source="regressor", map_box_fraction=0.5, loss_normalize="sum", box_loss_weight=1.0,
                 stage="joint", stop="first_black",
                 stop_threshold=0.5, mask_threshold=0.1, weight_decay=5e-4, nan_policy="raise", **kwargs):
        super().__init__(weight_decay=weight_decay, nan_policy=nan_policy, **kwargs)
        if target not in ("masks", "boxes"):
            raise ValueError(f"target must be 'masks' or 'boxes', got {target!r}")
        if stop not in STOP_RULES:
            raise ValueError(f"stop must be one of {STOP_RULES}, got {stop!r}")
        if order not in ("free", "ordered"):
            raise ValueError(f"order must be 'free' or 'ordered', got {order!r}")
        if box_source not in ("regressor", "maps"):
            raise ValueError(f"box_source must be 'regressor' or 'maps', got {box_source!r}")
        if not 0.0 < float(map_box_fraction) <= 1.0:
            raise ValueError(f"map_box_fraction must be in (0, 1], got {map_box_fraction}")
        if loss_normalize not in ("sum", "mean"):
            raise ValueError(f"loss_normalize must be 'sum' or 'mean', got {loss_normalize!r}")
        if int(max_instances) > int(steps):
            raise ValueError(f"steps ({steps}) must be >= max_instances ({max_instances})")
        self.num_classes = int(num_classes)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.steps = int(steps)
        self.max_instances = int(max_instances)
        self.target = target
        self.eta = float(eta)
        self.unmatched = unmatched
        self.order = order
        self._box_source = box_source
        self.map_box_fraction = float(map_box_fraction)
        self.loss_normalize = loss_normalize
        self.box_loss_weight = float(box_loss_weight)
        self._stop = stop
        self._stop_threshold = float(stop_threshold)
        self.mask_threshold = float(mask_threshold)
        self.category_net = CategoryDecomposer(num_classes=num_classes, full_resolution=full_resolution,
                                               widths=category_widths, name="category_net")
        self.decomposer = InstanceDecomposer(
            steps=steps, cell=cell, units=units, recurrent_layers=recurrent_layers,
            conv_gru_filters=conv_gru_filters, filters=instance_filters, recurrent_norm=recurrent_norm,
            output_activation=instance_activation, initial_state=initial_state, name="instance_decomposer")
        self.box_regressor = InstanceBoxRegressor(hidden=box_hidden, dropout=box_dropout, name="box_regressor")
        self.map_size = self.category_net.output_size(*self.image_size)
        self.p = keras.Variable(float(p), trainable=False, name="p")
        self.lam = keras.Variable(float(lam), trainable=False, name="lam")
        self.gamma = keras.Variable(float(gamma), trainable=False, name="gamma")
        self._config = dict(
            num_classes=self.num_classes, image_size=list(self.image_size), full_resolution=bool(full_resolution),
            steps=self.steps, max_instances=self.max_instances, cell=cell, units=int(units),
            recurrent_layers=int(recurrent_layers), conv_gru_filters=int(conv_gru_filters),
            recurrent_norm=recurrent_norm, instance_filters=int(instance_filters),
            instance_activation=instance_activation, initial_state=initial_state,
            category_widths=[int(w) for w in category_widths],
            box_hidden=int(box_hidden), box_dropout=float(box_dropout), target=target, p=float(p),
            lam=float(lam), gamma=float(gamma), eta=self.eta, unmatched=unmatched, order=order,
            box_source=box_source, map_box_fraction=self.map_box_fraction,
            loss_normalize=loss_normalize, box_loss_weight=self.box_loss_weight, stage=stage, stop=stop,
            stop_threshold=self.stop_threshold, mask_threshold=self.mask_threshold)
        self.stage = None
        self.set_stage(stage)

    # --- stop rule (post-processing options that may change after predict was traced) -------
    @property
    def stop(self):
        """The stop rule, ``"first_black"``, ``"bright"`` or ``"none"``; setting it drops the
        traced predict function, so the next ``predict`` uses the new rule."""
        return self._stop

    @stop.setter
    def stop(self, value):
        if value not in STOP_RULES:
            raise ValueError(f"stop must be one of {STOP_RULES}, got {value!r}")
        self._stop = value
        self._config["stop"] = value
        self.predict_function = None

    @property
    def box_source(self):
        """``"regressor"`` or ``"maps"``; setting it re-traces ``predict`` (both on the same
        weights)."""
        return self._box_source

    @box_source.setter
    def box_source(self, value):
        if value not in ("regressor", "maps"):
            raise ValueError(f"box_source must be 'regressor' or 'maps', got {value!r}")
        self._box_source = value
        self._config["box_source"] = value
        self.predict_function = None

    @property
    def stop_threshold(self):
        """A map is black when its peak is below this; setting it re-traces ``predict``."""
        return self._stop_threshold

    @stop_threshold.setter
    def stop_threshold(self, value):
        self._stop_threshold = float(value)
        self._config["stop_threshold"] = float(value)
        self.predict_function = None

    # --- stages ---------------------------------------------------------------------------
    def set_stage(self, stage):
        """Selects the training stage (which parts train, which losses count). Call
        ``compile`` again afterwards: Keras caches the train function."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.stage = stage
        self._config["stage"] = stage
        self.category_net.trainable = stage in ("category", "joint")
        self.decomposer.trainable = stage in ("instance", "joint")
        self.box_regressor.trainable = stage in ("instance", "joint", "box")

    # --- forward --------------------------------------------------------------------------
    def build(self, input_shape):
        h, w = self.image_size
        sh, sw = self.map_size
        for layer, shape in ((self.category_net, (None, h, w, 1)), (self.decomposer, (None, sh, sw, 1)),
                             (self.box_regressor, (None, sh, sw))):
            if not layer.built:
                layer.build(shape)
        self.built = True

    def _gray(self, images):
        images = tf.cast(images, tf.float32)
        return tf.reduce_mean(images, axis=-1, keepdims=True) / 255.0

    def category_maps(self, images, training=None):
        """``[B, S, S', C]`` category response maps."""
        return self.category_net(self._gray(images), training=training)

    def instance_maps(self, category_maps, training=None):
        """``[B, S, S', C]`` category maps -> ``[B, C, T, S, S']`` instance maps."""
        sh, sw = self.map_size
        per_class = tf.reshape(tf.transpose(category_maps, [0, 3, 1, 2]), [-1, sh, sw, 1])
        maps = self.decomposer(per_class, training=training)
        return tf.reshape(maps, [-1, self.num_classes, self.steps, sh, sw])

    def call(self, images, training=None):
        """``(category_maps [B, S, S', C], instance_maps [B, C, T, S, S'])``."""
        cat = self.category_maps(images, training=training)
        return cat, self.instance_maps(cat, training=training)

    def regress_boxes(self, maps, training=None):
        """Instance maps ``[..., S, S']`` -> normalized ``(cx, cy, w, h)`` ``[..., 4]``."""
        sh, sw = self.map_size
        lead = tf.shape(maps)[:-2]
        boxes = self.box_regressor(tf.reshape(maps, [-1, sh, sw]), training=training)
        return tf.reshape(boxes, tf.concat([lead, [4]], 0))

    # --- targets --------------------------------------------------------------------------
    def instance_targets(self, labels):
        """Ground truth grouped by category at map resolution.

        Returns ``(masks [B, C, K, S, S'] float32 0/1, valid [B, C, K] bool,
        boxes [B, C, K, 4] normalized (cx, cy, w, h))``; objects in label order.
        """
        classes = tf.cast(labels["classes"], tf.int32)
        boxes = tf.cast(labels["boxes"], tf.float32)
        h, w = self.image_size
        sh, sw = self.map_size
        k = self.max_instances
        m = tf.shape(classes)[1]
        pad = tf.maximum(k - m, 0)
        classes = tf.pad(classes, [[0, 0], [0, pad]], constant_values=-1)
        boxes = tf.pad(boxes, [[0, 0], [0, pad], [0, 0]])
        norm = boxes / tf.constant([h, w, h, w], tf.float32)
        if self.target == "masks":
            if "masks" not in labels:
                raise ValueError("DecompNet(target='masks') needs labels['masks']: build the dataset with "
                                 "make_dataset(..., masks='instances'), or use target='boxes'")
            masks = tf.cast(labels["masks"], tf.float32)
            masks = tf.pad(masks, [[0, 0], [0, pad], [0, 0], [0, 0]])
            b, n = tf.shape(masks)[0], tf.shape(masks)[1]
            small = tf.image.resize(tf.reshape(masks, [-1, h, w, 1]), (sh, sw), method="area")
            masks = tf.reshape(tf.cast(small[..., 0] > 0.5, tf.float32), [b, n, sh, sw])
        else:
            masks = box_raster(norm, sh, sw)
        ymin, xmin, ymax, xmax = tf.unstack(norm, axis=-1)
        cxcywh = tf.stack([(xmin + xmax) / 2, (ymin + ymax) / 2, xmax - xmin, ymax - ymin], axis=-1)
        idx = tf.range(tf.shape(classes)[1])[None, :]
        grouped_masks, grouped_valid, grouped_boxes = [], [], []
        for c in range(self.num_classes):  # static loop over categories, not over objects
            is_c = classes == c
            order = tf.argsort(tf.where(is_c, idx, idx + tf.shape(classes)[1]), axis=1, stable=True)[:, :k]
            grouped_masks.append(tf.gather(masks, order, batch_dims=1))
            grouped_valid.append(tf.gather(is_c, order, batch_dims=1))
            grouped_boxes.append(tf.gather(cxcywh, order, batch_dims=1))
        valid = tf.stack(grouped_valid, axis=1)
        masks = tf.stack(grouped_masks, axis=1) * tf.cast(valid, tf.float32)[..., None, None]
        return masks, valid, tf.stack(grouped_boxes, axis=1)

    # --- losses ---------------------------------------------------------------------------
    def detection_losses(self, images, labels, training):
        masks, valid, gt_boxes = self.instance_targets(labels)
        batch = tf.shape(masks)[0]
        images_norm = global_normalizer(batch)
        sh, sw = self.map_size
        pixel_norm = float(sh * sw) if self.loss_normalize == "mean" else 1.0
        zero = tf.constant(0.0)
        terms = {"category": zero, "instance": zero, "sum": zero, "box": zero}
        stage = self.stage
        cat = self.category_maps(images, training=training)
        if stage in ("category", "joint"):
            cat_target = tf.transpose(tf.reduce_sum(masks, axis=2), [0, 2, 3, 1])  # [B, S, S', C]
            l_cat = weighted_l2(cat, cat_target, p=self.p, axis=(1, 2, 3))
            terms["category"] = tf.reduce_sum(l_cat) / pixel_norm / images_norm
        if stage == "category":
            return terms
        if stage == "instance":
            cat = tf.stop_gradient(cat)
        maps = self.instance_maps(cat, training=training and stage != "box")
        if stage == "box":
            maps = tf.stop_gradient(maps)
        c, t, k = self.num_classes, self.steps, self.max_instances
        flat_maps = tf.reshape(maps, [-1, t, sh, sw])
        flat_masks = tf.reshape(masks, [-1, k, sh, sw])
        flat_valid = tf.reshape(valid, [-1, k])
        inst, sums, assignment = decomposition_set_loss(
            flat_maps, flat_masks, flat_valid, lam=self.lam, gamma=self.gamma, eta=self.eta,
            unmatched=self.unmatched, order=self.order)
        if stage in ("instance", "joint"):
            terms["instance"] = tf.reduce_sum(inst) / pixel_norm / images_norm
            terms["sum"] = tf.reduce_sum(sums) / pixel_norm / images_norm
        # Box regressor: matched stop-gradient maps and the ground-truth masks themselves.
        matched = assignment >= 0  # [B*C, T]
        flat_boxes = tf.reshape(gt_boxes, [-1, k, 4])
        step_targets = tf.gather(flat_boxes, tf.maximum(assignment, 0), batch_dims=1)
        pred_steps = self.regress_boxes(tf.stop_gradient(flat_maps), training=training)
        pred_gt = self.regress_boxes(flat_masks, training=training)
        # Eq. 4, Fast R-CNN's smooth L1 (beta = 1).
        l_steps = tf.reduce_sum(smooth_l1_loss(step_targets, pred_steps, beta=1.0), -1)
        l_gt = tf.reduce_sum(smooth_l1_loss(flat_boxes, pred_gt, beta=1.0), -1)
        count = tf.reduce_sum(tf.cast(matched, tf.float32)) + tf.reduce_sum(tf.cast(flat_valid, tf.float32))
        box_sum = (tf.reduce_sum(tf.where(matched, l_steps, 0.0))
                   + tf.reduce_sum(tf.where(flat_valid, l_gt, 0.0)))
        terms["box"] = self.box_loss_weight * box_sum / global_normalizer(count)
        return terms

    # --- inference ------------------------------------------------------------------------
    def detect(self, images):
        """Detections with no NMS: ``boxes`` [B, C*T, 4] yxyx input pixels, ``scores``
        (Eq. 5), ``classes`` (-1 padding), ``num_detections``, ``masks`` [B, C*T, H, W]
        float 0/1 at the input resolution, ``mask_scores`` (Eq. 6), sorted by score."""
        _, maps = self(images, training=False)  # [B, C, T, S, S']
        c, t = self.num_classes, self.steps
        sh, sw = self.map_size
        h, w = self.image_size
        alive = self._emitted(maps)  # [B, C, T]
        if self.box_source == "maps":
            boxes = boxes_from_maps(maps, self.map_box_fraction)
        else:
            boxes = tf.clip_by_value(cxcywh_to_yxyx(self.regress_boxes(maps, training=False)), 0.0, 1.0)
        scores = box_score(maps, boxes)
        m_scores = mask_score(maps, self.mask_threshold)
        batch = tf.shape(maps)[0]
        k = c * t
        alive = tf.reshape(alive, [batch, k])
        scores = tf.reshape(scores, [batch, k])
        order = tf.argsort(tf.where(alive, scores, -1.0), axis=1, direction="DESCENDING", stable=True)
        alive = tf.gather(alive, order, batch_dims=1)
        classes = tf.broadcast_to(tf.range(c, dtype=tf.int32)[:, None], [c, t])
        classes = tf.gather(tf.tile(tf.reshape(classes, [1, k]), [batch, 1]), order, batch_dims=1)
        scale = tf.constant([h, w, h, w], tf.float32)
        boxes = tf.gather(tf.reshape(boxes, [batch, k, 4]), order, batch_dims=1) * scale
        flat_maps = tf.gather(tf.reshape(maps, [batch, k, sh, sw]), order, batch_dims=1)
        full = tf.image.resize(tf.reshape(flat_maps, [-1, sh, sw, 1]), (h, w), method="bilinear")
        masks = tf.reshape(tf.cast(full[..., 0] > self.mask_threshold, tf.float32), [batch, k, h, w])
        alive_f = tf.cast(alive, tf.float32)
        return {
            "boxes": boxes * alive_f[..., None],
            "scores": tf.where(alive, tf.gather(scores, order, batch_dims=1), 0.0),
            "classes": tf.where(alive, classes, -1),
            "num_detections": tf.reduce_sum(tf.cast(alive, tf.int32), axis=1),
            "masks": masks * alive_f[..., None, None],
            "mask_scores": tf.where(alive, tf.gather(tf.reshape(m_scores, [batch, k]), order, batch_dims=1), 0.0),
        }

    def count_instances(self, images):
        """``[B, C]`` number of instances the stop rule emits per category."""
        _, maps = self(images, training=False)
        return tf.reduce_sum(tf.cast(self._emitted(maps), tf.int32), axis=-1)

    def _emitted(self, maps):
        """``[B, C, T]`` bool: the steps the stop rule emits (``"first_black"``: those
        before the first map whose peak is below ``stop_threshold``; ``"bright"``: every
        map whose peak reaches ``stop_threshold``; ``"none"``: every map with a pixel
        above ``mask_threshold``)."""
        peak = tf.reduce_max(maps, axis=[-2, -1])
        if self.stop == "first_black":
            return tf.math.cumprod(tf.cast(peak >= self.stop_threshold, tf.float32), axis=-1) > 0.5
        if self.stop == "bright":
            return peak >= self.stop_threshold
        return peak > self.mask_threshold
