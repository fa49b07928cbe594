"""The tiny two-stage models of the legacy-weights fixtures (``tests/fixtures/two_stage``).

Written once by ``tests/fixtures/make_two_stage_fixtures.py`` with the code before the
RegionProposalNetwork refactor; :func:`assert_matches_fixture` checks the current code
against them: same weight paths, same ``.weights.h5`` layout, same parameter count, and the
old file loads into a model built from the old config with identical detections and losses.
"""
import json
import os
import re

import numpy as np

from model_testutils import tiny_batch

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "two_stage")


def fixture_inputs():
    images, labels = tiny_batch(batch=2, seed=7)
    return images, labels


def _small(levels):
    from kerasdet.backbones import small_backbone

    return small_backbone(widths=(4, 8, 8, 8), blocks=(0, 0, 0, 0), levels=levels)


def faster_rcnn_fpn():
    from kerasdet.models.faster_rcnn import FasterRCNN

    model = FasterRCNN(
        backbone=_small(("C2", "C3", "C4", "C5")), num_classes=3, fpn_channels=8, rpn_channels=8, anchor_size=4.0,
        canonical_size=112.0, rpn_pre_nms_topk_train=100, rpn_post_nms_topk_train=40, rpn_pre_nms_topk_test=100,
        rpn_post_nms_topk_test=30, num_rois=16, roi_output_size=4, fc_dim=8, max_detections=20,
        score_threshold=0.0,
    )
    model.build((None, 64, 64, 3))
    return model


def faster_rcnn_c4():
    from kerasdet.models.faster_rcnn import FasterRCNN

    model = FasterRCNN(
        backbone=_small(("C4",)), num_classes=3, architecture="c4", feature_level=4, anchor_size=1.0,
        scales=(1.0, 2.0), roi_pooler="crop_pool", crop_size=6, rpn_channels=8, fc_dim=8, dropout=0.5,
        rpn_post_nms_topk_train=16, rpn_post_nms_topk_test=16, num_rois=16, max_detections=20, score_threshold=0.0,
    )
    model.build((None, 64, 64, 3))
    return model


def _rfcn(global_branch):
    from kerasdet.backbones import small_backbone
    from kerasdet.models.rfcn import RFCN

    model = RFCN(
        backbone=small_backbone(widths=(4, 8, 8, 8), blocks=(0, 0, 0, 0), levels=("C4", "C5"), dilate_c5=True),
        num_classes=3, global_branch=global_branch, conv_new_channels=8, group_size=3, psroi_method="align",
        global_pool_size=3, global_channels=8, rpn_channels=8, anchor_size=1.0, scales=(1.0, 2.0),
        rpn_pre_nms_topk_train=100, rpn_post_nms_topk_train=24, rpn_pre_nms_topk_test=100, rpn_post_nms_topk_test=24,
        rpn_min_size=0.0, ohem_rois=12, max_detections=20, score_threshold=0.0,
    )
    model.build((None, 64, 64, 3))
    return model


def rfcn():
    return _rfcn(False)


def couplenet():
    return _rfcn(True)


#: Options added after a fixture was written, at the values that reproduce the old model
#: (SMN's fc7 / m-fc7 balance came after the fixture: the plain concatenation).
_NEW_KEYS = {"smn": {"fusion_norm": "none", "train_mode": "steps"}}


def assert_old_config_kept(config, old, name):
    """``config`` (the current code's) equals the fixture's ``old`` config on every old key,
    and adds only the options that came later, at their legacy values."""
    assert {k: config[k] for k in old} == old
    assert {k: v for k, v in config.items() if k not in old} == _NEW_KEYS.get(name, {})


def smn():
    from kerasdet.models.smn import SMN

    model = SMN(base=faster_rcnn_c4(), num_steps=2, num_base_writes=2, num_memory_steps=2, memory_channels=4,
                crop_size=3, memory_roi_crop=4, memory_roi_pool=1, memory_rpn_channels=4, memory_fc_dim=8,
                fusion_dim=8, num_rois=12, rpn_batch_size=16, max_detections=20, score_threshold=0.0,
                **_NEW_KEYS["smn"])
    model.build((None, 64, 64, 3))
    return model


MODELS = {"faster_rcnn_fpn": faster_rcnn_fpn, "faster_rcnn_c4": faster_rcnn_c4, "rfcn": rfcn,
          "couplenet": couplenet, "smn": smn}


def load_fixture(name):
    with open(os.path.join(FIXTURE_DIR, f"{name}.json")) as f:
        record = json.load(f)
    outputs = dict(np.load(os.path.join(FIXTURE_DIR, f"{name}.npz")))
    return record, outputs, os.path.join(FIXTURE_DIR, f"{name}.weights.h5")


def h5_datasets(path):
    """The dataset names of a ``.weights.h5`` file (its layout), sorted."""
    import h5py

    names = []
    with h5py.File(path, "r") as f:
        f.visit(lambda n: names.append(n) if isinstance(f[n], h5py.Dataset) else None)
    return sorted(names)


def _unnumbered(paths):
    """Weight paths without Keras' uniquifying suffix of auto-named models
    (``faster_rcnn_2/rpn_head/...`` -> ``faster_rcnn/rpn_head/...``): it counts the models
    made before in the process."""
    return [re.sub(r"^(faster_rcnn|rfcn|smn)_\d+/", r"\1/", p) for p in paths]


def assert_matches_fixture(name, tmp_path):
    """The current code against the legacy fixture ``name`` (see the module docstring)."""
    import keras
    import tensorflow as tf

    record, expected, weights = load_fixture(name)
    images, labels = fixture_inputs()
    keras.utils.set_random_seed(11)  # as the writer: the same sampling seed state
    model = MODELS[name]()  # the same arguments, the current code
    assert _unnumbered([v.path for v in model.weights]) == _unnumbered(record["paths"])
    assert model.count_params() == record["count_params"]
    path = str(tmp_path / f"{name}.weights.h5")
    model.save_weights(path)
    assert h5_datasets(path) == record["h5"]  # the file layout is the old one
    model.load_weights(weights)
    keras.utils.set_random_seed(12)
    losses = model.detection_losses(tf.constant(images), labels, training=False)
    assert sorted(losses) == sorted(k[len("loss/"):] for k in expected if k.startswith("loss/"))
    for key, value in losses.items():
        np.testing.assert_array_equal(float(value), expected[f"loss/{key}"], err_msg=key)
    # a model built from the OLD config (no new keys) loads the OLD weights file
    restored = type(model).from_config(record["config"])
    restored.build((None, 64, 64, 3))
    restored.load_weights(weights)
    assert_old_config_kept(restored.get_config(), record["config"], name)
    for out in (restored.detect(tf.constant(images)), model.detect(tf.constant(images))):
        for key in ("boxes", "scores", "classes", "num_detections"):
            np.testing.assert_array_equal(out[key].numpy(), expected[key], err_msg=key)
    return restored


def assert_legacy_keras_file_loads(name, tmp_path):
    """A ``.keras`` archive of the legacy fixture ``name`` (its OLD config and OLD weights
    file, assembled as ``model.save`` writes one: ``config.json``, ``metadata.json``,
    ``model.weights.h5``) loads with ``keras.models.load_model`` (no custom objects) and
    detects bitwise as the old code did."""
    import zipfile

    import keras
    import tensorflow as tf

    record, expected, weights = load_fixture(name)
    model = type(MODELS[name]()).from_config(record["config"])
    serialized = keras.saving.serialize_keras_object(model)
    serialized["config"] = record["config"]
    serialized["build_config"] = {"input_shape": [None, 64, 64, 3]}
    path = str(tmp_path / f"{name}.keras")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps(serialized))
        archive.writestr("metadata.json", json.dumps({"keras_version": keras.__version__}))
        archive.write(weights, "model.weights.h5")
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(model)
    assert_old_config_kept(loaded.get_config(), record["config"], name)
    images, _ = fixture_inputs()
    out = loaded.detect(tf.constant(images))
    for key in ("boxes", "scores", "classes", "num_detections"):
        np.testing.assert_array_equal(out[key].numpy(), expected[key], err_msg=key)
