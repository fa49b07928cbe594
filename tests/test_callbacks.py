"""kerasdet.callbacks: a run SIGKILLed mid-epoch and restarted ends at the same weights as an
uninterrupted run; atomic backups; the persistent best checkpoint; the CLI resumes.

The training runs are subprocesses (this file run as a script, ``_main``) so the test can
SIGKILL one at an arbitrary moment, like a preempted machine. Every subprocess runs under
``timeout -s KILL`` and a test-side deadline.
"""
import argparse
import json
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

NUM_IMAGES = 7  # odd: batches straddle data-epoch boundaries
BATCH = 2
STEPS_PER_EPOCH = NUM_IMAGES // BATCH  # 3
EPOCHS = 3  # 9 steps
KILL_AFTER_STEP = 4  # mid-epoch 2 (steps 4..6)
RUN_TIMEOUT_S = 240
# Tolerance of resumed vs uninterrupted final weights. Measured: 0.0 (bit-identical) on
# this 2-core CPU; a little float32 slack for other oneDNN builds / thread counts.
RESUME_ATOL = 1e-6


# --- worker ---------------------------------------------------------------------------------
def make_images(root, n=NUM_IMAGES, size=48, seed=0):
    """A tiny COCO set: n images with 1-2 bright squares; returns (annotation file, dir)."""
    import cv2

    rng = np.random.RandomState(seed)
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}
    for i in range(n):
        image = rng.randint(0, 40, (size, size + 8, 3)).astype(np.uint8)
        for _ in range(1 + i % 2):
            y, x, s = rng.randint(0, size - 20), rng.randint(0, size - 12), rng.randint(10, 20)
            c = rng.randint(0, 3)
            image[y : y + s, x : x + s, c] = 255
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1,
                                        "category_id": int(c) + 1, "bbox": [int(x), int(y), int(s), int(s)]})
        cv2.imwrite(os.path.join(image_dir, f"{i}.png"), image)
        coco["images"].append({"id": i + 1, "file_name": f"{i}.png", "height": size, "width": size + 8})
    path = os.path.join(root, "instances.json")
    with open(path, "w") as f:
        json.dump(coco, f)
    return path, image_dir


def _train(args):
    import keras
    import tensorflow as tf

    from kerasdet.callbacks import fit_resumable
    from kerasdet.data.coco import load_coco
    from kerasdet.data.pipeline import make_dataset
    from kerasdet.schedules import WarmupPiecewiseConstant
    from test_distribute import tiny_retinanet

    keras.utils.set_random_seed(0)
    source = load_coco(*make_images(args.data))
    model = tiny_retinanet()
    model(tf.zeros((1, 64, 64, 3)))
    schedule = WarmupPiecewiseConstant(base_lr=0.05, boundaries=[6], decay=0.1, warmup_steps=2)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=schedule, momentum=0.9))

    def data(start_batch):  # flip + scale jitter: the augmentation must resume exactly too
        return make_dataset(source, batch_size=BATCH, image_size=(64, 64), training=True, flip=True,
                            scale_jitter=(0.8, 1.25), seed=7, repeat=True, start_batch=start_batch)

    class Progress(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            with open(args.out + ".progress", "a") as f:
                f.write(f"{int(self.model.optimizer.iterations)}\n")
            time.sleep(args.sleep)  # a window for the test's SIGKILL (no effect on numerics)

    history, backup = fit_resumable(
        model, data, epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH, backup_dir=args.backup,
        save_freq=1, callbacks=[Progress()], verbose=0,
    )
    np.savez(args.out + ".npz", *[np.asarray(w) for w in model.get_weights()])
    with open(args.out + ".json", "w") as f:
        json.dump({"restored_step": backup.restored_step, "history": history,
                   "iterations": int(model.optimizer.iterations)}, f)


def _main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["train"])
    parser.add_argument("--data", required=True)
    parser.add_argument("--backup", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sleep", type=float, default=0.0)
    _train(parser.parse_args(argv))


# --- test side ------------------------------------------------------------------------------
def _start(data, backup, out, sleep=0.0):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    cmd = [sys.executable, os.path.abspath(__file__), "train", "--data", data, "--backup", backup,
           "--out", out, "--sleep", str(sleep)]
    if shutil.which("timeout"):
        cmd = ["timeout", "-s", "KILL", str(RUN_TIMEOUT_S)] + cmd
    log = open(out + ".log", "a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    return proc


def _finish(proc, out, timeout=RUN_TIMEOUT_S):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.returncode != 0:
        with open(out + ".log") as f:
            pytest.fail(f"training run failed ({proc.returncode}):\n{f.read()[-4000:]}")
    with open(out + ".json") as f:
        result = json.load(f)
    with np.load(out + ".npz") as z:
        return result, [z[f"arr_{i}"] for i in range(len(z.files))]


def _progress(out):
    try:
        with open(out + ".progress") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def test_sigkill_mid_epoch_then_restart_equals_uninterrupted_run(tmp_path):
    data = str(tmp_path / "data")
    ref_out, run_out = str(tmp_path / "ref"), str(tmp_path / "run")
    start = time.time()
    ref = _start(data + "_ref", str(tmp_path / "ref_backup"), ref_out)
    run = _start(data, str(tmp_path / "backup"), run_out, sleep=0.4)
    # SIGKILL the run right after its step KILL_AFTER_STEP (mid-epoch: 3 steps per epoch).
    deadline = time.time() + RUN_TIMEOUT_S
    while (not _progress(run_out) or _progress(run_out)[-1] < KILL_AFTER_STEP) and time.time() < deadline:
        assert run.poll() is None, open(run_out + ".log").read()[-3000:]
        time.sleep(0.02)
    _kill_tree(run)  # SIGKILL: no handler, no clean-up, like a preempted machine
    run.wait()
    assert run.returncode != 0 and not os.path.exists(run_out + ".npz")
    with open(tmp_path / "backup" / "training_metadata.json") as f:
        committed = json.load(f)
    assert committed["step"] % STEPS_PER_EPOCH != 0, committed  # really mid-epoch

    resumed = _start(data, str(tmp_path / "backup"), run_out)
    (r, w), (ref_r, ref_w) = _finish(resumed, run_out), _finish(ref, ref_out)
    elapsed = time.time() - start
    assert r["restored_step"] == committed["step"] >= KILL_AFTER_STEP
    # The resumed process ran only the remaining steps: the rest of the interrupted epoch,
    # then the later epochs.
    assert _progress(run_out)[-1] == r["iterations"] == ref_r["iterations"] == EPOCHS * STEPS_PER_EPOCH
    assert r["history"]["epoch"] == list(range(committed["step"] // STEPS_PER_EPOCH, EPOCHS))
    assert not os.path.exists(tmp_path / "backup")  # deleted once training completed
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(w, ref_w))
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(w, _initial_weights()))
    print(f"\nresume after SIGKILL at step {committed['step']}: max |weight diff| {diff:.3g} "
          f"(weights moved {moved:.3g}); {elapsed:.1f} s")
    assert moved > 1e-2
    assert diff <= RESUME_ATOL


def _kill_tree(proc):
    """SIGKILL ``timeout`` and the python child it runs (its only child)."""
    try:
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    except FileNotFoundError:
        children = []
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    os.kill(proc.pid, signal.SIGKILL)


def _initial_weights():
    import keras
    import tensorflow as tf

    from test_distribute import tiny_retinanet

    keras.utils.set_random_seed(0)
    model = tiny_retinanet()
    model(tf.zeros((1, 64, 64, 3)))
    return [np.asarray(w) for w in model.get_weights()]


if __name__ == "__main__":
    _main()


# --- the CLI --------------------------------------------------------------------------------
CLI_TINY = [
    "--set", "data.generate.num_train=32", "--set", "data.generate.num_val=8",
    "--set", "train.batch_size=8", "--set", "eval.batch_size=8",
    "--set", "backbone.widths=[8,16,16,16]", "--set", "backbone.blocks=[0,0,0,0]",
    "--set", "model.fpn_channels=16", "--set", "model.head_channels=16",
    "--set", "train.backup_every=1", "--epochs", "3", "--no-export", "--num-draw", "0", "--verbose", "0",
]


def _cli(work, data):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    cmd = [sys.executable, "-m", "kerasdet.cli", "train", "--work-dir", work, "--data-dir", data] + CLI_TINY
    if shutil.which("timeout"):
        cmd = ["timeout", "-s", "KILL", str(RUN_TIMEOUT_S)] + cmd
    log = open(work + ".log", "a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.path.dirname(HERE))
    log.close()
    return proc


def _h5_arrays(path):
    import h5py

    arrays = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.append(np.asarray(obj)) if isinstance(obj, h5py.Dataset) else None)
    return arrays


@pytest.mark.slow
def test_cli_train_killed_and_rerun_resumes_to_the_same_weights(tmp_path):
    """``kerasdet train`` SIGKILLed mid-run and started again with the same command resumes
    from its step backup and writes the same final weights as an uninterrupted run."""
    data = str(tmp_path / "data")
    ref_work, work = str(tmp_path / "ref"), str(tmp_path / "run")
    # Generate the digits set once (both runs read it).
    subprocess.run([sys.executable, "-c", "from kerasdet.data.digits import generate_digits; "
                    f"generate_digits({data!r}, num_train=32, num_val=8, image_size=(128, 128), seed=0)"],
                   check=True, timeout=RUN_TIMEOUT_S, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    ref = _cli(ref_work, data)
    run = _cli(work, data)
    meta = os.path.join(work, "backup", "training_metadata.json")
    deadline = time.time() + RUN_TIMEOUT_S
    while time.time() < deadline and run.poll() is None:
        try:
            with open(meta) as f:
                if json.load(f)["step"] >= 5:
                    break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    assert run.poll() is None, open(work + ".log").read()[-3000:]
    _kill_tree(run)
    with open(meta) as f:
        committed = json.load(f)["step"]
    assert 5 <= committed < 12 and not os.path.exists(os.path.join(work, "model.weights.h5"))
    rerun = _cli(work, data)
    for proc, w in ((rerun, work), (ref, ref_work)):
        proc.wait(timeout=RUN_TIMEOUT_S)
        assert proc.returncode == 0, open(w + ".log").read()[-3000:]
    with open(os.path.join(work, "run.json")) as f:
        summary = json.load(f)
    assert summary["resumed_from_step"] == committed and summary["nonfinite_steps"] == 0
    a = _h5_arrays(os.path.join(work, "model.weights.h5"))
    b = _h5_arrays(os.path.join(ref_work, "model.weights.h5"))
    assert len(a) == len(b) > 10
    diff = max(float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(a, b))
    print(f"\nCLI resume after SIGKILL at step {committed}: max |weight diff| {diff:.3g}")
    assert diff <= RESUME_ATOL


def test_best_checkpoint_keeps_its_best_across_restarts(tmp_path):
    import keras

    from kerasdet.callbacks import BestModelCheckpoint

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    path = str(tmp_path / "best.weights.h5")
    cb = BestModelCheckpoint(path, monitor="val_AP", mode="max")
    cb.set_model(model)
    cb.on_epoch_end(0, {"loss": 1.0})  # not evaluated: skipped silently
    assert not os.path.exists(path)
    cb.on_epoch_end(1, {"val_AP": 0.5})
    assert os.path.isfile(path)
    with open(path + ".json") as f:
        assert json.load(f) == {"best": 0.5, "epoch": 2, "monitor": "val_AP"}
    mtime = os.path.getmtime(path)
    restarted = BestModelCheckpoint(path, monitor="val_AP", mode="max")  # a new process
    restarted.set_model(model)
    assert restarted.best == 0.5
    restarted.on_epoch_end(2, {"val_AP": 0.4})  # worse than before the restart: kept
    assert os.path.getmtime(path) == mtime
    restarted.on_epoch_end(3, {"val_AP": 0.7})
    with open(path + ".json") as f:
        assert json.load(f)["best"] == 0.7


def test_step_backup_rejects_a_plain_keras_backup_and_commits_atomically(tmp_path):
    import keras

    from kerasdet.callbacks import StepBackupAndRestore

    backup = str(tmp_path / "b")
    os.makedirs(backup)
    with open(os.path.join(backup, "training_metadata.json"), "w") as f:
        json.dump({"epoch": 1, "batch": 0}, f)  # what keras.callbacks.BackupAndRestore writes
    with pytest.raises(ValueError, match="not a StepBackupAndRestore backup"):
        StepBackupAndRestore.read_state(backup)
    shutil.rmtree(backup)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    cb = StepBackupAndRestore(backup, save_freq=2)
    cb.set_model(model)
    for step in range(5):
        cb.on_train_batch_begin(step)
        cb.on_train_batch_end(step)
    state = StepBackupAndRestore.read_state(backup)
    assert state["step"] == 4 and sorted(os.listdir(backup)) == ["ckpt-4.weights.h5", "training_metadata.json"]


def test_csv_logger_keeps_columns_of_metrics_logged_only_some_epochs(tmp_path):
    import csv

    import keras

    from kerasdet.callbacks import CSVLogger

    path = str(tmp_path / "history.csv")
    logger = CSVLogger(path, keys=["val_AP", "val_AP50"])
    logger.set_model(keras.Sequential([keras.layers.Dense(1)]))
    logger.on_train_begin()
    epochs = [{"loss": 1.0}, {"loss": 0.5, "val_AP": 0.25, "val_AP50": 0.75}]
    for epoch, logs in enumerate(epochs):
        seen = dict(logs)
        logger.on_epoch_end(epoch, seen)
        assert seen == logs  # other callbacks' view is untouched
    logger.on_train_end()
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [r["val_AP"] for r in rows] == ["NA", "0.25"] and [r["val_AP50"] for r in rows] == ["NA", "0.75"]
    assert [float(r["loss"]) for r in rows] == [1.0, 0.5]
    assert "val_loss" not in rows[0]  # no spurious val_* columns of the training keys
