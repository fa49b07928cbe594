"""Choosing a ``tf.distribute`` strategy for ``model.fit``.

Every kerasdet detector trains correctly under any of these strategies (see
:mod:`kerasdet.models.base` for how losses are scaled). Traps of this stack, measured
(PLATFORM.md): batch with ``drop_remainder=True`` under a strategy (an empty per-replica
batch crashes oneDNN on CPU), pad ground truth instead of ragged tensors, and run
multi-worker test processes under a hard timeout (a worker can hang when its peer dies).
"""
import json
import logging
import os

import tensorflow as tf

STRATEGIES = ("auto", "default", "mirrored", "multiworker")

logger = logging.getLogger(__name__)


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
    elif kind == "mirrored":
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    else:
        strategy = tf.distribute.get_strategy()
    logger.info("Using %s with %d replicas", type(strategy).__name__, strategy.num_replicas_in_sync)
    return strategy
