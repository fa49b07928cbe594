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


def num_workers_from_tf_config(tf_config=None):
    """Number of workers (chief included) described by ``TF_CONFIG`` (1 if unset)."""
    raw = tf_config if tf_config is not None else os.environ.get("TF_CONFIG", "")
    if not raw:
        return 1
    try:
        config = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as exc:
        raise ValueError(f"TF_CONFIG is not valid JSON: {exc}") from exc
    cluster = config.get("cluster", {})
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def split_cpu(num_devices):
    """Splits the physical CPU into ``num_devices`` logical devices.

    Must run before any other TensorFlow op (TF refuses to reconfigure an initialized
    runtime). Useful to exercise ``MirroredStrategy`` on a CPU-only machine.
    """
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)]
    )
    return tf.config.list_logical_devices("CPU")


def get_strategy(kind="auto", *, devices=None):
    """Returns a strategy.

    Args:
        kind: ``"auto"`` (default): ``MultiWorkerMirroredStrategy`` when ``TF_CONFIG``
            names more than one worker, else ``MirroredStrategy`` over all GPUs when there
            are several, else the default strategy. ``"default"``, ``"mirrored"`` (over
            ``devices``, default all GPUs or the CPU) and ``"multiworker"`` force one.
        devices: device names for ``"mirrored"`` (e.g. ``["/cpu:0", "/cpu:1"]``).
    """
    if kind not in STRATEGIES:
        raise ValueError(f"Unknown strategy {kind!r}; expected one of {STRATEGIES}.")
    if kind == "auto":
        if num_workers_from_tf_config() > 1:
            kind = "multiworker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            kind = "mirrored"
        else:
            kind = "default"
    if kind == "multiworker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif kind == "mirrored":
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    else:
        strategy = tf.distribute.get_strategy()
    logger.info("Using %s with %d replicas", type(strategy).__name__, strategy.num_replicas_in_sync)
    return strategy
