"""Fault tolerance for ``model.fit``: exact mid-epoch resume and a persistent best checkpoint.

Keras 3.15's ``BackupAndRestore(save_freq=N)`` saves mid-epoch but restores only the
*epoch*: its metadata records the batch, yet on restart ``fit`` replays the whole epoch
from its first batch on top of weights that already took some of its steps, and the data
iterator is not skipped forward (a fresh iterator of a reshuffling dataset even has a
different order than the interrupted one). :class:`StepBackupAndRestore` (a
``BackupAndRestore``) records the number of *steps* done, and :func:`fit_resumable` turns a
restored step ``s = e * steps_per_epoch + b`` into (1) a ``fit`` that finishes epoch ``e``
with ``steps_per_epoch - b`` steps from batch ``s`` of the data stream and (2) a ``fit`` of
the remaining epochs. With the step-addressable stream of
``make_dataset(..., repeat=True, start_batch=s)`` every step sees the batch it would have
seen without the interruption, so the final weights equal an uninterrupted run's (measured
bit-identical on CPU, ``tests/test_callbacks.py``).

Checkpoints are committed atomically: the weights go to a new ``ckpt-<step>.weights.h5``,
then ``training_metadata.json`` is replaced (``os.replace``) to point at it. A process
killed at any instant leaves the previous complete checkpoint in force. Under
``MultiWorkerMirroredStrategy`` only the chief writes (every worker reads), so all
restarted workers resume from the same step; give every worker the same ``backup_dir``
on a shared file system.

Multi-worker input (:func:`fit_resumable`): the training stream is built per worker with
``strategy.distribute_datasets_from_function``, ``make_train_data`` running inside
:func:`kerasdet.distribute.input_context_scope`, so ``make_dataset(repeat=True)`` makes this
worker's shard of the global batch (see :mod:`kerasdet.distribute`). A dataset that does
not shard itself is distributed with an explicit ``AutoShardPolicy.DATA`` instead (every
worker then reads the whole global batch and keeps its part), with a warning.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

import keras
import tensorflow as tf

from kerasdet.random_state import load_seed_states, save_seed_states

logger = logging.getLogger(__name__)

_METADATA = "training_metadata.json"


def _is_writer(model) -> bool:
    """False on the non-chief workers of a multi-worker strategy (they must not write)."""
    from kerasdet.distribute import is_multi_worker

    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None or not is_multi_worker(strategy):
        return True
    return bool(strategy.extended.should_checkpoint)


class StepBackupAndRestore(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` that restores the exact *step* (use with :func:`fit_resumable`).

    Args:
      backup_dir: folder of the backup (used by nothing else).
      save_freq: ``"epoch"`` or an integer number of steps; a backup is also written at
        every epoch end.
      delete_checkpoint: delete the backup when training is complete (all
        ``total_steps`` done; :func:`fit_resumable` sets ``total_steps``).

    Attributes:
      step: optimizer steps done (restored value + steps of this process).
      restored_step: the step restored from the backup (0 if none).
      saved_step: the step of the latest committed backup (None before the first).
    """

    def __init__(self, backup_dir, save_freq="epoch", delete_checkpoint=True):
        super().__init__(backup_dir, save_freq=save_freq, delete_checkpoint=delete_checkpoint)
        self.step = 0
        self.restored_step = 0
        self.total_steps = None
        self._restored = False
        self._saved_step = None
        self._begin = 0

    @property
    def saved_step(self):
        return self._saved_step

    # --- state on disk ------------------------------------------------------------------
    @staticmethod
    def read_state(backup_dir) -> dict | None:
        """The committed backup state ``{"step", "weights", ...}`` or None."""
        path = os.path.join(backup_dir, _METADATA)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            state = json.load(f)
        if "step" not in state or "weights" not in state:
            raise ValueError(f"{path}: not a StepBackupAndRestore backup (no 'step'/'weights'); "
                             "was it written by keras.callbacks.BackupAndRestore?")
        return state

    def restore(self):
        """Loads the committed backup into ``self.model`` (once per callback)."""
        if self._restored:
            return self.restored_step
        self._restored = True
        state = self.read_state(self.backup_dir)
        if state is None:
            return 0
        if not self.model.built:
            raise ValueError("StepBackupAndRestore needs a built model (call it on a batch first).")
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            with self.model.distribute_strategy.scope():
                optimizer.build(self.model.trainable_variables)
        self.model.load_weights(os.path.join(self.backup_dir, state["weights"]))
        load_seed_states(self.model, os.path.join(self.backup_dir, state["weights"]))  # dropout/sampling streams
        self.step = self.restored_step = self._saved_step = int(state["step"])
        logger.info("Restored the backup of step %d from %s", self.step, self.backup_dir)
        return self.step

    # --- Keras hooks --------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self.restore()

    def on_train_batch_begin(self, batch, logs=None):
        self._begin = batch

    def on_train_batch_end(self, batch, logs=None):
        self.step += batch - self._begin + 1  # steps_per_execution > 1 counts them all
        if isinstance(self.save_freq, int) and self.step % self.save_freq == 0:
            self._save_model()

    def on_epoch_end(self, epoch, logs=None):
        self._current_epoch = epoch + 1
        self._save_model()

    def _save_model(self):
        if self._saved_step == self.step or not _is_writer(self.model):
            return
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"ckpt-{self.step}.weights.h5"
        self.model.save_weights(os.path.join(self.backup_dir, name), overwrite=True)
        save_seed_states(self.model, os.path.join(self.backup_dir, name))
        state = {"step": self.step, "epoch": self._current_epoch, "weights": name}
        tmp = os.path.join(self.backup_dir, _METADATA + ".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.backup_dir, _METADATA))  # the commit point
        for old in os.listdir(self.backup_dir):
            if old.startswith("ckpt-") and not old.startswith(name):  # keeps name's .seeds.npz
                try:
                    os.remove(os.path.join(self.backup_dir, old))
                except OSError:
                    pass
        self._saved_step = self.step

    def on_train_end(self, logs=None):
        complete = self.total_steps is None or self.step >= self.total_steps
        if complete and self.delete_checkpoint and _is_writer(self.model) and os.path.exists(self.backup_dir):
            shutil.rmtree(self.backup_dir, ignore_errors=True)


class BestModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """``ModelCheckpoint(save_best_only=True, save_weights_only=True)`` whose best value
    survives a restart (kept in ``filepath + ".json"``), written by the chief only.

    Place it after the callback that logs ``monitor`` (e.g. ``CocoEvalCallback`` logs
    ``val_AP``; use ``mode="max"``). Epochs without ``monitor`` are skipped.
    """

    def __init__(self, filepath, monitor="val_loss", mode="min", verbose=0):
        super().__init__(filepath, monitor=monitor, mode=mode, save_best_only=True,
                         save_weights_only=True, verbose=verbose)
        self.state_path = os.fspath(filepath) + ".json"
        if os.path.isfile(self.state_path):
            with open(self.state_path) as f:
                self.best = float(json.load(f)["best"])

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or self.monitor not in logs:
            return  # e.g. CocoEvalCallback's every_n_epochs: not evaluated, nothing to compare
        super().on_epoch_end(epoch, logs)

    def _save_model(self, epoch, batch, logs):
        if not _is_writer(self.model):
            return
        before = self.best
        super()._save_model(epoch, batch, logs)
        if self.best != before:
            tmp = self.state_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"best": float(self.best), "epoch": int(epoch) + 1, "monitor": self.monitor}, f)
            os.replace(tmp, self.state_path)


class CSVLogger(keras.callbacks.CSVLogger):
    """Keras' ``CSVLogger`` with columns declared up front.

    Keras fixes the columns at the first epoch's logs, so a metric that only some epochs
    log (``CocoEvalCallback``'s ``val_AP`` every N epochs) never reaches the file. Here
    ``keys`` are columns from the first row on, written ``NA`` where an epoch has no value.
    The logs other callbacks see are not changed. Place it after the callbacks that add
    ``keys`` to the logs.

    Args:
      filename, separator, append: as in ``keras.callbacks.CSVLogger``.
      keys: extra column names (default none: Keras' behaviour).
    """

    def __init__(self, filename, separator=",", append=False, *, keys=()):
        super().__init__(filename, separator=separator, append=append)
        self.extra_keys = tuple(keys)

    def on_train_begin(self, logs=None):
        if _is_writer(self.model):  # one file, written by the chief of a multi-worker job
            super().on_train_begin(logs)

    def on_epoch_end(self, epoch, logs=None):
        if not _is_writer(self.model):
            return
        logs = dict(logs or {})
        for key in self.extra_keys:
            logs.setdefault(key, "NA")
        super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        if _is_writer(self.model):
            super().on_train_end(logs)


def fit_resumable(model, make_train_data, *, epochs, steps_per_epoch, backup_dir, save_freq="epoch",
                  callbacks=(), delete_checkpoint=True, **fit_kwargs):
    """``model.fit`` that resumes an interrupted run exactly, at the step it stopped.

    Args:
      model: a compiled, built model.
      make_train_data: ``start_batch -> dataset`` giving the training stream from global
        batch ``start_batch`` on (e.g. ``lambda s: make_dataset(..., repeat=True,
        seed=seed, start_batch=s)``): an infinite, step-addressable stream.
      epochs, steps_per_epoch: as in ``fit``.
      backup_dir, save_freq, delete_checkpoint: see :class:`StepBackupAndRestore`.
      callbacks: other callbacks (the same instances serve every ``fit`` call).
      **fit_kwargs: passed to ``fit`` (``verbose``, ``validation_data``, ...).

    Returns:
      ``(history, backup)``: the epoch logs of this process merged over the ``fit`` calls
      (``{key: [values]}`` with ``history["epoch"]``, the epoch numbers), and the backup
      callback (``backup.restored_step`` says where this run started).
    """
    steps_per_epoch = int(steps_per_epoch)
    backup = StepBackupAndRestore(backup_dir, save_freq=save_freq, delete_checkpoint=delete_checkpoint)
    backup.set_model(model)
    backup.total_steps = int(epochs) * steps_per_epoch
    start = backup.restore()
    if start > backup.total_steps:
        raise ValueError(f"{backup_dir}: the backup is at step {start}, past the {backup.total_steps} "
                         f"steps of {epochs} epochs x {steps_per_epoch}")
    epoch, done = divmod(start, steps_per_epoch)
    phases = []
    if done:  # finish the interrupted epoch first
        phases.append((epoch, steps_per_epoch - done, start))
        epoch += 1
    if epoch < epochs:
        phases.append((epoch, steps_per_epoch, epoch * steps_per_epoch))
    merged = {"epoch": []}
    for i, (initial_epoch, steps, start_batch) in enumerate(phases):
        end = initial_epoch + 1 if (i == 0 and done) else epochs
        data = distribute_train_data(model.distribute_strategy, make_train_data, start_batch)
        try:
            history = model.fit(
                data, initial_epoch=initial_epoch, epochs=end,
                steps_per_epoch=steps, callbacks=[backup, *callbacks], **fit_kwargs,
            )
        except _PEER_ERRORS as exc:
            if not _is_multi_worker_model(model):
                raise
            from kerasdet.distribute import WorkerLostError, mark_failed

            mark_failed()
            raise WorkerLostError(
                f"a peer worker of this multi-worker job stopped during training near step "
                f"{backup.step} ({type(exc).__name__}: {_first_line(exc)}). Restart every "
                f"worker with the same command to resume from the last backup in {backup_dir} "
                f"(step {backup.saved_step})") from None
        for key, values in history.history.items():
            merged.setdefault(key, []).extend(values)
        ran = len(next(iter(history.history.values()), []))
        merged["epoch"].extend(range(initial_epoch, initial_epoch + ran))
        if model.stop_training:
            break
    if not phases:
        backup.on_train_end()
    return merged, backup


#: What a collective raises when a peer worker is gone (measured on loopback: a killed
#: peer gives UnavailableError within ~10 s, the coordination service's heartbeat timeout).
_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
                tf.errors.CancelledError)


def _first_line(exc):
    """The informative line of a collective's error (TF puts "Graph execution error:" first)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for key in ("aborted by", "unhealthy", "Connection", "connect"):
        for line in lines:
            if key in line:
                return line[:300]
    return lines[0][:300] if lines else ""


def _is_multi_worker_model(model):
    from kerasdet.distribute import is_multi_worker

    strategy = getattr(model, "distribute_strategy", None)
    return strategy is not None and is_multi_worker(strategy)


def distribute_train_data(strategy, make_train_data, start_batch):
    """The training input of ``fit`` from ``make_train_data(start_batch)``.

    Under a multi-worker strategy: ``strategy.distribute_datasets_from_function``, each
    worker calling ``make_train_data`` inside :func:`kerasdet.distribute.input_context_scope`
    so that ``make_dataset(repeat=True)`` makes only this worker's shard of every global
    batch. A dataset that did not shard itself (not made by ``make_dataset(repeat=True)``)
    is instead distributed with an explicit ``AutoShardPolicy.DATA`` (Keras' rebatching:
    correct global batch, but each worker reads all of it), with a warning. Other
    strategies: ``make_train_data(start_batch)`` as is (Keras distributes it).
    """
    from kerasdet.distribute import input_context_scope
    from kerasdet.distribute import is_multi_worker

    if strategy is None or not is_multi_worker(strategy):
        return make_train_data(start_batch)
    fallback = []

    def dataset_fn(input_context):
        with input_context_scope(input_context):
            ds = make_train_data(start_batch)
        if getattr(ds, "_kerasdet_input_context", None) is not input_context:
            fallback.append(ds)
            raise _NotSharded
        return ds

    try:
        return strategy.distribute_datasets_from_function(dataset_fn)
    except _NotSharded:
        pass
    logger.warning("fit_resumable: make_train_data did not return a make_dataset(repeat=True) stream "
                   "that shards itself; distributing it with AutoShardPolicy.DATA (each worker reads "
                   "the whole global batch and keeps its part)")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(fallback[0].with_options(options))


class _NotSharded(Exception):
    pass


class DecompositionWarmup(keras.callbacks.Callback):
    """decompNet's loss-weight warm-up (Park & Berg 2016 App. B): "we first used small
    value of lambda = gamma = 0.3, after 1 epochs, we increased lambda = gamma = 1.0".

    At the start of each epoch sets the model's ``p``, ``lam`` and ``gamma`` variables to
    ``start`` for the first ``epochs`` epochs of this fit, to ``end`` afterwards (the
    category loss's ``p`` follows the same schedule: our choice, the paper gives no
    schedule for ``p``).
    """

    def __init__(self, *, start=0.3, end=1.0, epochs=1, names=("p", "lam", "gamma")):
        super().__init__()
        self.start, self.end, self.epochs = float(start), float(end), int(epochs)
        self.names = tuple(names)

    def on_epoch_begin(self, epoch, logs=None):
        value = self.start if epoch < self.epochs else self.end
        for name in self.names:
            getattr(self.model, name).assign(value)
