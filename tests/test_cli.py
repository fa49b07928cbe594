"""End-to-end CLI: train (generate, fit, pycocotools, export, draw), evaluate, export, predict."""
import json
import os

import numpy as np
import pytest

from kerasdet import cli

TINY = [
    "--set", "data.generate.num_train=32",
    "--set", "data.generate.num_val=8",
    "--set", "train.batch_size=8",
    "--set", "eval.batch_size=8",
    "--set", "backbone.widths=[8,16,16,16]",
    "--set", "backbone.blocks=[0,0,0,0]",
    "--set", "model.fpn_channels=16",
    "--set", "model.head_channels=16",
]


def test_recipe_lookup_and_overrides():
    recipe = cli.load_recipe("retinanet")
    config = cli.get_config(recipe, "digits", {"train.epochs": 3, "model.new_key": 1})
    assert config["train"]["epochs"] == 3 and config["model"]["new_key"] == 1
    assert cli.get_config(recipe, "digits")["model"].get("new_key") is None
    with pytest.raises(ValueError, match="Unknown preset"):
        cli.get_config(recipe, "nope")
    with pytest.raises(FileNotFoundError):
        cli.load_recipe("no_such_recipe")
    paper = cli.get_config(recipe, "paper")
    assert paper["input"]["min_size"] == 800 and paper["input"]["max_size"] == 1333
    assert paper["train"]["lr"] == 0.01 and paper["train"]["decay_steps"] == (60000, 80000)


@pytest.mark.slow
def test_train_evaluate_export_predict(tmp_path):
    work, export_dir, data = str(tmp_path / "run"), str(tmp_path / "sm"), str(tmp_path / "data")
    summary = cli.main(["train", "--epochs", "1", "--work-dir", work, "--export-dir", export_dir,
                        "--data-dir", data, "--num-draw", "2", "--verbose", "0"] + TINY)
    assert set(summary["stats"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert os.path.isfile(os.path.join(export_dir, "saved_model.pb"))
    drawn = sorted(os.listdir(os.path.join(work, "predictions")))
    assert len(drawn) == 2 and all(p.endswith("_det.png") for p in drawn)
    with open(os.path.join(work, "summary.json")) as f:
        assert json.load(f)["stats"]["AP"] == summary["stats"]["AP"]
    weights = os.path.join(work, "model.weights.h5")
    stats = cli.main(["evaluate", "--weights", weights, "--data-dir", data] + TINY)
    np.testing.assert_allclose(stats["AP"], summary["stats"]["AP"], atol=1e-9)
    cli.main(["export", "--weights", weights, "--data-dir", data, "--output", str(tmp_path / "sm2")] + TINY)
    assert os.path.isfile(str(tmp_path / "sm2" / "saved_model.pb"))
    image = os.path.join(data, "images", "val", sorted(os.listdir(os.path.join(data, "images", "val")))[0])
    cli.main(["predict", "--saved-model", export_dir, "--output-dir", str(tmp_path / "pred"), image])
    assert len(os.listdir(tmp_path / "pred")) == 1


def test_recipe_main_defaults_to_train_and_build_detector(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv))
    cli.recipe_main("/x/recipes/foo.py", ["--preset", "digits"])
    cli.recipe_main("/x/recipes/foo.py", ["export", "--weights", "w"])
    assert calls == [["train", "--recipe", "/x/recipes/foo.py", "--preset", "digits"], ["export", "--weights", "w"]]
    recipe = cli.load_recipe("retinanet")
    config = cli.get_config(recipe, "digits", {"backbone.widths": [8, 16, 16, 16], "backbone.blocks": [0, 0, 0, 0]})
    model = recipe.build_model(config, 4)
    assert type(model).__name__ == "RetinaNet" and model.num_classes == 4
    assert model.weight_decay == config["train"]["weight_decay"] and model.fpn.num_channels == config["model"]["fpn_channels"]


def test_console_script_exits_zero_on_success(monkeypatch):
    monkeypatch.setattr(cli, "main", lambda argv=None: {"stats": {"AP": 0.5}})
    assert cli.console_main() == 0


def test_make_datasets_pads_labels_to_input_max_boxes(tmp_path):
    recipe = cli.load_recipe("retinanet")
    config = cli.get_config(recipe, "digits", {"data.generate.num_train": 8, "data.generate.num_val": 4,
                                               "train.batch_size": 4, "eval.batch_size": 4})
    assert config["input"]["max_boxes"] == 16  # the digits preset: at most 4 digits per image
    train_source, val_source = cli.prepare_sources(config, str(tmp_path / "data"))
    train_ds, val_ds = cli.make_datasets(config, train_source, val_source, repeat=True)
    for ds in (train_ds, val_ds):
        _, labels = next(iter(ds))
        assert labels["boxes"].shape == (4, 16, 4) and labels["classes"].shape == (4, 16)
        # every object of the batch survived the padding
        assert int((labels["classes"].numpy() >= 0).sum()) > 0
