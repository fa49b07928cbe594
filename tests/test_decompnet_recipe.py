"""recipes/decompnet.py: the presets follow the paper's protocol and App. B sizes; the
stage runner fits each stage once with its warm-up."""
import importlib.util
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recipe():
    spec = importlib.util.spec_from_file_location("decompnet_recipe", os.path.join(ROOT, "recipes", "decompnet.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_presets_follow_the_paper_protocol_and_sizes():
    recipe = _recipe()
    gen = recipe.PRESETS["paper"]["data"]["generate"]
    assert (gen["num_train"], gen["num_val"]) == (30000, 10000)
    assert gen["classes"] == (3, 6, 9) and gen["image_size"] == (100, 100) and gen["num_clutter"] == 30
    assert (gen["min_digits"], gen["max_digits"], gen["scale_range"], gen["max_iou"]) == (5, 10, (0.5, 2.0), 0.2)
    assert [s["stage"] for s in recipe.PRESETS["paper"]["train"]["stages"]] == ["category", "instance", "joint", "box"]
    model = recipe.build_model(recipe.PRESETS["paper"], 3)
    assert model.map_size == (50, 50) and model.steps == 11
    assert 19.0e6 < model.decomposer.count_params() < 19.5e6  # spec: "about 19 M", 2048-unit RNN
    assert recipe.build_model(recipe.PRESETS["paper_full"], 3).map_size == (100, 100)
    digits = recipe.build_model(recipe.PRESETS["digits"], 3)  # the CPU run: same protocol, ConvGRU cell
    assert recipe.PRESETS["digits"]["data"]["generate"]["classes"] == (3, 6, 9)
    assert digits.map_size == (50, 50) and digits.decomposer.cell == "conv_gru" and digits.stop == "bright"


def test_train_stages_runs_each_stage():
    import tensorflow as tf

    recipe = _recipe()
    config = {"input": {"image_size": (40, 40)},
              "model": dict(steps=3, max_instances=2, units=16, instance_filters=4, category_widths=(4,) * 6,
                            box_hidden=8),
              "train": {"optimizer": "adam", "weight_decay": 0.0, "clipnorm": 5.0,
                        "stages": [{"stage": "category", "epochs": 2, "lr": 1e-3, "warmup_epochs": 1},
                                   {"stage": "box", "epochs": 1, "lr": 1e-3}]}}
    model = recipe.build_model(config, 3)
    images = np.zeros((4, 40, 40, 3), np.float32)
    images[:, 5:15, 5:15] = 255
    labels = {"boxes": np.tile(np.array([[[5, 5, 15, 15], [0, 0, 0, 0]]], np.float32), (4, 1, 1)),
              "classes": np.tile(np.array([[0, -1]], np.int32), (4, 1)),
              "masks": np.zeros((4, 2, 40, 40), np.uint8)}
    labels["masks"][:, 0, 5:15, 5:15] = 1
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(2).repeat()
    done = recipe.train_stages(model, ds, config, steps_per_epoch=2, verbose=0)
    assert [s for s, _, _ in done] == ["category", "box"]
    assert len(done[0][2]["category"]) == 2 and done[1][2]["category"] == [0.0]
    assert float(model.p.numpy()) == 1.0
