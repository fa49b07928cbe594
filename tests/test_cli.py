"""The command line: train (every stage, pycocotools/VOC metric, export, draw), evaluate /
export from run.json, predict, show-config, convert voc2coco; user errors are one line
with exit status 2, bugs keep their traceback."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from kerasdet import cli
from kerasdet.errors import UserInputError

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


def _one_line_error(capsys, argv, match):
    assert cli.console_main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kerasdet")]
    assert len(err) == 1 and err[0].startswith("kerasdet: error: ") and match in err[0], err
    return err[0]


def test_user_mistakes_are_one_line_and_exit_2(capsys, tmp_path):
    _one_line_error(capsys, ["show-config", "--set", "train.epoch=3"],
                    "unknown key 'epoch' in section 'train'; did you mean 'epochs'")
    _one_line_error(capsys, ["train", "--set", "train.lr=fast"], "train.lr: expected a number")
    _one_line_error(capsys, ["train", "--recipe", "nope"], "unknown recipe 'nope'")
    _one_line_error(capsys, ["train", "--preset", "nope"], "has no preset 'nope'")
    not_json = tmp_path / "a.json"
    not_json.write_text("{not json")
    _one_line_error(capsys, ["train", "--set", "data.kind=coco", "--set", f"data.train_annotations={not_json}",
                             "--set", f"data.train_images={tmp_path}", "--set", f"data.val_annotations={not_json}",
                             "--set", f"data.val_images={tmp_path}"], str(not_json))
    _one_line_error(capsys, ["train", "--set", "data.kind=coco", "--set", "data.train_annotations=/no/such.json",
                             "--set", f"data.train_images={tmp_path}", "--set", "data.val_annotations=/no/such.json",
                             "--set", f"data.val_images={tmp_path}"], "/no/such.json")
    _one_line_error(capsys, ["evaluate", "--run", str(tmp_path / "never")], "no run.json")
    _one_line_error(capsys, ["predict", "--saved-model", str(tmp_path / "none"), "x.png"], "no SavedModel")
    with pytest.raises(SystemExit) as exc:  # argparse's own errors: one line too
        cli.console_main(["train", "--strategy", "bogus"])
    assert exc.value.code == 2
    assert len([l for l in capsys.readouterr().err.splitlines() if l.strip()]) == 1


def test_debug_shows_the_traceback_and_bugs_are_not_swallowed(monkeypatch):
    from kerasdet.errors import ConfigError

    with pytest.raises(ConfigError):
        cli.console_main(["show-config", "--set", "train.epoch=3", "--debug"])
    monkeypatch.setattr(cli, "show_config", lambda args: 1 / 0)  # a bug, not a user mistake
    with pytest.raises(ZeroDivisionError):
        cli.console_main(["show-config"])


def test_a_real_process_prints_one_line_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "kerasdet.cli", "show-config", "--set", "model.fpn_channel=3"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 2
    ours = [l for l in proc.stderr.splitlines() if "kerasdet" in l or "Traceback" in l]
    assert ours == ["kerasdet: error: unknown key 'fpn_channel' in section 'model'; did you mean 'fpn_channels' "
                    "or 'head_channels'?"], proc.stderr[-2000:]


def test_show_config_prints_the_resolved_config(capsys):
    config = cli.main(["show-config", "--recipe", "smn", "--preset", "digits", "--set", "train.stages.0.lr=0.5"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"]["stages"][0]["lr"] == 0.5 == config.train.stages[0].lr
    assert printed["base"]["architecture"] == "c4" and printed["eval"]["metric"] == "coco"
    assert cli.main(["show-config", "--recipe", "couplenet", "--preset", "couplenet"]).eval.metric == "voc07"


def test_recipe_launcher_defaults_to_train(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "console_main", lambda argv: calls.append(argv) or 0)
    assert cli.recipe_main("retinanet", ["--preset", "digits"]) == 0
    cli.recipe_main("retinanet", ["export", "--run", "w", "--output", "o"])
    assert calls == [["train", "--recipe", "retinanet", "--preset", "digits"], ["export", "--run", "w", "--output", "o"]]


@pytest.mark.slow
def test_train_evaluate_export_predict(tmp_path):
    work, export_dir, data = str(tmp_path / "run"), str(tmp_path / "sm"), str(tmp_path / "data")
    summary = cli.main(["train", "--epochs", "1", "--work-dir", work, "--export-dir", export_dir,
                        "--data-dir", data, "--num-draw", "2", "--verbose", "0"] + TINY)
    assert set(summary["stats"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert os.path.isfile(os.path.join(export_dir, "1", "saved_model.pb"))  # TF Serving's <base>/<version>/
    drawn = sorted(os.listdir(os.path.join(work, "predictions")))
    assert len(drawn) == 2 and all(p.endswith("_det.png") for p in drawn)
    with open(os.path.join(work, "run.json")) as f:
        record = json.load(f)
    assert record["stats"]["AP"] == summary["stats"]["AP"] and record["recipe"] == "retinanet"
    assert record["config"]["train"]["epochs"] == 1 and len(record["label_map"]["category_ids"]) == 10
    from kerasdet.precision import cpu_supports_bfloat16

    chosen = record["export"]  # export.precision "auto": the CPU, then (bfloat16 CPUs) the AP check
    assert chosen["precision"] in ("float32", "bfloat16") and ("bfloat16" in chosen) == cpu_supports_bfloat16()
    with open(os.path.join(export_dir, "1", "kerasdet_export.json")) as f:
        assert json.load(f)["inference_graph"]["precision"] == chosen["precision"]
    stats = cli.main(["evaluate", "--run", work])
    np.testing.assert_allclose(stats["AP"], summary["stats"]["AP"], atol=1e-9)
    cli.main(["export", "--run", work, "--output", str(tmp_path / "sm2")])
    assert os.path.isfile(str(tmp_path / "sm2" / "1" / "saved_model.pb"))
    with open(tmp_path / "sm2" / "1" / "kerasdet_export.json") as f:  # the run's own choice by default
        assert json.load(f)["inference_graph"]["precision"] == chosen["precision"]
    forced = "float32" if chosen["precision"] == "bfloat16" else "bfloat16"
    cli.main(["export", "--run", work, "--output", str(tmp_path / "sm2"), "--precision", forced])
    with open(tmp_path / "sm2" / "2" / "kerasdet_export.json") as f:  # --precision forces either
        assert json.load(f)["inference_graph"]["precision"] == forced
    with pytest.raises(UserInputError, match="--precision is for SavedModel"):
        cli.main(["export", "--run", work, "--format", "litert", "--precision", "float32", "--output", "x.tflite"])
    litert = cli.main(["export", "--run", work, "--format", "litert", "--quantization", "dynamic_int8",
                       "--output", str(tmp_path / "m.tflite")])
    with open(tmp_path / "m.json") as f:
        assert json.load(f)["category_ids"] == record["label_map"]["category_ids"]
    from kerasdet.litert import load_litert

    out = load_litert(litert)(np.zeros((*record["config"]["input"]["image_size"], 3), np.uint8))
    assert out["detection_boxes"].shape[0] == 1 and out["num_detections"].shape == (1,)
    with pytest.raises(UserInputError, match="--version is for SavedModel exports"):
        cli.main(["export", "--run", work, "--format", "litert", "--version", "3", "--output", "x.tflite"])
    image = os.path.join(data, "images", "val", sorted(os.listdir(os.path.join(data, "images", "val")))[0])
    cli.main(["predict", "--saved-model", export_dir, "--output-dir", str(tmp_path / "pred"), image])
    assert len(os.listdir(tmp_path / "pred")) == 1


# --- VOCdevkit from the command line --------------------------------------------------------
def _voc_image(path, boxes, size=(128, 128), seed=0):
    rng = np.random.RandomState(seed)
    image = rng.randint(0, 40, (*size, 3)).astype(np.uint8)
    for xmin, ymin, xmax, ymax in boxes:
        image[ymin - 1:ymax, xmin - 1:xmax] = 230
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, image)


def _voc_xml(stem, objects, size=(128, 128)):
    objs = "".join(f"<object><name>{n}</name><difficult>{int(d)}</difficult><bndbox><xmin>{b[0]}</xmin>"
                   f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                   for n, b, d in objects)
    return (f"<annotation><filename>{stem}.jpg</filename><size><width>{size[1]}</width><height>{size[0]}"
            f"</height><depth>3</depth></size>{objs}</annotation>")


def _devkit(root, missing=True):
    """VOC2007 trainval (8 images) + test (4 images): one 'dog' (and a 'cat') per image, a
    difficult 'person', an unknown class 'unicorn', and (``missing``) a listed trainval
    image without its file."""
    year = os.path.join(root, "VOCdevkit", "VOC2007")
    os.makedirs(os.path.join(year, "Annotations"))
    os.makedirs(os.path.join(year, "ImageSets", "Main"))
    splits = {"trainval": [f"{i:06d}" for i in range(1, 9)], "test": [f"{i:06d}" for i in range(9, 13)]}
    for split, stems in splits.items():
        for i, stem in enumerate(stems):
            dog = (10 + 8 * i, 20, 50 + 8 * i, 70)
            objects = [("dog", dog, False), ("cat", (70, 80, 110, 120), False)]
            if i == 0:
                objects += [("person", (5, 5, 30, 30), True), ("unicorn", (90, 10, 120, 40), False)]
            with open(os.path.join(year, "Annotations", f"{stem}.xml"), "w") as f:
                f.write(_voc_xml(stem, objects))
            if not (missing and split == "trainval" and i == len(stems) - 1):
                _voc_image(os.path.join(year, "JPEGImages", f"{stem}.jpg"), [o[1] for o in objects[:2]], seed=i)
        with open(os.path.join(year, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("\n".join(stems) + "\n")
    return os.path.join(root, "VOCdevkit"), os.path.join(year, "JPEGImages", f"{splits['trainval'][-1]}.jpg")


@pytest.mark.slow
def test_vocdevkit_trains_and_evaluates_with_the_voc_metric_from_the_command_line(tmp_path, capsys):
    devkit, missing = _devkit(str(tmp_path))
    voc = ["--set", "data.kind=voc", "--set", f"data.voc_root={devkit}", "--set", 'data.train_sets=["2007/trainval"]',
           "--set", 'data.val_sets=["2007/test"]', "--set", "eval.metric=voc07", "--set", "input.max_boxes=8",
           "--set", "train.batch_size=4", "--set", "eval.batch_size=4", "--set", "train.warmup_steps=0"]
    argv = ["train", "--epochs", "2", "--work-dir", str(tmp_path / "run"), "--no-export", "--verbose", "0", *voc, *TINY[8:]]  # TINY[8:]: the tiny backbone and heads
    # a listed image without its file: one line naming the file, exit 2
    _one_line_error(capsys, argv, missing)
    _voc_image(missing, [(10, 20, 50, 70)], seed=7)
    summary = cli.main(argv)
    assert summary["metric"] == "voc07" and 0.0 <= summary["stats"]["mAP"] <= 1.0
    assert summary["label_map"]["category_names"][11] == "dog" and summary["num_classes"] == 20
    stats = cli.main(["evaluate", "--run", str(tmp_path / "run"), "--metric", "voc12"])
    assert set(stats) >= {"mAP", "AP/dog", "AP/cat"}
    # the voc2coco JSON gives pycocotools the AP of the in-memory evaluation
    out = str(tmp_path / "test.json")
    cli.main(["convert", "voc2coco", "--voc-root", devkit, "--sets", "2007/test", "--output", out])
    from kerasdet.engine.runner import load_run, val_source_of_run
    from kerasdet.engine import builders
    from kerasdet.data.coco import load_coco

    _, config, model, record = load_run(str(tmp_path / "run"))
    source = val_source_of_run(config, record)
    in_memory = builders.evaluate(model, builders.build_dataset(config, source, training=False), source, metric="coco")
    from_file = load_coco(out, devkit, category_ids=record["label_map"]["category_ids"])
    assert from_file.annotation_file == out
    on_file = builders.evaluate(model, builders.build_dataset(config, from_file, training=False), from_file,
                                metric="coco")
    for key in ("AP", "AP50", "AP75", "AR100"):
        np.testing.assert_allclose(on_file[key], in_memory[key], atol=1e-12)
