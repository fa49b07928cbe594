"""Reliability of training: the non-finite guard (``Detector(nan_policy=...)``) and a
2-worker ``MultiWorkerMirroredStrategy`` run that loses a worker (SIGKILL) and completes
after a restart through ``kerasdet.callbacks.fit_resumable`` (``BackupAndRestore``).

Strategy cases run in subprocesses (this file as a script, ``_main``) because logical CPU
devices and multi-worker strategies must be set up before any other TensorFlow op; every
subprocess runs under ``timeout -s KILL`` and a test-side deadline (a worker whose peer
died can hang forever in its next collective, PLATFORM.md).
"""
import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from test_distribute import GLOBAL_BATCH, _free_ports, fixed_data, tiny_retinanet  # noqa: E402

BAD_IMAGE = 6  # in the second global batch (images 4..7), in replica 1's half (6, 7)
IDS = np.arange(100, 112, dtype=np.int64)  # dataset image ids of the 12 fixed images
WORKER_TIMEOUT_S = 300  # generous: 2 shared cores; startup alone took 50 s at load 10


def _labels_with_ids(corrupt=True):
    images, labels = fixed_data()
    labels["image_id"] = IDS.copy()
    if corrupt:  # a box that slipped past the loader (it rejects non-finite boxes)
        labels["boxes"][BAD_IMAGE, 0] = [0.0, 0.0, np.inf, np.inf]
        labels["classes"][BAD_IMAGE, 0] = 1
    return images, labels


def _model(policy, seed=0):
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    model = tiny_retinanet()
    model(tf.zeros((1, 64, 64, 3)))
    model.nan_policy = policy
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05, momentum=0.9))
    return model


def _dataset(images, labels, keep=None):
    import tensorflow as tf

    if keep is not None:
        images = images[keep]
        labels = {k: v[keep] for k, v in labels.items()}
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(GLOBAL_BATCH, drop_remainder=True)


def _trainable(model):
    return [np.asarray(v) for v in model.trainable_variables]


# --- NaN guard, one device ------------------------------------------------------------------
def test_raise_policy_stops_before_the_bad_update_and_names_the_images():
    from kerasdet.models.base import NonFiniteLossError

    images, labels = _labels_with_ids()
    model = _model("raise")
    before = None

    import keras

    class Snapshot(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            nonlocal before
            before = [np.asarray(w) for w in self.model.get_weights()]

    with pytest.raises(NonFiniteLossError, match=r"Image ids of the batch: \[104, 105, 106, 107\]") as info:
        model.fit(_dataset(images, labels), epochs=2, verbose=0, callbacks=[Snapshot()])
    assert info.value.image_ids == [104, 105, 106, 107]
    assert info.value.suspect_image_ids == [100 + BAD_IMAGE]
    assert info.value.step == 2 and "with non-finite boxes: [106]" in str(info.value)
    # Stopped right after the bad step, whose update was not applied: trainable weights,
    # momentum and the step counter are those before it (BN moving statistics did see
    # the batch's finite images).
    assert int(model.optimizer.iterations) == 1
    after = model.get_weights()
    assert all(np.isfinite(w).all() for w in after)
    names = [v.path for v in model.weights]
    for name, a, b in zip(names, before, after):
        if "moving" not in name:
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_skip_policy_equals_training_without_the_bad_batch(caplog):
    images, labels = _labels_with_ids()
    skipping = _model("skip")
    with caplog.at_level(logging.WARNING, logger="kerasdet.models.base"):
        history = skipping.fit(_dataset(images, labels), epochs=2, verbose=0)
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 2 and all("[104, 105, 106, 107]" in w and "boxes: [106]" in w for w in warnings)
    assert skipping.nonfinite_steps == 2 and int(skipping.optimizer.iterations) == 4
    assert np.isfinite(history.history["loss"]).all()  # skipped steps stay out of the logs

    reference = _model("skip")
    keep = np.r_[0:4, 8:12]  # the same data without the batch holding the bad box
    reference.fit(_dataset(images, labels, keep), epochs=2, verbose=0)
    for a, b in zip(_trainable(skipping), _trainable(reference)):
        np.testing.assert_array_equal(a, b)


def test_off_policy_lets_nan_reach_the_weights_which_is_what_the_guard_prevents():
    images, labels = _labels_with_ids()
    model = _model("off")
    model.fit(_dataset(images, labels), epochs=1, verbose=0)
    assert not all(np.isfinite(w).all() for w in _trainable(model))
    with pytest.raises(ValueError, match="nan_policy must be one of"):
        from kerasdet.models.retinanet import RetinaNet

        RetinaNet(backbone=None, num_classes=1, nan_policy="ignore")


def test_nan_box_is_never_matched_so_the_loss_stays_finite_but_an_inf_box_is_caught():
    import tensorflow as tf

    images, labels = _labels_with_ids(corrupt=False)
    model = _model("raise")
    batch = {k: v[4:8].copy() for k, v in labels.items()}
    batch["classes"][2, 0] = 1
    losses = {}
    for name, box in (("nan", [np.nan, 0, 20, 20]), ("inf", [0, 0, np.inf, np.inf])):
        batch["boxes"][2, 0] = box
        losses[name] = float(model._total_loss(tf.constant(images[4:8]), batch, training=False)[0])
    assert np.isfinite(losses["nan"]) and np.isnan(losses["inf"])


def test_labels_without_image_ids_are_still_reported():
    from kerasdet.models.base import NonFiniteLossError

    images, labels = _labels_with_ids()
    del labels["image_id"]
    with pytest.raises(NonFiniteLossError, match=r"Image ids unknown \(labels carry no image_id\).*global batch "
                       r"of 4: \[0, 1, 2, 3\]; with non-finite boxes: \[2\]") as info:
        _model("raise").fit(_dataset(images, labels), epochs=1, verbose=0)
    assert info.value.image_ids == [] and info.value.step == 2


# --- workers (subprocesses) -----------------------------------------------------------------
def _mirrored_skip_worker(args):
    """2 replicas, bad box in replica 1's half only: both replicas skip the same step."""
    from kerasdet import distribute

    distribute.split_cpu(2)
    strategy = distribute.get_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
    images, labels = _labels_with_ids()
    results = {}
    for name, keep in (("skip", None), ("reference", np.r_[0:4, 8:12])):
        with strategy.scope():
            model = _model("skip")
        model.fit(_dataset(images, labels, keep), epochs=1, verbose=0)
        replicas = [[np.asarray(x) for x in strategy.experimental_local_results(v.value)] for v in model.trainable_variables]
        results[name] = {
            "nonfinite_steps": model.nonfinite_steps,
            "iterations": int(strategy.experimental_local_results(model.optimizer.iterations.value)[0]),
            "replica_diff": max(float(np.max(np.abs(r[0] - r[1]))) for r in replicas),
            "finite": all(np.isfinite(r[0]).all() for r in replicas),
        }
        np.savez(f"{args.out}_{name}.npz", *[r[0] for r in replicas])
    with open(args.out + ".json", "w") as f:
        json.dump(results, f)


def _multiworker_worker(args):
    """Fits 2 epochs x 3 steps through fit_resumable; progress per step; final weights."""
    from kerasdet import distribute

    strategy = distribute.get_strategy("multiworker")
    import keras
    import tensorflow as tf

    from kerasdet.callbacks import fit_resumable

    images, labels = fixed_data()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    with strategy.scope():
        model = tiny_retinanet()
        model(tf.zeros((1, 64, 64, 3)))
        model.load_weights(args.weights)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05, momentum=0.9))

    def data(start_batch):  # the same global batches as the one-device reference, from any step
        ds = tf.data.Dataset.from_tensor_slices((images, labels)).repeat()
        return ds.skip(start_batch * GLOBAL_BATCH).batch(GLOBAL_BATCH, drop_remainder=True).with_options(options)

    def iterations():
        return int(model.optimizer.iterations.value.numpy())  # a MirroredVariable under MWMS

    class Progress(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            with open(args.out + ".progress", "a") as f:
                f.write(f"{iterations()}\n")
            time.sleep(args.sleep)

    _, backup = fit_resumable(model, data, epochs=2, steps_per_epoch=3, backup_dir=args.backup, save_freq=1,
                              callbacks=[Progress()], verbose=0)
    np.savez(args.out + ".npz", *[np.asarray(w) for w in model.get_weights()])
    with open(args.out + ".json", "w") as f:
        json.dump({"restored_step": backup.restored_step, "iterations": iterations()}, f)


def _main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["mirrored_skip", "multiworker"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--weights")
    parser.add_argument("--backup")
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args(argv)
    {"mirrored_skip": _mirrored_skip_worker, "multiworker": _multiworker_worker}[args.command](args)


# --- test-side helpers ----------------------------------------------------------------------
def _start(command, out, tf_config=None, **flags):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    cmd = [sys.executable, os.path.abspath(__file__), command, "--out", out]
    for key, value in flags.items():
        cmd += [f"--{key}", str(value)]
    if shutil.which("timeout"):
        cmd = ["timeout", "-s", "KILL", str(WORKER_TIMEOUT_S)] + cmd
    log = open(out + ".log", "a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    proc.out = out
    return proc


def _kill(proc):
    """SIGKILL the worker (the python child of ``timeout``) and ``timeout`` itself."""
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split() \
        if shutil.which("pgrep") else []
    for pid in children:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _wait(procs, timeout=WORKER_TIMEOUT_S):
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            _kill(p)
    bad = [p for p in procs if p.returncode != 0]
    if bad:
        with open(bad[0].out + ".log") as f:
            pytest.fail(f"worker {os.path.basename(bad[0].out)} failed ({bad[0].returncode}):\n{f.read()[-4000:]}")


def _progress(out):
    try:
        with open(out + ".progress") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def _npz(path):
    with np.load(path) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


# --- strategy tests ---------------------------------------------------------------------------
def test_mirrored_replicas_take_the_same_skip_decision(tmp_path):
    out = str(tmp_path / "mirrored")
    proc = _start("mirrored_skip", out)
    _wait([proc])
    with open(out + ".json") as f:
        result = json.load(f)
    # Replica 0's half of the bad batch is finite; still both replicas skipped it.
    assert result["skip"]["nonfinite_steps"] == 1 and result["skip"]["iterations"] == 2
    assert result["skip"]["finite"] and result["skip"]["replica_diff"] == 0.0
    for a, b in zip(_npz(out + "_skip.npz"), _npz(out + "_reference.npz")):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_multiworker_worker_killed_and_restarted_completes_via_backup(tmp_path):
    """Worker 1 is SIGKILLed mid-training; the job (both workers) is restarted with the same
    command and finishes from the chief's backup with the weights of an uninterrupted run."""
    import keras
    import tensorflow as tf

    # Initial weights and the uninterrupted one-device reference (6 SGD steps), in-process.
    keras.utils.set_random_seed(0)
    model = tiny_retinanet()
    model(tf.zeros((1, 64, 64, 3)))
    weights = str(tmp_path / "init.weights.h5")
    model.save_weights(weights)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05, momentum=0.9))
    images, labels = fixed_data()
    model.fit(tf.data.Dataset.from_tensor_slices((images, labels)).batch(GLOBAL_BATCH), epochs=2, verbose=0)
    reference = [np.asarray(w) for w in model.get_weights()]

    backup = str(tmp_path / "backup")  # shared by the workers; the chief writes it
    start = time.time()

    def launch(tag, sleep):
        ports = _free_ports(2)
        cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
        return [_start("multiworker", str(tmp_path / f"{tag}{i}"), weights=weights, backup=backup, sleep=sleep,
                       tf_config={"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(2)]

    first = launch("first", sleep=0.5)
    deadline = time.time() + WORKER_TIMEOUT_S
    while (not _progress(first[1].out) or _progress(first[1].out)[-1] < 2) and time.time() < deadline:
        assert all(p.poll() is None for p in first), open(first[0].out + ".log").read()[-3000:]
        time.sleep(0.05)
    _kill(first[1])  # worker 1 dies
    killed_at = time.time()
    # The survivor cannot finish alone: it errors out or hangs in its next collective.
    while first[0].poll() is None and time.time() - killed_at < 10:
        time.sleep(0.1)
    survivor = "exited with %s" % first[0].returncode if first[0].poll() is not None else "hung (killed)"
    _kill(first[0])
    assert not os.path.exists(first[0].out + ".npz")
    with open(os.path.join(backup, "training_metadata.json")) as f:
        committed = json.load(f)
    assert 2 <= committed["step"] < 6, committed

    second = launch("second", sleep=0.0)
    _wait(second)
    elapsed = time.time() - start
    results = []
    for p in second:
        with open(p.out + ".json") as f:
            results.append(json.load(f))
    assert [r["restored_step"] for r in results] == [committed["step"]] * 2
    assert [r["iterations"] for r in results] == [6, 6]
    w0, w1 = _npz(second[0].out + ".npz"), _npz(second[1].out + ".npz")
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(w0, w1)) == 0.0
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(w0, reference))
    print(f"\nMWMS: worker 1 killed after step {committed['step']}; survivor {survivor}; resumed and "
          f"finished, max |weight diff| vs uninterrupted one-device run {diff:.2g}; {elapsed:.1f} s")
    assert diff <= 1e-4  # test_distribute's MWMS-vs-one-device tolerance
    assert not os.path.exists(backup)


if __name__ == "__main__":
    _main()
