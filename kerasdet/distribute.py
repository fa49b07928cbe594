"""Choosing a ``tf.distribute`` strategy for ``model.fit``.

Every kerasdet detector trains correctly under any of these strategies (see
:mod:`kerasdet.models.base` for how losses are scaled). Traps of this stack, measured with
TensorFlow 2.21 on CPU: batch with ``drop_remainder=True`` under a strategy (oneDNN's
conv2d of a zero-size per-replica batch returns the wrong shape), pad ground truth instead of ragged tensors, and run
multi-worker test processes under a hard timeout (a worker can hang when its peer dies).

Multi-worker jobs (``MultiWorkerMirroredStrategy``, one process per worker, ``TF_CONFIG``):

* ``train.batch_size`` / ``make_dataset(batch_size=...)`` is the GLOBAL batch: with N workers
  (R replicas in all) each replica gets ``batch_size / R`` images a step, the learning rate
  and its schedule are those of the global batch, and an epoch has the same number of steps
  as on one process. :func:`kerasdet.callbacks.fit_resumable` builds the input with
  ``strategy.distribute_datasets_from_function``: inside it (:func:`input_context_scope`)
  ``make_dataset(repeat=True)`` makes worker ``w``'s part of the step-addressable stream,
  the images of global batch positions ``[w * B / N, (w + 1) * B / N)`` of every step, so
  each worker reads (decodes, augments) only its own images and the global batch is the
  single-process one, image for image.
* Job end (:func:`register_exit_barrier`, armed by :func:`get_strategy`): a worker that
  finished waits at a coordination-service barrier before its process exits, so no peer is
  left talking to a worker that is gone (TensorFlow otherwise logs "The tasks have crashed
  ... CoordinationServiceError" on the survivor). A worker that failed skips the barrier.
* A peer that dies: the coordination service stops the survivors' collectives within its
  heartbeat timeout (measured ~10 s on loopback); :func:`kerasdet.callbacks.fit_resumable`
  re-raises that as :class:`WorkerLostError`, a non-zero exit with a one-line reason.
"""
import atexit
import contextlib
import contextvars
import json
import logging
import os
import sys

import tensorflow as tf

STRATEGIES = ("auto", "default", "mirrored", "multiworker")

logger = logging.getLogger(__name__)

#: Seconds a finished worker waits at the job-end barrier for its peers (a peer that
#: dies fails the barrier sooner, at the coordination service's heartbeat timeout).
#: Override with the ``KERASDET_EXIT_BARRIER_TIMEOUT_S`` environment variable.
EXIT_BARRIER_TIMEOUT_S = 3600.0

_INPUT_CONTEXT = contextvars.ContextVar("kerasdet_input_context", default=None)


class WorkerLostError(RuntimeError):
    """A peer worker of a multi-worker job stopped (crashed, killed or unreachable)."""


def current_input_context():
    """The ``tf.distribute.InputContext`` of the input pipeline being built, or None.

    Set by :func:`input_context_scope` (which :func:`kerasdet.callbacks.fit_resumable`
    uses around ``make_train_data`` under a multi-worker strategy); ``make_dataset`` reads
    it when it is not given one explicitly.
    """
    return _INPUT_CONTEXT.get()


@contextlib.contextmanager
def input_context_scope(input_context):
    """Within it, :func:`current_input_context` returns ``input_context``."""
    token = _INPUT_CONTEXT.set(input_context)
    try:
        yield input_context
    finally:
        _INPUT_CONTEXT.reset(token)


def shard_of_batch(batch_size, input_context):
    """``(start, size, per_replica)``: the positions ``[start, start + size)`` of each global
    batch of ``batch_size`` images that the input pipeline ``input_context`` reads, and the
    per-replica batch (``size`` is ``per_replica`` times the pipeline's local replicas).

    Raises:
        ValueError: ``batch_size`` is not a multiple of the number of replicas.
    """
    batch_size = int(batch_size)
    pipelines = int(input_context.num_input_pipelines)
    replicas = int(input_context.num_replicas_in_sync)
    if batch_size % replicas or replicas % pipelines:
        raise ValueError(
            f"the global batch of {batch_size} images (train.batch_size) cannot be split evenly over "
            f"{replicas} replicas ({pipelines} workers): use a multiple of {replicas}")
    size = batch_size // pipelines
    return int(input_context.input_pipeline_id) * size, size, batch_size // replicas


def is_multi_worker(strategy=None):
    """True for a ``MultiWorkerMirroredStrategy`` that really spans several workers."""
    strategy = strategy or tf.distribute.get_strategy()
    if getattr(strategy, "extended", None) is None:  # not a tf.distribute strategy (a test double)
        return False
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    in_multi_worker_mode = getattr(strategy.extended, "_in_multi_worker_mode", None)
    return bool(in_multi_worker_mode()) if callable(in_multi_worker_mode) else True


def is_chief(strategy=None):
    """False on the non-chief workers of a multi-worker job (they must not write files)."""
    strategy = strategy or tf.distribute.get_strategy()
    if not is_multi_worker(strategy):
        return True
    return bool(strategy.extended.should_checkpoint)


_exit_state = {"armed": False, "failed": False}


def mark_failed():
    """This worker failed: its process exits without waiting at the job-end barrier."""
    _exit_state["failed"] = True


def _excepthook(exc_type, exc, tb, _previous=sys.excepthook):
    mark_failed()
    _previous(exc_type, exc, tb)


def wait_for_workers(barrier_id="kerasdet_job_end", timeout_s=None):
    """Blocks until every worker of the job reaches the barrier ``barrier_id``.

    Raises:
        WorkerLostError: a worker failed or did not arrive within ``timeout_s`` seconds
            (default :data:`EXIT_BARRIER_TIMEOUT_S`).
    """
    from tensorflow.python.eager import context

    if timeout_s is None:
        timeout_s = float(os.environ.get("KERASDET_EXIT_BARRIER_TIMEOUT_S", EXIT_BARRIER_TIMEOUT_S))
    try:
        context.context().wait_at_barrier(barrier_id, int(timeout_s * 1000))
    except tf.errors.OpError as exc:
        raise WorkerLostError(
            f"not every worker of the multi-worker job reached its end within {timeout_s:.0f} s "
            f"(a peer failed or is unreachable): {str(exc).splitlines()[0]}") from None


def _exit_barrier():
    if _exit_state["failed"] or getattr(sys, "last_value", None) is not None:
        return
    try:
        wait_for_workers()
    except WorkerLostError as exc:
        print(f"kerasdet: {exc}", file=sys.stderr, flush=True)
        os._exit(1)


def register_exit_barrier():
    """Makes this process wait for its peers at exit (once; see the module doc)."""
    if _exit_state["armed"]:
        return
    _exit_state["armed"] = True
    sys.excepthook = _excepthook
    atexit.register(_exit_barrier)


def _parse_tf_config(tf_config=None):
    """``TF_CONFIG`` (a JSON string or an already-parsed dict) as a dict; ``{}`` if unset."""
    raw = tf_config if tf_config is not None else os.environ.get("TF_CONFIG", "")
    if isinstance(raw, str):
        if not raw.strip():
            return {}
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"TF_CONFIG is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"TF_CONFIG must be a JSON object with a 'cluster' field, got {type(raw).__name__}.")
    cluster = raw.get("cluster", {})
    if not isinstance(cluster, dict):
        raise ValueError(f"TF_CONFIG field 'cluster' must be an object of task lists, got {cluster!r}.")
    for task_type in ("worker", "chief"):
        tasks = cluster.get(task_type, [])
        if not isinstance(tasks, (list, tuple)):
            raise ValueError(
                f"TF_CONFIG field 'cluster.{task_type}' must be a list of 'host:port' addresses, got {tasks!r}."
            )
    return raw


def num_workers_from_tf_config(tf_config=None):
    """Number of workers (chief included) described by ``TF_CONFIG``.

    Args:
        tf_config: a JSON string or dict; default the ``TF_CONFIG`` environment variable.
    Returns:
        ``len(cluster.worker) + len(cluster.chief)``; 1 when ``TF_CONFIG`` is unset or
        empty, or names no worker.
    Raises:
        ValueError: ``TF_CONFIG`` is not valid JSON or its ``cluster`` field is malformed.
    """
    cluster = _parse_tf_config(tf_config).get("cluster", {})
    return max(1, len(cluster.get("worker", [])) + len(cluster.get("chief", [])))


def split_cpu(num_devices):
    """Splits the physical CPU into ``num_devices`` logical devices and returns them.

    Must run before any other TensorFlow op (TF refuses to reconfigure an initialized
    runtime; that raises a RuntimeError saying so). Useful to exercise
    ``MirroredStrategy`` on a CPU-only machine.
    """
    num_devices = int(num_devices)
    if num_devices < 1:
        raise ValueError(f"split_cpu: num_devices must be >= 1, got {num_devices}.")
    cpus = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(cpus[0])
    if current is not None and len(current) == num_devices:
        return tf.config.list_logical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)]
        )
    except RuntimeError as exc:
        raise RuntimeError(
            f"split_cpu({num_devices}) must run before any other TensorFlow op (the runtime "
            f"is already initialized): {exc}"
        ) from exc
    return tf.config.list_logical_devices("CPU")


def get_strategy(kind="auto", *, devices=None):
    """Returns a ``tf.distribute`` strategy; create it before building the model.

    Args:
        kind: ``"auto"`` (default): ``MultiWorkerMirroredStrategy`` when ``TF_CONFIG``
            names more than one worker, else ``MirroredStrategy`` over all GPUs when there
            are several, else the default strategy. ``"default"``, ``"mirrored"`` (over
            ``devices``, default all GPUs or the CPU) and ``"multiworker"`` (cluster from
            ``TF_CONFIG``; create it before any other TensorFlow op) force one.
        devices: device names for ``"mirrored"`` (e.g. ``["/cpu:0", "/cpu:1"]`` after
            :func:`split_cpu`); only valid with ``kind="mirrored"``.
    Raises:
        ValueError: unknown ``kind``, ``devices`` with another kind, or a malformed
            ``TF_CONFIG``.
    """
    if kind not in STRATEGIES:
        raise ValueError(f"Unknown strategy {kind!r}; expected one of {STRATEGIES}.")
    if devices is not None and kind != "mirrored":
        raise ValueError(f"devices={devices!r} only applies to kind='mirrored', got kind={kind!r}.")
    if kind == "auto":
        if num_workers_from_tf_config() > 1:
            kind = "multiworker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            kind = "mirrored"
        else:
            kind = "default"
    if kind == "multiworker":
        _parse_tf_config()  # a clear error for a malformed TF_CONFIG, before TF reads it
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        if is_multi_worker(strategy):
            register_exit_barrier()
    elif kind == "mirrored":
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    else:
        strategy = tf.distribute.get_strategy()
    logger.info("Using %s with %d replicas", type(strategy).__name__, strategy.num_replicas_in_sync)
    return strategy
