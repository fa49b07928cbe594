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
* ``MultiWorkerMirroredStrategy`` + ``fit`` (keras-team/keras#20585, see PLATFORM.md):
  Keras' symbolic build cross-worker-reduces the first PerReplica batch and fails, and its
  ``reduce(MEAN, axis=0)`` of the step outputs fails on scalar logs. Under a multi-worker
  strategy the symbolic build uses this worker's local batch instead (which also builds
  the optimizer inside the strategy scope), and the step logs are rank-1 ``[1]`` tensors
  (Keras' reduction turns them back into scalars). Nothing changes under other strategies.
"""
import keras
import tensorflow as tf


def _num_replicas():
    ctx = tf.distribute.get_replica_context()
    return ctx.num_replicas_in_sync if ctx is not None else tf.distribute.get_strategy().num_replicas_in_sync


def _is_multi_worker(strategy):
    """True for a ``MultiWorkerMirroredStrategy`` that really spans several workers."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    in_multi_worker_mode = getattr(strategy.extended, "_in_multi_worker_mode", None)
    return bool(in_multi_worker_mode()) if callable(in_multi_worker_mode) else True


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
            on biases or normalization layers — spec ambiguity 22). The thesis' 1e-4 is
            Caffe-style (``grad += 1e-4 * w``), which Keras' decoupled
            ``optimizer(weight_decay=...)`` is not once momentum is involved. Default 1e-4.
    """

    #: Names of the terms ``detection_losses`` returns (a tracker is made for each).
    LOSS_NAMES = ()

    def __init__(self, *, weight_decay=1e-4, **kwargs):
        super().__init__(**kwargs)
        self.weight_decay = float(weight_decay)
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

    def _total_loss(self, images, labels, training):
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

    def _log(self, total, terms):
        values = dict(terms, loss=total)
        logs = {}
        for tracker in self._tracker_list:
            if tracker.name not in values:
                continue
            tracker.update_state(_all_reduce_sum(tf.cast(values[tracker.name], tf.float32)))
            logs[tracker.name] = tracker.result()
        if _is_multi_worker(self.distribute_strategy):
            # keras-team/keras#20585: under a multi-worker strategy Keras reduces the step
            # outputs with ``strategy.reduce(MEAN, v, axis=0)``, which rejects scalars.
            # Every replica holds the same all-reduced value, so the mean over axis 0 of
            # these [1]-vectors is that value, as a scalar again.
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

    def train_step(self, data):
        images, labels = split_data(data)
        if labels is None:
            raise ValueError("train_step needs (images, labels) batches; labels were missing.")
        with tf.GradientTape() as tape:
            total, terms = self._total_loss(images, labels, training=True)
            scaled = self.optimizer.scale_loss(total) if hasattr(self.optimizer, "scale_loss") else total
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply(grads, variables)
        return self._log(total, terms)

    def test_step(self, data):
        images, labels = split_data(data)
        total, terms = self._total_loss(images, labels, training=False)
        return self._log(total, terms)

    def predict_step(self, data):
        images, _ = split_data(data)
        return self.detect(images)

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

    def get_config(self):
        return {"weight_decay": self.weight_decay, "name": self.name}
