"""recipes/assd.py: presets build, digits presets differ only in attention/fusion, CLI trains it."""
import os

import numpy as np
import pytest
import tensorflow as tf

from kerasdet import cli


def test_digits_presets_same_budget_and_build():
    recipe = cli.load_recipe("assd")
    ssd, assd = cli.get_config(recipe, "ssd_digits"), cli.get_config(recipe, "assd_digits")
    assert {k: v for k, v in ssd.items() if k != "model"} == {k: v for k, v in assd.items() if k != "model"}
    diff = {k for k in set(ssd["model"]) | set(assd["model"]) if ssd["model"].get(k) != assd["model"].get(k)}
    assert diff == {"attention", "fusion"}
    counts = []
    for config in (ssd, assd):
        model = recipe.build_model(config, 10)
        out = model(tf.zeros((1, 128, 128, 3)))
        # 16/8/4/2/1 cells, 4 boxes each
        assert out["class_logits"].shape == (1, 4 * (256 + 64 + 16 + 4 + 1), 11)
        counts.append(model.count_params())
    assert counts[1] > counts[0]


def test_paper_presets_follow_the_paper():
    recipe = cli.load_recipe("assd")
    for name, size, batch, epochs, decays in (("assd321", 321, 80, 160, (100, 150)), ("assd513", 513, 64, 140, (80, 130))):
        config = cli.get_config(recipe, name)
        assert config["input"]["image_size"] == (size, size) and config["input"]["ssd_augmentation"]
        train = config["train"]
        assert (train["lr"], train["momentum"], train["weight_decay"], train["batch_size"]) == (1e-3, 0.9, 5e-4, batch)
        assert train["epochs"] == epochs and train.get("warmup_steps") == 0
        np.testing.assert_allclose(np.array(train["decay_at"]) * epochs, decays)
        assert config["backbone"]["name"] == "resnet101"
        assert config["model"]["attention"] and config["model"]["fusion"]


@pytest.mark.slow
def test_cli_trains_exports_assd_digits(tmp_path):
    work, data = str(tmp_path / "run"), str(tmp_path / "data")
    summary = cli.main([
        "train", "--recipe", "assd", "--preset", "assd_digits", "--epochs", "1", "--work-dir", work,
        "--export-dir", str(tmp_path / "sm"), "--data-dir", data, "--num-draw", "1", "--verbose", "0",
        "--set", "data.generate.num_train=32", "--set", "data.generate.num_val=8",
        "--set", "train.batch_size=8", "--set", "eval.batch_size=8",
        "--set", "backbone.widths=[8,16,16,16]", "--set", "backbone.blocks=[0,0,0,0]",
    ])
    assert np.isfinite(summary["stats"]["AP"])
    assert os.path.isfile(str(tmp_path / "sm" / "saved_model.pb"))
