"""The callback's AP must equal pycocotools run directly on the same detections."""
import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from evaluation_testdata import (
    LookupDetector,
    CATEGORY_IDS,
    IMAGES,
    direct_cocoeval,
    perturbed_results,
    to_network_batch,
)

from kerasdet.evaluation import STAT_KEYS, CocoEvalCallback, evaluate_model

IMAGE_IDS = sorted(IMAGES)
SCALES = {11: 0.5, 22: 2.0, 33: 1.0, 44: 0.25}
MAX_DET = 16


def _make_table(results):
    """Detections per image id (rows indexed by the id itself), in network pixels. Rows
    past num_detections carry a valid class to check that they are ignored."""
    size = max(IMAGE_IDS) + 1
    ids = list(range(size))
    scales = [SCALES.get(i, 1.0) for i in ids]
    table = to_network_batch(results, ids, scales, MAX_DET)
    for i in IMAGE_IDS:
        n = table["num_detections"][i]
        if n < MAX_DET:
            table["classes"][i, n:] = 0
            table["boxes"][i, n:] = [1.0, 1.0, 40.0, 40.0]
            table["scores"][i, n:] = 0.99
    return table


def _dataset(batch_size=2):
    n = len(IMAGE_IDS)
    images = np.random.default_rng(0).uniform(size=(n, 8, 8, 3)).astype(np.float32)
    images[:, 0, 0, 0] = IMAGE_IDS
    labels = {
        "image_id": np.array(IMAGE_IDS, np.int64),
        "image_scale": np.array([SCALES[i] for i in IMAGE_IDS], np.float32),
        # ignored by the callback, present as a real loader's labels would be
        "boxes": np.zeros((n, 3, 4), np.float32),
        "classes": np.full((n, 3), -1, np.int32),
    }
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)


def _reference(gt_path, results):
    """pycocotools directly, on the detections as the model emits them (float32)."""
    rounded = [dict(r, score=float(np.float32(r["score"])),
                    bbox=[float(np.float32(v)) for v in r["bbox"]]) for r in results]
    return dict(zip(STAT_KEYS, direct_cocoeval(gt_path, rounded, IMAGE_IDS)))


def _event_scalars(log_dir):
    files = glob.glob(os.path.join(str(log_dir), "validation", "events.out.tfevents.*"))
    assert files, f"no event file under {log_dir}/validation"
    found, plugins = {}, set()
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
                if value.metadata.plugin_data.plugin_name:
                    plugins.add(value.metadata.plugin_data.plugin_name)
    assert plugins == {"scalars"}  # shown by TensorBoard's scalar dashboard
    return found


def test_fit_history_ap_equals_pycocotools(coco_gt_file, tmp_path):
    results = perturbed_results(seed=3)
    want = _reference(coco_gt_file, results)
    assert 0.0 < want["AP"] < 1.0

    model = LookupDetector(_make_table(results))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    log_dir = tmp_path / "logs"
    callback = CocoEvalCallback(_dataset(), str(coco_gt_file), category_ids=CATEGORY_IDS,
                                log_dir=str(log_dir), verbose=0)
    history = model.fit(_dataset(), epochs=2, callbacks=[callback], verbose=0,
                        shuffle=False)

    assert float(model.w.numpy()) != 0.0  # it did train
    for key in STAT_KEYS:
        assert history.history["val_" + key] == [want[key], want[key]], key
    assert callback.last_stats == want

    scalars = _event_scalars(log_dir)
    for step in (0, 1):
        assert scalars[("val_AP", step)] == pytest.approx(want["AP"], abs=1e-7)
        assert scalars[("val_AP50", step)] == pytest.approx(want["AP50"], abs=1e-7)

    # the script helper is the same code path
    assert evaluate_model(model, _dataset(batch_size=3), coco_gt_file,
                          category_ids=CATEGORY_IDS) == want


def test_every_n_epochs(coco_gt_file):
    results = perturbed_results(seed=4)
    model = LookupDetector(_make_table(results))
    callback = CocoEvalCallback(_dataset(), coco_gt_file, category_ids=CATEGORY_IDS,
                                every_n_epochs=2, prefix="coco_", verbose=0)
    callback.set_model(model)
    logs0, logs1 = {"loss": 1.0}, {"loss": 0.5}
    callback.on_epoch_end(0, logs0)
    assert logs0 == {"loss": 1.0} and callback.last_stats is None
    callback.on_epoch_end(1, logs1)
    assert logs1["coco_AP"] == _reference(coco_gt_file, results)["AP"]
    assert set(logs1) == {"loss"} | {"coco_" + k for k in STAT_KEYS}
    callback.on_epoch_end(2, None)  # logs=None must not crash


def test_callback_zero_detections(coco_gt_file, capsys):
    model = LookupDetector(_make_table([]))
    callback = CocoEvalCallback(_dataset(), coco_gt_file, category_ids=CATEGORY_IDS,
                                verbose=1)
    callback.set_model(model)
    logs = {}
    callback.on_epoch_end(0, logs)
    assert all(logs["val_" + k] == 0.0 for k in STAT_KEYS)
    assert "val_AP=0.0000" in capsys.readouterr().out


def test_dataset_without_image_id_is_a_clear_error(coco_gt_file):
    model = LookupDetector(_make_table([]))
    ds = tf.data.Dataset.from_tensor_slices(
        (np.zeros((2, 8, 8, 3), np.float32), {"image_scale": np.ones(2, np.float32)})
    ).batch(2)
    with pytest.raises(ValueError, match="image_id"):
        evaluate_model(model, ds, coco_gt_file, category_ids=CATEGORY_IDS)


_MIRRORED_SCRIPT = r"""
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
sys.path.insert(0, sys.argv[1])
import test_callback as t
from evaluation_testdata import CATEGORY_IDS, perturbed_results
from kerasdet.evaluation import CocoEvalCallback
results = perturbed_results(seed=3)
with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
    model = t.LookupDetector(t._make_table(results))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
cb = CocoEvalCallback(t._dataset(), sys.argv[2], category_ids=CATEGORY_IDS, verbose=0)
history = model.fit(t._dataset(), epochs=1, callbacks=[cb], verbose=0, shuffle=False)
print("RESULT", json.dumps(history.history["val_AP"]))
"""


@pytest.mark.slow  # ~16 s: a fresh process with 2 logical CPUs
def test_callback_under_mirrored_strategy(coco_gt_file, tmp_path):
    """Keras' predict_on_batch duplicates a batch per replica; the callback must not."""
    import json
    import subprocess
    import sys

    script = tmp_path / "mirrored.py"
    script.write_text(_MIRRORED_SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    proc = subprocess.run(
        [sys.executable, str(script), os.path.dirname(__file__), str(coco_gt_file)],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    want = _reference(coco_gt_file, perturbed_results(seed=3))["AP"]
    assert json.loads(line[len("RESULT "):]) == [want]


class XywhLookupDetector(LookupDetector):
    """The same detections, predicted in the ``xywh`` box format (a model built with
    ``bounding_box_format="xywh"``)."""

    bounding_box_format = "xywh"

    def predict_step(self, data):
        out = super().predict_step(data)
        y0, x0, y1, x1 = tf.unstack(tf.cast(out["boxes"], tf.float32), axis=-1)
        return dict(out, boxes=tf.stack([x0, y0, x1 - x0, y1 - y0], axis=-1))

    def boxes_to_internal(self, boxes, image_shape):
        from kerasdet.boxes import convert_format

        return convert_format(boxes, source="xywh", target="yxyx", height=image_shape[0], width=image_shape[1])


def test_a_model_predicting_another_box_format_scores_the_same(coco_gt_file):
    results = perturbed_results(seed=5)
    plain = evaluate_model(LookupDetector(_make_table(results)), _dataset(), coco_gt_file, category_ids=CATEGORY_IDS)
    xywh = evaluate_model(XywhLookupDetector(_make_table(results)), _dataset(), coco_gt_file,
                          category_ids=CATEGORY_IDS)
    assert plain["AP"] > 0.1
    for key in STAT_KEYS:
        np.testing.assert_allclose(xywh[key], plain[key], atol=1e-6)
