"""``kerasdet train --strategy multiworker`` the way users run it: 2 worker processes on
127.0.0.1 (``TF_CONFIG``), one shared ``--work-dir``, the RetinaNet digits preset reduced by
``--set`` (small digits set generated into ``tmp_path``, tiny backbone/FPN/head, ~200 Adam
steps with warm-up), against the same command with ``--strategy default`` (same global
batch, same seed).

Checked: both workers exit 0, without TensorFlow's unclean-shutdown errors, and write one
history and one weights file; the loss falls like the single-process run's; the per-epoch
losses agree within the stated bands (bit-equal weights are impossible here: see the
tolerances); the AP within ``AP_ATOL``, and the AP the workers computed is what a
single-process ``kerasdet evaluate`` of the saved weights prints. A worker whose peer is killed mid-training
exits non-zero with a WorkerLostError within ``LOST_PEER_S``.

Every process runs under ``timeout -k 10`` and a test-side deadline (a worker whose peer
died can hang in a collective); ports are free loopback ports chosen at run time.
"""
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_TIMEOUT_S = 420  # per run (CLI start ~15 s, training ~1-2 min on 2 loaded cores)
NUM_TRAIN, NUM_VAL, BATCH, EPOCHS = 128, 32, 8, 12  # 16 steps an epoch, 192 steps

# Tolerances, from measurements on the 2-core CPU (issue 24). The 1- and 2-worker runs sum
# the same global batch in a different order (per-replica partial sums, then an all-reduce;
# measured identical to an in-process 2-replica MirroredStrategy), and this model amplifies
# that round-off (step-1 gradients of the full digits preset differ by up to 5 % between
# 1 x 16 and 2 x 8 images), so the final weights cannot match: measured max |w_2w - w_1w| =
# 0.97 on BatchNorm moving statistics, median 0.004 over tensors. What matches: the first
# epochs closely (measured relative loss difference <= 0.007 for epochs 1-3), the whole
# curve within a band (measured <= 0.13, at a loss spike of the single-process run in
# epoch 5), the end (mean of the last 3 epochs, measured 0.043) and the AP (measured
# 0.0553 vs 0.0511).
EARLY_BAND = 0.03  # epochs 1-3
LOSS_BAND = 0.25  # every epoch
END_BAND = 0.10  # mean of the last 3 epochs
AP_ATOL = 0.01
LOST_PEER_S = 120  # a survivor reports a killed peer within this (measured ~10 s)

#: What TensorFlow logs when a worker exits while a peer still talks to it (measured before
#: the job-end barrier: the survivor's heartbeats fail or it reports the exited task).
UNCLEAN_SHUTDOWN = ("CoordinationServiceError", "stopped sending heartbeats", "CoordinationService/Heartbeat")

OVERRIDES = [
    f"data.generate.num_train={NUM_TRAIN}", f"data.generate.num_val={NUM_VAL}",
    f"train.batch_size={BATCH}", f"train.epochs={EPOCHS}", "train.warmup_steps=40",
    "train.lr=0.002",  # the bands below were measured at this rate (the preset had 2e-3 then)
    f"eval.every_n_epochs={EPOCHS}", "eval.batch_size=16",
    "backbone.widths=[8,16,24,32]", "backbone.blocks=[0,1,1,1]",
    "model.fpn_channels=24", "model.head_convs=1", "model.head_channels=24",
]


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _command(data_dir, work_dir, strategy, overrides=OVERRIDES):
    cmd = [sys.executable, "-m", "kerasdet.cli", "train", "--recipe", "retinanet", "--preset", "digits",
           "--strategy", strategy, "--data-dir", data_dir, "--work-dir", work_dir, "--no-export", "--seed", "0"]
    for item in overrides:
        cmd += ["--set", item]
    if shutil.which("timeout"):
        cmd = ["timeout", "-k", "10", str(RUN_TIMEOUT_S)] + cmd
    return cmd


def _env(tf_config=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def _start(cmd, log_path, env):
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)
    log.close()
    proc.log_path = log_path
    return proc


def _kill(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait(procs, timeout):
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.5)
    hung = [p for p in procs if p.poll() is None]
    for p in hung:
        _kill(p)
    return hung


def _tail(proc, n=3000):
    with open(proc.log_path, errors="replace") as f:
        return f.read()[-n:]


def _start_workers(data_dir, work_dir, tmp, overrides=OVERRIDES):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    return [
        _start(_command(data_dir, work_dir, "multiworker", overrides), str(tmp / f"worker{i}.log"),
               _env({"cluster": cluster, "task": {"type": "worker", "index": i}}))
        for i in range(2)
    ]


def _history(work_dir):
    with open(os.path.join(work_dir, "history.csv")) as f:
        return list(csv.DictReader(f))


def _weights(path):
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, np.asarray(obj)) if isinstance(obj, h5py.Dataset) else None)
    return out


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from kerasdet.data.digits import generate_digits

    path = str(tmp_path_factory.mktemp("mw_digits"))
    generate_digits(path, num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=(128, 128), seed=0)
    return path


@pytest.mark.slow
def test_two_workers_train_like_one_process(digits, tmp_path):
    single_dir, multi_dir = str(tmp_path / "single"), str(tmp_path / "multi")
    single = _start(_command(digits, single_dir, "default"), str(tmp_path / "single.log"), _env())
    t0 = time.time()
    assert not _wait([single], RUN_TIMEOUT_S), f"single-process run hung:\n{_tail(single)}"
    assert single.returncode == 0, _tail(single)
    t_single = time.time() - t0

    workers = _start_workers(digits, multi_dir, tmp_path)
    t0 = time.time()
    hung = _wait(workers, RUN_TIMEOUT_S)
    t_multi = time.time() - t0
    for i, w in enumerate(workers):
        assert w not in hung, f"worker {i} hung (killed after {RUN_TIMEOUT_S} s):\n{_tail(w)}"
        assert w.returncode == 0, f"worker {i} exited {w.returncode}:\n{_tail(w)}"
        log = _tail(w, 10**6)
        for marker in UNCLEAN_SHUTDOWN:
            assert marker not in log, f"worker {i} logged {marker!r} (unclean shutdown):\n{_tail(w)}"
    print(f"single {t_single:.0f} s, two workers {t_multi:.0f} s")

    one, two = _history(single_dir), _history(multi_dir)
    assert len(one) == len(two) == EPOCHS  # one history, written once (by the chief)
    loss1 = np.array([float(r["loss"]) for r in one])
    loss2 = np.array([float(r["loss"]) for r in two])
    print("loss 1 worker ", np.round(loss1, 4).tolist())
    print("loss 2 workers", np.round(loss2, 4).tolist())
    assert loss1[-1] < 0.7 * loss1[0] and loss2[-1] < 0.7 * loss2[0]  # it learns
    rel = np.abs(loss2 - loss1) / loss1
    print("relative loss difference per epoch", np.round(rel, 4).tolist())
    # Same global batch, schedule and epoch length: the first epochs nearly coincide (a
    # doubled batch, a per-worker schedule or unsharded data would not).
    assert np.all(rel[:3] <= EARLY_BAND), rel
    assert np.all(rel <= LOSS_BAND), rel
    assert abs(loss2[-3:].mean() - loss1[-3:].mean()) <= END_BAND * loss1[-3:].mean()

    w1 = _weights(os.path.join(single_dir, "model.weights.h5"))
    w2 = _weights(os.path.join(multi_dir, "model.weights.h5"))
    assert w1.keys() == w2.keys()  # written once, by the chief, complete
    diffs = [float(np.max(np.abs(w1[k] - w2[k]))) for k in w1 if w1[k].size]
    print(f"|weights 2w - 1w|: max {max(diffs):.3g}, median over tensors {np.median(diffs):.3g}")

    with open(os.path.join(single_dir, "run.json")) as f:
        ap1 = json.load(f)["stats"]["AP"]
    with open(os.path.join(multi_dir, "run.json")) as f:
        ap2 = json.load(f)["stats"]["AP"]
    print(f"AP 1 worker {ap1:.4f}, 2 workers {ap2:.4f}")
    assert abs(ap1 - ap2) <= AP_ATOL

    # Every worker evaluated during the job: its AP is a single-process evaluation's of the
    # same weights.
    cmd = [sys.executable, "-m", "kerasdet.cli", "evaluate", "--run", multi_dir]
    out = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(row for row in out.stdout.splitlines() if row.startswith("AP ") and "0.50:0.95" in row)
    assert abs(float(line.split()[-1]) - ap2) <= 1e-4, (line, ap2)


@pytest.mark.slow
def test_survivor_reports_a_killed_peer(digits, tmp_path):
    """Worker 1 is SIGKILLed mid-training: worker 0 exits non-zero, naming the lost peer,
    within LOST_PEER_S (it would otherwise wait in its next collective)."""
    overrides = [o for o in OVERRIDES if not o.startswith("train.epochs")] + ["train.epochs=200"]
    workers = _start_workers(digits, str(tmp_path / "multi"), tmp_path, overrides)
    try:
        deadline = time.time() + RUN_TIMEOUT_S
        while "Epoch 2/" not in _tail(workers[1], 20000):  # training is under way
            assert time.time() < deadline and all(w.poll() is None for w in workers), _tail(workers[1])
            time.sleep(0.5)
        _kill(workers[1])
        t0 = time.time()
        hung = _wait([workers[0]], LOST_PEER_S)
        assert not hung, f"the survivor did not exit within {LOST_PEER_S} s:\n{_tail(workers[0])}"
        print(f"survivor exited {workers[0].returncode} after {time.time() - t0:.1f} s")
        assert workers[0].returncode != 0
        assert "WorkerLostError" in _tail(workers[0], 20000), _tail(workers[0])
    finally:
        for w in workers:
            _kill(w)


# --- a staged recipe (decompNet: category / instance / joint / box) under 2 workers --------
STAGED = [
    "data.generate.num_train=32", "data.generate.num_val=8", "data.generate.num_clutter=0",
    "data.generate.min_digits=1", "data.generate.max_digits=3", "input.max_boxes=4",
    "train.batch_size=4", "eval.batch_size=8", "model.steps=3", "model.max_instances=2",
    "model.conv_gru_filters=4", "model.instance_filters=4", "model.category_widths=[4,4,4,4,4,4]",
    "model.box_hidden=8", "train.stages.0.epochs=1", "train.stages.1.epochs=1",
]
# Per-stage mean loss, 2 workers vs 1 (8 steps a stage). Measured on the 2-core CPU: category
# 0.1 %, instance 0.3 %, joint 0.3 %, box 3.5 % (the box stage trains a fresh head on few steps).
STAGE_BAND = 0.08


def _staged_command(data_dir, work_dir, strategy):
    cmd = _command(data_dir, work_dir, strategy, STAGED)
    i = cmd.index("retinanet")
    cmd[i] = "decompnet"
    return cmd


@pytest.mark.slow
def test_staged_recipe_under_two_workers_matches_one_process(tmp_path):
    data = str(tmp_path / "data")
    single_dir, multi_dir = str(tmp_path / "single"), str(tmp_path / "multi")
    single = _start(_staged_command(data, single_dir, "default"), str(tmp_path / "single.log"), _env())
    assert not _wait([single], RUN_TIMEOUT_S), f"single-process run hung:\n{_tail(single)}"
    assert single.returncode == 0, _tail(single)
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    workers = [_start(_staged_command(data, multi_dir, "multiworker"), str(tmp_path / f"w{i}.log"),
                      _env({"cluster": cluster, "task": {"type": "worker", "index": i}})) for i in range(2)]
    hung = _wait(workers, RUN_TIMEOUT_S)
    for i, w in enumerate(workers):
        assert w not in hung and w.returncode == 0, f"worker {i}:\n{_tail(w)}"
    with open(os.path.join(single_dir, "run.json")) as f:
        one = json.load(f)
    with open(os.path.join(multi_dir, "run.json")) as f:
        two = json.load(f)
    assert two["num_replicas"] == 2 and one["num_replicas"] == 1
    assert [s["name"] for s in one["stages"]] == [s["name"] for s in two["stages"]] == [
        "category", "instance", "joint", "box"]
    for a, b in zip(one["stages"], two["stages"]):
        assert a["epochs"] * a["steps_per_epoch"] == b["epochs"] * b["steps_per_epoch"]  # same global schedule
        la, lb = np.mean(a["history"]["loss"]), np.mean(b["history"]["loss"])
        print(f"stage {a['name']}: loss 1 worker {la:.5f}, 2 workers {lb:.5f}")
        assert abs(la - lb) <= STAGE_BAND * abs(la), (a["name"], la, lb)
    assert abs(one["stats"]["AP"] - two["stats"]["AP"]) <= AP_ATOL
