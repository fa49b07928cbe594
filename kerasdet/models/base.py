"""Shared training machinery of every kerasdet detector.

:class:`Detector` owns ``train_step``/``test_step``/``predict_step`` so each model family
only writes ``detection_losses`` (a dict of already-normalized loss terms) and
``detect`` (decoded, NMS-filtered detections). It makes ``model.fit`` correct under any
``tf.distribute`` strategy:

* every loss term is a LOCAL sum divided by a GLOBAL normalizer
  (:func:`kerasdet.losses.global_normalizer`); gradients are all-reduce-summed across
  replicas, so the update equals the single-device update for the same global batch;
* the coupled (Caffe-style, ``grad += wd * w``) weight decay is added per replica divided
  by the number of replicas, for the same reason;
* logged losses are all-reduced so every replica (and the History) sees the global value;
* ``MultiWorkerMirroredStrategy`` + ``fit`` (keras-team/keras#20585; measured with Keras 3.15):
  Keras' symbolic build cross-worker-reduces the first PerReplica batch and fails, and its
  ``reduce(MEAN, axis=0)`` of the step outputs fails on scalar logs. Under a multi-worker
  strategy the symbolic build uses this worker's local batch instead (which also builds
  the optimizer inside the strategy scope), and the step logs are rank-1 ``[1]`` tensors
  (Keras' reduction turns them back into scalars). Nothing changes under other strategies.

Non-finite guard (``nan_policy``): every training step checks its loss and gradients; the
"bad step" flag is all-reduced, so every replica and worker takes the same decision. On a
bad step the optimizer update is skipped (no weight, momentum or step-counter change), so
weights never become NaN, and the step is reported with the ``image_id`` s of the global
batch (the pipeline carries them in ``labels["image_id"]``; models ignore extra label
keys), flagging the images whose boxes or pixels are themselves non-finite:

* ``"raise"`` (default): ``fit`` stops with :class:`NonFiniteLossError` (``.image_ids``,
  ``.suspect_image_ids``) right after the bad step; the weights are those before it.
* ``"skip"``: a ``logging.warning`` names the images and training goes on;
  ``model.nonfinite_steps`` counts the skipped steps.
* ``"off"``: no check (one less all-reduce per step).

Limitation: the forward pass of a skipped step has already run, so a batch with
non-finite *pixels* can still move the moving statistics of a trainable BatchNorm (frozen
BN, the ResNet default, is unaffected; uint8 pipeline images cannot be non-finite).
"""
import contextlib
import copy
import logging

import keras
import tensorflow as tf

from kerasdet.distribute import is_multi_worker

from kerasdet import boxes as box_ops
from kerasdet.precision import fold_batchnorm_calls

logger = logging.getLogger(__name__)

NAN_POLICIES = ("raise", "skip", "off")
#: Image ids kept for the report of a non-finite step (the global batch, truncated).
MAX_REPORTED_IDS = 1024


class NonFiniteLossError(RuntimeError):
    """A training step had a non-finite loss or gradient (its update was not applied).

    Attributes:
      image_ids: dataset image ids of the step's global batch (empty when the labels
        carry no ``image_id``; the message then names batch positions).
      suspect_image_ids: those whose ground-truth boxes or pixels are non-finite.
      step: the bad step's number among the training steps of this process (from 1).
    """

    def __init__(self, message, image_ids=(), suspect_image_ids=(), step=None):
        super().__init__(message)
        self.image_ids = list(image_ids)
        self.suspect_image_ids = list(suspect_image_ids)
        self.step = step


class _GuardState:
    """Holds the guard's variables out of Keras/TF tracking (never saved or exported)."""

    def __init__(self):
        agg = tf.VariableAggregation.ONLY_FIRST_REPLICA
        self.count = tf.Variable(0, dtype=tf.int64, trainable=False, aggregation=agg, name="nonfinite_count")
        self.ids = tf.Variable(tf.fill([MAX_REPORTED_IDS], tf.constant(-1, tf.int64)), trainable=False,
                               aggregation=agg, name="nonfinite_ids")
        self.flags = tf.Variable(tf.zeros([MAX_REPORTED_IDS], tf.int32), trainable=False, aggregation=agg,
                                 name="nonfinite_flags")
        self.seen = 0
        self.steps = 0


def _num_replicas():
    ctx = tf.distribute.get_replica_context()
    return ctx.num_replicas_in_sync if ctx is not None else tf.distribute.get_strategy().num_replicas_in_sync


def _is_multi_worker(strategy):
    """True for a ``MultiWorkerMirroredStrategy`` that really spans several workers."""
    return is_multi_worker(strategy)


def _local_value(strategy, value):
    """This worker's first replica's value of a (possibly) distributed value."""
    if isinstance(value, tf.distribute.DistributedValues):
        return strategy.experimental_local_results(value)[0]
    return value


def _all_reduce_sum(value):
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)
    return value


def _all_gather(value):
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        return ctx.all_gather(value, axis=0)
    return value


def _fixed_length(values, fill):
    """``values`` [n] padded with ``fill`` / truncated to ``MAX_REPORTED_IDS``."""
    values = values[:MAX_REPORTED_IDS]
    pad = MAX_REPORTED_IDS - tf.shape(values)[0]
    return tf.pad(values, [[0, pad]], constant_values=fill)


def json_like(value):
    """``value`` with every tuple turned into a list, recursively through dicts and lists."""
    if isinstance(value, dict):
        return {k: json_like(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_like(v) for v in value]
    return value


def split_data(data):
    """``(images, labels)`` from a Keras data tuple (labels may be None)."""
    if isinstance(data, (tuple, list)):
        images = data[0]
        labels = data[1] if len(data) > 1 else None
        return images, labels
    if isinstance(data, dict) and "images" in data:
        return data["images"], data
    return data, None


class Detector(keras.Model):
    """Base class: strategy-safe training loop, loss trackers and weight decay.

    Args:
        weight_decay: coupled L2 weight decay applied to conv/dense kernels only (no decay
            on biases or normalization layers — our choice, the thesis is silent on it). The thesis' 1e-4 is
            Caffe-style (``grad += 1e-4 * w``), which Keras' decoupled
            ``optimizer(weight_decay=...)`` is not once momentum is involved. Default 1e-4.
        nan_policy: what a training step with a non-finite loss/gradient does:
            ``"raise"`` (default), ``"skip"`` or ``"off"`` (see the module doc).
        bounding_box_format: the box format of the public edges, one of Keras' names
            (:data:`kerasdet.boxes.BOX_FORMATS`: ``"xyxy"``, ``"yxyx"``, ``"xywh"``,
            ``"center_xywh"``, ``"center_yxhw"``, ``"rel_xyxy"``, ``"rel_yxyx"``,
            ``"rel_xywh"``, ``"rel_center_xywh"``). ``labels["boxes"]`` given to ``fit`` /
            ``evaluate`` / ``train_step`` / ``test_step`` / :meth:`compute_loss` are read in
            it and the ``"boxes"`` that ``predict`` / ``predict_step`` return are written in
            it; ``rel_*`` coordinates are fractions of the network input's height and width
            (the canvas the images are resized onto before they reach the model). Inside the
            model (``detect``, ``call``, ``detection_losses``, the SavedModel export) boxes
            are always ``yxyx`` pixels of the network input. Default ``"yxyx"``.
        fold_batchnorm: fold the functional ``backbone``'s BatchNormalization layers into the
            convolutions that feed them inside the traced ``predict`` graph
            (:func:`kerasdet.precision.fold_batchnorm_calls`; an inference graph runs every
            BN on its moving statistics): the same detections to float round-off, one pass
            over each activation map less (R50-FPN RetinaNet 512², batch 1, 2 loaded cores:
            3.09 s vs 3.47 s). Default True; models without a functional ``backbone`` are
            unaffected. The training graph keeps its frozen BN as they are: folded there
            (the same function, ``only_frozen=True``) the step was slower (R50-FPN batch 2:
            1.06x, the conv's filter becomes a computed tensor each step).
    """

    #: Names of the terms ``detection_losses`` returns (a tracker is made for each).
    LOSS_NAMES = ()

    def __init__(self, *, weight_decay=1e-4, nan_policy="raise", bounding_box_format="yxyx", fold_batchnorm=True,
                 **kwargs):
        super().__init__(**kwargs)
        self.fold_batchnorm = bool(fold_batchnorm)
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}.")
        if bounding_box_format not in box_ops.BOX_FORMATS:
            raise ValueError(
                f"bounding_box_format must be one of {box_ops.BOX_FORMATS}, got {bounding_box_format!r}.")
        self.nan_policy = nan_policy
        self.bounding_box_format = bounding_box_format
        self.weight_decay = float(weight_decay)
        # Training-time sampling (anchors, RoIs, jitter) draws from this generator, whose
        # state kerasdet.random_state saves with every backup: a resumed run continues the
        # same random stream (TensorFlow's stateful ops restart theirs in a new process).
        self.sampling_seed = keras.random.SeedGenerator(name="sampling_seed")
        names = ["loss", *self.LOSS_NAMES] + (["weight_decay"] if self.weight_decay else [])
        # Trackers are made here, under whatever strategy scope builds the model, never
        # lazily inside a replica function.
        self._tracker_list = [keras.metrics.Mean(name=n) for n in names]

    # --- subclass API -------------------------------------------------------------------
    def detection_losses(self, images, labels, training):
        """Returns a dict ``{name: scalar}`` of loss terms, each normalized globally."""
        raise NotImplementedError

    def detect(self, images):
        """Returns the detection dict (boxes/scores/classes/num_detections)."""
        raise NotImplementedError

    # --- training loop ------------------------------------------------------------------
    @property
    def metrics(self):
        return list(self._tracker_list)

    def decay_loss(self):
        """``0.5 * wd * sum(||kernel||^2)`` over trainable conv/dense kernels."""
        if not self.weight_decay:
            return tf.constant(0.0)
        kernels = [
            v for v in self.trainable_variables if v.path.endswith("kernel") or v.path.endswith("depthwise_kernel")
        ]
        if not kernels:
            return tf.constant(0.0)
        return 0.5 * self.weight_decay * tf.add_n([tf.reduce_sum(tf.square(tf.cast(v, tf.float32))) for v in kernels])

    # --- bounding box format at the public edges ---------------------------------------
    def boxes_to_internal(self, boxes, image_shape):
        """``[..., 4]`` boxes in ``bounding_box_format`` -> ``yxyx`` pixels of an
        ``image_shape = (height, width)`` network input."""
        return box_ops.convert_format(boxes, source=self.bounding_box_format, target="yxyx",
                                      height=image_shape[0], width=image_shape[1])

    def boxes_from_internal(self, boxes, image_shape):
        """``[..., 4]`` ``yxyx`` pixel boxes -> ``bounding_box_format`` (inverse of
        :meth:`boxes_to_internal`)."""
        return box_ops.convert_format(boxes, source="yxyx", target=self.bounding_box_format,
                                      height=image_shape[0], width=image_shape[1])

    def labels_to_internal(self, images, labels):
        """``labels`` with ``"boxes"`` converted from ``bounding_box_format`` to ``yxyx``
        network-input pixels (other keys untouched; the labels as given for ``"yxyx"``)."""
        if self.bounding_box_format == "yxyx" or not isinstance(labels, dict) or "boxes" not in labels:
            return labels
        shape = tf.shape(images)
        return dict(labels, boxes=self.boxes_to_internal(labels["boxes"], (shape[1], shape[2])))

    def detections_from_internal(self, images, detections):
        """``detect``'s dict with ``"boxes"`` converted to ``bounding_box_format``."""
        if self.bounding_box_format == "yxyx":
            return detections
        shape = tf.shape(images)
        return dict(detections, boxes=self.boxes_from_internal(detections["boxes"], (shape[1], shape[2])))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The total loss of a batch: images ``x`` and label dict ``y`` (boxes in
        ``bounding_box_format``), the same scalar ``train_step`` (``training=True``: with
        weight decay and layer losses) or ``test_step`` (``training=False``) minimizes or
        reports. ``y_pred`` and ``sample_weight`` are not used (the detection losses need
        the model's intermediate outputs, not only its predictions)."""
        del y_pred, sample_weight
        total, _ = self._total_loss(x, y, training=training)
        return total

    def _total_loss(self, images, labels, training):
        labels = self.labels_to_internal(images, labels)
        terms = self.detection_losses(images, labels, training=training)
        total = tf.add_n([tf.cast(v, tf.float32) for v in terms.values()])
        if training and self.weight_decay:
            decay = self.decay_loss()
            terms = dict(terms, weight_decay=decay / _num_replicas())
            total = total + decay / _num_replicas()
        # Extra layer losses (activity/kernel regularizers): per replica, like the decay.
        if self.losses:
            total = total + tf.add_n([tf.cast(l, tf.float32) for l in self.losses]) / _num_replicas()
        return total, terms

    def _log(self, total, terms, skipped=None):
        values = dict(terms, loss=total)
        logs = {}
        for tracker in self._tracker_list:
            if tracker.name not in values:
                continue
            value = _all_reduce_sum(tf.cast(values[tracker.name], tf.float32))
            if skipped is None:
                tracker.update_state(value)
            else:  # a skipped step does not enter the running means (no NaN in the logs)
                tracker.update_state(tf.where(skipped, 0.0, value), sample_weight=tf.where(skipped, 0.0, 1.0))
            logs[tracker.name] = tracker.result()
        if _is_multi_worker(self.distribute_strategy):
            # keras-team/keras#20585: under a multi-worker strategy Keras reduces the step
            # outputs with ``strategy.reduce(MEAN, v, axis=0)``, which rejects scalars.
            # Every replica holds the same all-reduced value, so the mean over axis 0 of
            # these [1]-vectors is that value, as a scalar again.
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

    def folded_batchnorm(self, *, only_frozen):
        """The context :meth:`predict_step` traces in (``only_frozen=False``): the backbone's
        BN folded into its convs when ``fold_batchnorm`` (see the class doc), else nothing."""
        backbone = getattr(self, "backbone", None)
        if not self.fold_batchnorm or not isinstance(backbone, keras.Model):
            return contextlib.nullcontext(0)
        return fold_batchnorm_calls(backbone, only_frozen=only_frozen)

    def train_step(self, data):
        images, labels = split_data(data)
        if labels is None:
            raise ValueError("train_step needs (images, labels) batches; labels were missing.")
        with tf.GradientTape() as tape:
            total, terms = self._total_loss(images, labels, training=True)
            scaled = self.optimizer.scale_loss(total) if hasattr(self.optimizer, "scale_loss") else total
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        if self.nan_policy == "off":
            self.optimizer.apply(grads, variables)
        else:
            finite = tf.reduce_all(tf.math.is_finite(total))
            for g in grads:
                if g is not None:
                    finite = finite & tf.reduce_all(tf.math.is_finite(g))
            # The same decision on every replica and worker.
            bad = _all_reduce_sum(tf.cast(~finite, tf.float32)) > 0.0
            self._apply_unless(bad, grads, variables)
            self._record_nonfinite(bad, images, labels)
            return self._log(total, terms, skipped=bad)
        return self._log(total, terms)

    # --- non-finite guard ---------------------------------------------------------------
    @property
    def _guard(self):
        state = self.__dict__.get("_kerasdet_guard")
        if state is None:
            with self.distribute_strategy.scope():
                state = _GuardState()
            self.__dict__["_kerasdet_guard"] = state  # untracked on purpose
        return state

    @property
    def nonfinite_steps(self):
        """Training steps whose update was skipped for a non-finite loss/gradient."""
        return int(self._guard.count.numpy())

    def _apply_unless(self, bad, grads, variables):
        """``optimizer.apply`` unless ``bad`` (identical on all replicas), strategy-safe
        like Keras' ``LossScaleOptimizer``: the ``cond`` runs in a cross-replica context
        where the strategy needs ``merge_call``."""
        optimizer = self.optimizer
        if not optimizer.built:
            optimizer.build(variables)  # never create variables inside a cond branch

        def apply():
            optimizer.apply(grads, variables)

        if tf.__internal__.distribute.strategy_supports_no_merge_call():
            keras.ops.cond(bad, lambda: None, apply)
            return

        def cross_replica(distribution, bad, grads):
            bad0 = distribution.experimental_local_results(bad)[0]

            def apply_all():
                distribution.extended.call_for_each_replica(optimizer.apply, args=(grads, variables))

            keras.ops.cond(bad0, lambda: None, apply_all)

        tf.distribute.get_replica_context().merge_call(cross_replica, args=(bad, grads))

    def _record_nonfinite(self, bad, images, labels):
        guard = self._guard
        images = tf.convert_to_tensor(images)  # numpy under run_eagerly=True
        batch = tf.shape(images)[0]
        ids = labels.get("image_id") if isinstance(labels, dict) else None
        ids = tf.fill([batch], tf.constant(-1, tf.int64)) if ids is None else tf.reshape(tf.cast(ids, tf.int64), [-1])
        flags = tf.fill([batch], 4)  # bit 2: a real batch entry (padding is 0)
        if isinstance(labels, dict) and "boxes" in labels:
            box_bad = ~tf.reduce_all(tf.math.is_finite(tf.cast(labels["boxes"], tf.float32)), axis=[1, 2])
            flags = flags + tf.cast(box_bad, tf.int32)
        if images.dtype.is_floating:
            pix_bad = ~tf.reduce_all(tf.math.is_finite(images), axis=[1, 2, 3])
            flags = flags + 2 * tf.cast(pix_bad, tf.int32)
        ids = _fixed_length(_all_gather(ids), -1)
        flags = _fixed_length(_all_gather(flags), 0)
        guard.ids.assign(tf.where(bad, ids, guard.ids))
        guard.flags.assign(tf.where(bad, flags, guard.flags))
        guard.count.assign_add(tf.cast(bad, tf.int64))

    def _check_nonfinite(self):
        """Host side, after each train function call: report new non-finite steps."""
        guard = self._guard
        guard.steps += 1
        count = int(guard.count.numpy())
        if count <= guard.seen:
            return
        new, guard.seen = count - guard.seen, count
        flags = guard.flags.numpy()
        present = (flags & 4) != 0
        ids = guard.ids.numpy()[present]
        flags = flags[present]
        known = bool(len(ids)) and bool((ids != -1).all())
        # Without image ids, images are named by their position in the global batch.
        names = [int(i) for i in ids] if known else list(range(len(ids)))
        batch_ids = names if known else []
        boxes = [n for n, f in zip(names, flags) if f & 1]
        pixels = [n for n, f in zip(names, flags) if f & 2]
        what = "Image ids of the batch" if known else (
            "Image ids unknown (labels carry no image_id), so images are given by their position in the "
            f"global batch of {len(names)}")
        message = (
            f"non-finite loss or gradient in {new} training step(s), the latest being step "
            f"{guard.steps} of this process (counted from 1); its update was NOT applied. {what}: "
            f"{names}; with non-finite boxes: {boxes}; with non-finite pixels: {pixels}."
        )
        if self.nan_policy == "raise":
            raise NonFiniteLossError(
                message + " (nan_policy='raise'; use nan_policy='skip' to skip such batches)",
                image_ids=batch_ids, suspect_image_ids=sorted(set(boxes + pixels)) if known else [],
                step=guard.steps,
            )
        logger.warning("%s Skipped (nan_policy='skip'); %d step(s) skipped so far.", message, count)

    def make_train_function(self, force=False):
        if self.nan_policy != "off":
            self._guard  # its variables are made here, eagerly, never inside a traced step
        super().make_train_function(force=force)
        inner = self.train_function
        if self.nan_policy == "off" or getattr(inner, "_kerasdet_guarded", False):
            return inner

        def train_function(iterator):
            logs = inner(iterator)
            self._check_nonfinite()
            return logs

        train_function._kerasdet_guarded = True
        self.train_function = train_function
        return train_function

    def test_step(self, data):
        images, labels = split_data(data)
        total, terms = self._total_loss(images, labels, training=False)
        return self._log(total, terms)

    def predict_step(self, data):
        """``detect``'s detections with ``"boxes"`` in ``bounding_box_format``."""
        images, _ = split_data(data)
        with self.folded_batchnorm(only_frozen=False):
            return self.detections_from_internal(images, self.detect(images))

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # keras-team/keras#20585 (open): under MultiWorkerMirroredStrategy Keras builds the
        # model from ``strategy.reduce("MEAN", first_batch, axis=None)``, which fails on a
        # PerReplica batch. Build from this worker's local part of the batch instead (the
        # shapes are all the symbolic build needs); like Keras, this also builds the
        # optimizer inside the strategy scope. Keras resets the iterator afterwards.
        strategy = self.distribute_strategy
        if iterator is None or self._distribute_strategy is None or not _is_multi_worker(strategy):
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        for _, _, it in iterator:
            data_batch = tf.nest.map_structure(lambda v: _local_value(strategy, v), next(it))
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def save_weights(self, filepath, overwrite=True, **kwargs):
        """``keras.Model.save_weights``; on the non-chief workers of a multi-worker job a
        no-op (every worker holds the same weights and the chief writes them: two workers
        writing one ``.h5`` on a shared folder crash on its file lock, measured)."""
        strategy = self._distribute_strategy
        if strategy is not None and _is_multi_worker(strategy) and not strategy.extended.should_checkpoint:
            logger.debug("save_weights(%s) skipped on a non-chief worker", filepath)
            return None
        return super().save_weights(filepath, overwrite=overwrite, **kwargs)

    # --- serialization ------------------------------------------------------------------
    def get_config(self):
        """Base fields, the subclass's constructor arguments (``self._config``) and the
        serialized ``backbone`` (when the model has one). Tuples are written as lists (what
        a ``.keras`` file's JSON gives back), so a loaded model's config equals this one."""
        config = {"weight_decay": self.weight_decay, "nan_policy": self.nan_policy,
                  "bounding_box_format": self.bounding_box_format, "fold_batchnorm": self.fold_batchnorm,
                  "name": self.name}
        config.update(getattr(self, "_config", {}))
        if getattr(self, "backbone", None) is not None:
            config["backbone"] = keras.saving.serialize_keras_object(self.backbone)
        return json_like(config)

    def get_build_config(self):
        """Always a build config, so ``keras.models.load_model`` creates every weight
        before restoring them. A model only run through ``predict`` (Keras never calls the
        model itself there, so it is not marked built although its layers are) is built
        here first, which creates any weight its inference path does not use."""
        if not self.built:
            self.build(None)
        return super().get_build_config() or {"input_shape": None}

    def save(self, filepath, overwrite=True, zipped=None, **kwargs):
        """``keras.Model.save``, building the model first (see :meth:`get_build_config`;
        this also spares the "model has not yet been built" warning after ``predict``)."""
        if not self.built:
            self.build(None)
        return super().save(filepath, overwrite=overwrite, zipped=zipped, **kwargs)

    def build_from_config(self, config):
        """Builds like :meth:`build` (errors surface; Keras' default would only warn)."""
        shape = (config or {}).get("input_shape")
        self.build(None if shape is None else tuple(shape))

    @classmethod
    def from_config(cls, config):
        config = copy.deepcopy(config)  # deserialization consumes nested dicts
        if isinstance(config.get("backbone"), dict):
            config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)
