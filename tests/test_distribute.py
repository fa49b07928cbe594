"""``model.fit`` of a detector under ``tf.distribute`` equals single-device training.

Each strategy case runs in a fresh subprocess: splitting the CPU into 2 logical devices
(for ``MirroredStrategy``) and creating a ``MultiWorkerMirroredStrategy`` must happen before
any other TensorFlow op, which the pytest process has long done. The subprocess is this
file run as a script (``python tests/test_distribute.py fit ...``, see ``_main``); every
subprocess runs under a hard timeout and is killed past it, so a hung collective (a worker
whose peer died waits forever, PLATFORM.md) can never stall the test run.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

GLOBAL_BATCH = 4
NUM_BATCHES = 3
EPOCHS = 2  # 6 optimizer steps
IMAGE_SIZE = 64
WORKER_TIMEOUT_S = 180  # per run of workers; a hung collective is killed past it

# Tolerances (float32 on CPU; PLATFORM.md measured 7e-8 agreement for 1 vs 2 replicas).
# Per-replica conv/BN sums are added in a different order, so agreement is to float32
# round-off, amplified a little by 6 SGD steps. A loss-scaling bug shows up as a 2x error.
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4


# --- pieces shared by the pytest process and the workers --------------------------------
def tiny_retinanet():
    """A tiny RetinaNet (P3-P5, 16-channel FPN/head, 2 anchors per location)."""
    from kerasdet.backbones import small_backbone
    from kerasdet.models.retinanet import RetinaNet

    return RetinaNet(
        backbone=small_backbone(widths=(8, 16, 16, 16), blocks=(0, 1, 0, 0)),
        num_classes=3,
        min_level=3,
        max_level=5,
        fpn_channels=16,
        head_convs=1,
        head_channels=16,
        anchor_size=2.0,
        aspect_ratios=(1.0,),
        scales=(1.0, 1.5),
        weight_decay=1e-4,
    )


def fixed_data(num_images=GLOBAL_BATCH * NUM_BATCHES, size=IMAGE_SIZE, seed=0):
    """Deterministic images with 0-2 bright squares each (some images have no objects)."""
    rng = np.random.RandomState(seed)
    images = rng.uniform(0, 40, (num_images, size, size, 3)).astype("float32")
    boxes = np.zeros((num_images, 3, 4), "float32")
    classes = np.full((num_images, 3), -1, "int32")
    for i in range(num_images):
        for j in range(i % 3):  # 0, 1 or 2 objects
            y, x = rng.randint(0, size - 24, 2)
            s = rng.randint(12, 24)
            boxes[i, j] = [y, x, y + s, x + s]
            classes[i, j] = rng.randint(0, 3)
            images[i, y : y + s, x : x + s, classes[i, j]] = 255.0
    return images, {"boxes": boxes, "classes": classes}


def _build(model):
    """Creates every weight eagerly (one forward pass on a zero batch)."""
    import tensorflow as tf

    model(tf.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), tf.float32))
    return model


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# --- worker (subprocess) ----------------------------------------------------------------
def _fit_worker(args):
    """Fits the tiny model from ``args.weights``; writes logs (json) + final weights (npz)."""
    from kerasdet import distribute

    if args.strategy == "mirrored":
        distribute.split_cpu(2)  # before any other TF op
        strategy = distribute.get_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
    else:
        strategy = distribute.get_strategy(args.strategy)  # MWMS reads TF_CONFIG here

    import keras
    import tensorflow as tf

    images, labels = fixed_data()
    options = tf.data.Options()
    # MWMS: every worker builds the same in-memory dataset; shard it by element, so the
    # global batch of each step is the same as on one device (worker i takes half i).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = (
        tf.data.Dataset.from_tensor_slices((images, labels))
        .batch(GLOBAL_BATCH, drop_remainder=True)  # never an empty per-replica batch
        .with_options(options)
    )

    with strategy.scope():
        model = _build(tiny_retinanet())
        model.load_weights(args.weights)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05, momentum=0.9))

    first_loss = None
    if args.strategy == "default":
        # The global loss at the initial weights, computed directly: what step 1 must log.
        first = {k: v[:GLOBAL_BATCH] for k, v in labels.items()}
        total, _ = model._total_loss(tf.constant(images[:GLOBAL_BATCH]), first, training=True)
        first_loss = float(total)
        model.load_weights(args.weights)  # training=True moved the BN moving statistics

    step_logs = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step_logs.append({k: _scalar(v) for k, v in logs.items()})

    start = time.time()
    history = model.fit(
        dataset, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=[Record()],
        validation_data=dataset.take(1),
    )
    result = {
        "replicas": strategy.num_replicas_in_sync,
        "strategy": type(strategy).__name__,
        "multi_worker": isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy),
        "step_logs": step_logs,
        "epoch_logs": {k: [_scalar(x) for x in v] for k, v in history.history.items()},
        "first_loss": first_loss,
        "fit_seconds": time.time() - start,
    }
    np.savez(args.out + ".npz", *[np.asarray(w) for w in model.get_weights()])
    with open(args.out + ".json", "w") as f:
        json.dump(result, f)


def _scalar(value):
    value = np.asarray(value)
    assert value.size == 1, value.shape  # logs are one number each, whatever their rank
    return float(value.reshape(-1)[0])


def _main(argv=None):
    parser = argparse.ArgumentParser(description="test_distribute worker")
    parser.add_argument("command", choices=["fit"])
    parser.add_argument("--strategy", required=True, choices=["default", "mirrored", "multiworker"])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    _fit_worker(args)


# --- helpers of the tests ---------------------------------------------------------------
def _start_worker(strategy, weights, out, tf_config=None):
    """Starts ``python tests/test_distribute.py fit ...`` (stdout+stderr to ``out.log``)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    cmd = [sys.executable, os.path.abspath(__file__), "fit", "--strategy", strategy, "--weights", weights, "--out", out]
    if shutil.which("timeout"):
        # A second guard: the worker dies on time even if pytest itself is killed.
        cmd = ["timeout", "-s", "KILL", str(WORKER_TIMEOUT_S + 10)] + cmd
    log = open(out + ".log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    log.close()
    proc.out = out
    return proc


def _wait_all(procs, timeout=WORKER_TIMEOUT_S):
    """Waits for every worker; kills all of them when any one fails or time runs out."""
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break  # a peer of a failed worker would wait forever in its next collective
        time.sleep(0.2)
    killed = [p for p in procs if p.poll() is None]
    for p in killed:
        p.kill()
        p.wait()
    failed = [p for p in procs if p.returncode != 0 and p not in killed]
    if failed or killed:
        culprit = (failed or killed)[0]
        with open(culprit.out + ".log") as f:
            log = f.read()
        pytest.fail(
            f"workers failed: {[os.path.basename(p.out) for p in failed]}, killed (hung or peer failed, "
            f"timeout {timeout} s): {[os.path.basename(p.out) for p in killed]}; "
            f"log of {os.path.basename(culprit.out)} ends with:\n{log[-4000:]}"
        )
    return [_load(p.out) for p in procs]


def _load(out):
    with open(out + ".json") as f:
        result = json.load(f)
    with np.load(out + ".npz") as z:
        weights = [z[f"arr_{i}"] for i in range(len(z.files))]
    return result, weights


def _max_weight_diff(a, b):
    assert len(a) == len(b)
    return max(float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(a, b))


def _curve(result, key="loss"):
    return [step[key] for step in result["step_logs"]]


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory):
    """Weights of one tiny model (saved once): every run starts from them."""
    import keras

    path = str(tmp_path_factory.mktemp("distribute") / "init.weights.h5")
    keras.utils.set_random_seed(0)
    model = _build(tiny_retinanet())
    model.save_weights(path)
    return path, [np.asarray(w) for w in model.get_weights()]


@pytest.fixture(scope="module")
def reference(initial_weights, tmp_path_factory):
    """``(logs, final weights)`` of the default-strategy (one device) run, made once.

    Runs alone rather than next to the distributed workers: on 2 cores, a third process
    slows the workers' collectives far more than it saves.
    """
    out = str(tmp_path_factory.mktemp("distribute") / "default")
    return _wait_all([_start_worker("default", initial_weights[0], out)])[0]


# --- tests ------------------------------------------------------------------------------
class _FakeStrategy:
    """Stands in for a strategy class: records its arguments, starts no server."""

    num_replicas_in_sync = 2

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def test_num_workers_from_tf_config(monkeypatch):
    from kerasdet.distribute import num_workers_from_tf_config

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert num_workers_from_tf_config() == 1
    config = {"cluster": {"chief": ["h:1"], "worker": ["h:2", "h:3"]}, "task": {"type": "worker", "index": 0}}
    assert num_workers_from_tf_config(json.dumps(config)) == 3
    assert num_workers_from_tf_config(config) == 3  # an already-parsed dict
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {}}))
    assert num_workers_from_tf_config() == 2
    monkeypatch.setenv("TF_CONFIG", " ")
    assert num_workers_from_tf_config() == 1
    assert num_workers_from_tf_config(json.dumps({"cluster": {}})) == 1

    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1",]}')
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        num_workers_from_tf_config()
    with pytest.raises(ValueError, match="JSON object"):
        num_workers_from_tf_config("[1, 2]")
    with pytest.raises(ValueError, match="'cluster' must be an object"):
        num_workers_from_tf_config('{"cluster": ["a:1"]}')
    with pytest.raises(ValueError, match="cluster.worker"):
        num_workers_from_tf_config('{"cluster": {"worker": "a:1"}}')


def test_get_strategy_selection(monkeypatch):
    import tensorflow as tf

    from kerasdet.distribute import get_strategy

    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", type("FakeMWMS", (_FakeStrategy,), {}))
    monkeypatch.setattr(tf.distribute, "MirroredStrategy", type("FakeMirrored", (_FakeStrategy,), {}))

    with pytest.raises(ValueError, match="Unknown strategy 'tpu'"):
        get_strategy("tpu")
    with pytest.raises(ValueError, match="devices=.*only applies to kind='mirrored'"):
        get_strategy("default", devices=["/cpu:0"])

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert get_strategy("default") is tf.distribute.get_strategy()
    mirrored = get_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
    assert type(mirrored).__name__ == "FakeMirrored" and mirrored.kwargs == {"devices": ["/cpu:0", "/cpu:1"]}
    assert type(get_strategy("multiworker")).__name__ == "FakeMWMS"

    # "auto": several workers in TF_CONFIG -> multi-worker; else several GPUs -> mirrored;
    # else the default strategy.
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: [])
    assert get_strategy("auto") is tf.distribute.get_strategy()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["h:1"]}, "task": {"type": "worker", "index": 0}}))
    assert get_strategy("auto") is tf.distribute.get_strategy()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["h:1", "h:2"]}, "task": {"type": "worker", "index": 1}}))
    assert type(get_strategy("auto")).__name__ == "FakeMWMS"
    monkeypatch.delenv("TF_CONFIG")
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: ["/gpu:0", "/gpu:1"] if kind == "GPU" else [])
    auto = get_strategy("auto")
    assert type(auto).__name__ == "FakeMirrored" and auto.kwargs == {"devices": None}

    # A malformed TF_CONFIG is a clear error, never a crash deep inside TensorFlow.
    monkeypatch.setenv("TF_CONFIG", "{not json")
    for kind in ("auto", "multiworker"):
        with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
            get_strategy(kind)


def test_real_mirrored_strategy_and_split_cpu_errors():
    import tensorflow as tf

    from kerasdet.distribute import get_strategy, split_cpu

    strategy = get_strategy("mirrored", devices=["/cpu:0"])
    assert isinstance(strategy, tf.distribute.MirroredStrategy) and strategy.num_replicas_in_sync == 1
    with pytest.raises(ValueError, match="num_devices must be >= 1"):
        split_cpu(0)
    tf.constant(1.0) + 1.0  # the runtime is initialized from here on
    with pytest.raises(RuntimeError, match="before any other TensorFlow op"):
        split_cpu(3)


@pytest.mark.slow
def test_mirrored_fit_matches_default_strategy(initial_weights, reference, tmp_path):
    """Same loss trajectory, logs and final weights on 2 replicas as on one device."""
    (ref, ref_w) = reference
    [(mir, mir_w)] = _wait_all([_start_worker("mirrored", initial_weights[0], str(tmp_path / "mirrored"))])
    assert ref["replicas"] == 1 and mir["replicas"] == 2, (ref["strategy"], mir["strategy"])

    steps = NUM_BATCHES * EPOCHS
    assert len(ref["step_logs"]) == len(mir["step_logs"]) == steps
    # Step 1 logs the global loss of the first global batch at the initial weights
    # (computed directly on one device), not a per-replica half (or double) of it.
    np.testing.assert_allclose(ref["step_logs"][0]["loss"], ref["first_loss"], rtol=LOSS_RTOL)
    np.testing.assert_allclose(mir["step_logs"][0]["loss"], ref["first_loss"], rtol=LOSS_RTOL)
    # Every logged term agrees at every step (running means within an epoch) and in the
    # History (per epoch, validation included).
    for key in ("loss", "cls_loss", "box_loss", "weight_decay"):
        np.testing.assert_allclose(_curve(mir, key), _curve(ref, key), rtol=LOSS_RTOL, err_msg=key)
    assert set(mir["epoch_logs"]) == set(ref["epoch_logs"]) >= {"loss", "val_loss", "val_cls_loss"}
    for key, values in ref["epoch_logs"].items():
        np.testing.assert_allclose(mir["epoch_logs"][key], values, rtol=LOSS_RTOL, err_msg=key)
    # The weights really moved, so agreeing weights mean agreeing updates ...
    assert _max_weight_diff(ref_w, initial_weights[1]) > 1e-2
    # ... and both runs end at the same weights (synchronized-BN moving statistics included).
    loss_diff = float(np.max(np.abs(np.subtract(_curve(mir), _curve(ref))) / np.abs(_curve(ref))))
    weight_diff = _max_weight_diff(mir_w, ref_w)
    print(f"\nmirrored vs default: max rel loss diff {loss_diff:.2g}, max |weight diff| {weight_diff:.2g}")
    assert weight_diff <= WEIGHT_ATOL


@pytest.mark.slow
def test_multiworker_fit_two_workers(initial_weights, reference, tmp_path):
    """2 workers on 127.0.0.1 train to identical weights, equal to the one-device run."""
    (ref, ref_w) = reference
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    start = time.time()
    workers = [
        _start_worker("multiworker", initial_weights[0], str(tmp_path / f"worker{i}"),
                      tf_config={"cluster": cluster, "task": {"type": "worker", "index": i}})
        for i in range(2)
    ]
    (r0, w0), (r1, w1) = _wait_all(workers)
    elapsed = time.time() - start
    assert r0["multi_worker"] and r0["replicas"] == r1["replicas"] == 2, r0["strategy"]
    assert len(r0["step_logs"]) == len(r1["step_logs"]) == NUM_BATCHES * EPOCHS
    # Both workers log the same (all-reduced, global) losses as the one-device run.
    assert r0["step_logs"] == r1["step_logs"] and r0["epoch_logs"] == r1["epoch_logs"]
    np.testing.assert_allclose(_curve(r0), _curve(ref), rtol=LOSS_RTOL)
    for key, values in ref["epoch_logs"].items():
        np.testing.assert_allclose(r0["epoch_logs"][key], values, rtol=LOSS_RTOL, err_msg=key)
    # Identical weights on both workers (same all-reduced update), equal to one device's.
    assert _max_weight_diff(w0, initial_weights[1]) > 1e-2
    assert _max_weight_diff(w0, w1) == 0.0
    weight_diff = _max_weight_diff(w0, ref_w)
    print(f"\nMWMS: 2 workers in {elapsed:.1f} s, max |weight diff| vs default {weight_diff:.2g}")
    assert weight_diff <= WEIGHT_ATOL


if __name__ == "__main__":
    _main()


# --- the step-addressable stream sharded per worker (no strategy needed) -------------------
def _stream(source, input_context=None, start_batch=0, batch=4):
    from kerasdet.data.pipeline import make_dataset

    return make_dataset(source, batch_size=batch, image_size=(64, 64), training=True, flip=True,
                        scale_jitter=(0.8, 1.25), seed=3, repeat=True, start_batch=start_batch,
                        input_context=input_context)


@pytest.mark.parametrize("start_batch", [0, 5])
def test_stream_shards_make_the_global_batch(tmp_path, start_batch):
    """Worker w of 2 yields positions [2w, 2w + 2) of every global batch of 4, pixels and
    augmentation included: together the workers make exactly the single-process batch (no
    image twice, none skipped, data-epoch boundaries and a resumed start included)."""
    import tensorflow as tf

    from kerasdet.data.coco import load_coco
    from test_callbacks import make_images

    source = load_coco(*make_images(str(tmp_path), n=7))  # batches straddle data epochs
    steps = 6
    whole = list(_stream(source, start_batch=start_batch).take(steps))
    parts = [
        list(_stream(source, tf.distribute.InputContext(2, w, 2), start_batch=start_batch).take(steps))
        for w in (0, 1)
    ]
    for k in range(steps):
        images, labels = whole[k]
        assert [p[k][0].shape[0] for p in parts] == [2, 2]
        np.testing.assert_array_equal(
            np.concatenate([p[k][1]["image_id"].numpy() for p in parts]), labels["image_id"].numpy())
        np.testing.assert_array_equal(np.concatenate([p[k][0].numpy() for p in parts]), images.numpy())
        np.testing.assert_array_equal(
            np.concatenate([p[k][1]["boxes"].numpy() for p in parts]), labels["boxes"].numpy())
    # Each data epoch of the 7 images is read once in all by the two workers together.
    ids = np.concatenate([np.concatenate([p[k][1]["image_id"].numpy() for p in parts]) for k in range(steps)])
    start = start_batch * 4
    for e0 in range(-(-start // 7) * 7, start + len(ids) - 6, 7):
        assert sorted(ids[e0 - start:e0 - start + 7]) == sorted(set(source.image_ids))


def test_stream_shard_needs_a_divisible_global_batch(tmp_path):
    import tensorflow as tf

    from kerasdet.data.coco import load_coco
    from kerasdet.data.pipeline import make_dataset
    from test_callbacks import make_images

    source = load_coco(*make_images(str(tmp_path), n=7))
    with pytest.raises(ValueError, match="cannot be split evenly over 2 replicas"):
        _stream(source, tf.distribute.InputContext(2, 0, 2), batch=3)
    with pytest.raises(ValueError, match="needs repeat=True"):
        make_dataset(source, batch_size=4, image_size=(64, 64), training=True,
                     input_context=tf.distribute.InputContext(2, 0, 2))


def test_fit_resumable_shards_per_worker_only_under_multiworker():
    """Without a multi-worker strategy the training data is make_train_data's own dataset."""
    from kerasdet.callbacks import distribute_train_data
    from kerasdet.distribute import current_input_context, input_context_scope

    seen = []
    data = distribute_train_data(None, lambda s: seen.append((s, current_input_context())) or "ds", 7)
    assert data == "ds" and seen == [(7, None)]
    with input_context_scope("ctx"):
        assert current_input_context() == "ctx"
    assert current_input_context() is None
