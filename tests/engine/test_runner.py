"""kerasdet.engine.runner: every digits preset of every recipe runs through the one runner;
staged runs interrupted mid-stage resume to the weights of an uninterrupted run."""
import json
import os

import keras
import numpy as np
import pytest

from kerasdet.engine.recipes import load_recipe
from kerasdet.engine.runner import evaluate_run, export_run, load_run, run

COMMON = {"data.generate.num_train": 16, "data.generate.num_val": 4, "train.batch_size": 4, "eval.batch_size": 4,
          "export.enabled": False, "train.warmup_steps": 0}
SMALL = {"backbone.widths": [8, 16, 16, 16], "backbone.blocks": [0, 0, 0, 0]}
TINY = {
    ("retinanet", "digits"): {**SMALL, "model.fpn_channels": 16, "model.head_channels": 16, "train.epochs": 1},
    ("faster_rcnn_fpn", "digits"): {**SMALL, "model.fpn_channels": 16, "model.rpn_channels": 8, "model.fc_dim": 16,
                                    "model.num_rois": 16, "model.rpn_post_nms_topk_train": 32,
                                    "model.rpn_post_nms_topk_test": 32, "train.epochs": 1},
    ("mask_rcnn_fpn", "digits"): {**SMALL, "model.fpn_channels": 16, "model.rpn_channels": 8, "model.fc_dim": 16,
                                  "model.num_rois": 16, "model.rpn_post_nms_topk_train": 32,
                                  "model.rpn_post_nms_topk_test": 32, "mask_head.num_convs": 1,
                                  "mask_head.channels": 8, "train.epochs": 1},
    ("assd", "ssd_digits"): {**SMALL, "train.epochs": 1},
    ("assd", "assd_digits"): {**SMALL, "model.fusion_channels": 8, "train.epochs": 1},
    ("couplenet", "rfcn_digits"): {**SMALL, "model.conv_new_channels": 16, "model.rpn_channels": 8,
                                   "model.rpn_post_nms_topk_train": 16, "model.rpn_post_nms_topk_test": 16,
                                   "model.ohem_rois": 8, "train.epochs": 1},
    ("couplenet", "couplenet_digits"): {**SMALL, "model.conv_new_channels": 16, "model.global_channels": 16,
                                        "model.rpn_channels": 8, "model.rpn_post_nms_topk_train": 16,
                                        "model.rpn_post_nms_topk_test": 16, "model.ohem_rois": 8, "train.epochs": 1},
    ("couplenet", "acouplenet_digits"): {**SMALL, "backbone.attention_channels": 8, "model.conv_new_channels": 16,
                                         "model.global_channels": 16, "model.rpn_channels": 8,
                                         "model.rpn_post_nms_topk_train": 16, "model.rpn_post_nms_topk_test": 16,
                                         "model.ohem_rois": 8, "train.epochs": 1},
}
SHARPMASK_TINY = {"backbone.widths": [8, 8, 8, 8], "data.generate.image_size": [64, 64], "input.image_size": [64, 64],
                  "model.patch_size": 32, "model.features": 4, "model.embedding": 8, "model.mask_size": 8,
                  "model.score_hidden": 8, "model.skip_hidden": 4, "model.num_proposals": 5, "model.scales": [1.0],
                  "patches.patches_per_image": 2}
SMN_TINY = {**SMALL, "data.generate.image_size": [64, 64], "input.image_size": [64, 64], "base.fc_dim": 16,
            "base.rpn_channels": 8, "base.rpn_post_nms_topk_train": 16, "base.rpn_post_nms_topk_test": 16,
            "base.num_rois": 16, "model.memory_channels": 8, "model.memory_fc_dim": 16, "model.fusion_dim": 16,
            "model.memory_rpn_channels": 8, "model.num_rois": 8, "model.rpn_batch_size": 16,
            "model.num_base_writes": 2, "model.num_memory_steps": 2}
DECOMP_TINY = {"data.generate.num_clutter": 0, "data.generate.min_digits": 1, "data.generate.max_digits": 3,
               "model.steps": 3, "model.max_instances": 2, "model.conv_gru_filters": 4, "model.instance_filters": 4,
               "model.category_widths": [4, 4, 4, 4, 4, 4], "model.box_hidden": 8, "input.max_boxes": 4}


def _stage_steps(recipe, preset, steps=1, **per_stage):
    stages = load_recipe(recipe).config(preset).train.stages
    out = {}
    for i, stage in enumerate(stages):
        out[f"train.stages.{i}.steps"] = per_stage.get(stage.name, steps)
        out[f"train.stages.{i}.warmup_steps"] = 0
        if "num_steps" in stage.params:
            out[f"train.stages.{i}.params.num_steps"] = min(stage.params["num_steps"], 2)
    return out


def _overrides(recipe, preset):
    if recipe == "smn":
        return {**COMMON, **SMN_TINY, **_stage_steps(recipe, preset)}
    if recipe == "decompnet":
        return {**COMMON, **DECOMP_TINY, **_stage_steps(recipe, preset)}
    if recipe == "sharpmask":
        return {**COMMON, **SHARPMASK_TINY, **_stage_steps(recipe, preset, steps=2)}
    return {**COMMON, **TINY[(recipe, preset)]}


TINY[("fpn_proposals", "fpn_proposals_digits")] = {
    **SMALL, "data.generate.image_size": [64, 64], "input.image_size": [64, 64], "model.fpn_channels": 8,
    "model.hidden": 8, "model.num_proposals": 5, "model.samples_per_image": 16, "train.stages.0.steps": 2,
    "train.stages.0.warmup_steps": 0}
TINY[("sliding_window", "digits")] = {"data.generate.num_clutter": 0, "data.generate.min_digits": 1,
                                      "data.generate.max_digits": 3, "input.max_boxes": 4, "train.epochs": 1,
                                      "model.samples_per_image": 8}
DIGITS_PRESETS = [*TINY, ("smn", "digits_mlp"), ("sharpmask", "deepmask_digits"), ("sharpmask", "sharpmask_digits")]
# run end to end (three times each) by the kill-and-resume tests below
RESUME_PRESETS = [("smn", "digits"), ("decompnet", "digits")]


# SMN's context-claim presets: a base run, then three runs that start from its base
# (test_smn_context_presets_chain_from_one_base)
CONTEXT_PRESETS = [("smn", "digits_context_base"), ("smn", "digits_context_base_more"), ("smn", "digits_context"),
                   ("smn", "digits_context_mlp")]


def test_every_digits_preset_of_every_recipe_is_covered():
    from kerasdet.engine.recipes import builtin_recipes

    presets = {(r, p) for r in builtin_recipes() for p in load_recipe(r).presets if "digits" in p}
    assert presets == set(DIGITS_PRESETS) | set(RESUME_PRESETS) | set(CONTEXT_PRESETS)


@pytest.mark.slow
def test_smn_context_presets_chain_from_one_base(tmp_path):
    """The context claims' flow: the base preset trains and scores the base alone (its own
    NMS); its base, saved, starts the other three presets (which refuse to run without it),
    whose base weights stay those of the saved base in the memory / MLP runs."""
    from kerasdet.errors import ConfigError

    r = load_recipe("smn")
    data = str(tmp_path / "data")
    tiny = {**COMMON, **SMN_TINY, "data.generate.image_size": [96, 96], "input.image_size": [96, 96],
            "model.mlp_channels": 8}
    summaries = {}
    base_run = str(tmp_path / "base")
    config = r.config("digits_context_base", {**tiny, **_stage_steps("smn", "digits_context_base")})
    summaries["base"] = run(r, config, preset="digits_context_base", work_dir=base_run, data_dir=data,
                            strategy="default", verbose=0)
    _, _, model, _ = load_run(base_run)
    assert model.inference == "base"
    weights = str(tmp_path / "base.weights.h5")
    model.base.save_weights(weights)
    saved = [np.asarray(w) for w in model.base.weights]
    with pytest.raises(ConfigError, match="base.weights"):
        r.build_model(r.config("digits_context", tiny), 10)
    for preset in ("digits_context_base_more", "digits_context", "digits_context_mlp"):
        config = r.config(preset, {**tiny, **_stage_steps("smn", preset), "base.weights": weights})
        work = str(tmp_path / preset)
        summary = run(r, config, preset=preset, work_dir=work, data_dir=data, strategy="default", verbose=0)
        assert all(np.isfinite(s["final_loss"]) for s in summary["stages"]), preset
        trained = load_run(work)[2]
        same = all(np.array_equal(a, np.asarray(b)) for a, b in zip(saved, trained.base.weights))
        assert same == (preset != "digits_context_base_more"), preset  # only base_more trains the base
    stages = [s["name"] for s in summary["stages"]]
    assert stages == ["mlp"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe,preset", DIGITS_PRESETS, ids=[f"{r}-{p}" for r, p in DIGITS_PRESETS])
def test_digits_preset_runs_through_the_runner(tmp_path, recipe, preset):
    r = load_recipe(recipe)
    config = r.config(preset, _overrides(recipe, preset))
    work = str(tmp_path / "run")
    summary = run(r, config, preset=preset, work_dir=work, data_dir=str(tmp_path / "data"), strategy="default",
                  verbose=0)
    stages = config.train.resolved_stages()
    assert [s["name"] for s in summary["stages"]] == [s.name for s in stages]
    for record in summary["stages"]:
        assert np.isfinite(record["final_loss"]), record
    with open(os.path.join(work, "run.json")) as f:
        record = json.load(f)
    from kerasdet.engine.builders import HEADLINE_METRIC

    headline = HEADLINE_METRIC[config.eval.metric]  # AP; mask_AR1000 for the segment proposals
    assert record["stats"] == summary["stats"] and np.isfinite(record["stats"][headline])
    assert record["label_map"]["category_ids"] and record["config"]["train"]["batch_size"] == 4
    assert r.config_from_dict(record["config"]) == config
    assert os.path.isfile(record["paths"]["weights"])


@pytest.mark.slow
def test_evaluate_and_export_read_run_json_not_the_training_data(tmp_path):
    r = load_recipe("retinanet")
    data, work = str(tmp_path / "data"), str(tmp_path / "run")
    summary = run(r, r.config("digits", _overrides("retinanet", "digits")), preset="digits", work_dir=work,
                  data_dir=data, strategy="default", verbose=0)
    import shutil

    os.remove(os.path.join(data, "annotations", "instances_train.json"))  # the training data is gone:
    shutil.rmtree(os.path.join(data, "images", "train"))  # evaluate and export never read it
    stats = evaluate_run(work)
    np.testing.assert_allclose(stats["AP"], summary["stats"]["AP"], atol=1e-9)
    _, _, model, record = load_run(work)
    assert model.num_classes == len(record["label_map"]["category_ids"]) == 10
    export_run(work, str(tmp_path / "sm"))
    assert os.path.isfile(str(tmp_path / "sm" / "1" / "saved_model.pb"))
    # the serving graph: BN folded, the precision the run chose (recorded with its reason)
    with open(tmp_path / "sm" / "1" / "kerasdet_export.json") as f:
        graph = json.load(f)["inference_graph"]
    from kerasdet.precision import resolve_precision

    assert record["export"] is None  # the run did not export (export.enabled false): the CPU decides
    assert graph["fold_batchnorm"] > 0 and graph["precision"] == resolve_precision("auto")
    assert not os.path.exists(os.path.join(data, "annotations", "instances_train.json"))  # nothing regenerated


class _Crash(Exception):
    pass


class _CrashAt(keras.callbacks.Callback):
    """Raises after ``at`` training steps of the stage named ``stage`` (after the backup of
    that step, which the runner's backup callback writes first)."""

    def __init__(self, stage_steps, at):
        super().__init__()
        self.stage_steps, self.at, self.seen = stage_steps, at, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.at:
            raise _Crash(f"killed after {self.at} steps")


def _staged_resume(tmp_path, recipe, preset, steps, crash_at):
    r = load_recipe(recipe)
    base = {**_overrides(recipe, preset), **_stage_steps(recipe, preset, **steps), "train.backup_every": 1}
    config = r.config(preset, base)
    data = str(tmp_path / "data")
    ref = run(r, config, preset=preset, work_dir=str(tmp_path / "ref"), data_dir=data, strategy="default", verbose=0)
    # the uninterrupted run is also the preset's end-to-end run (RESUME_PRESETS)
    assert [s["name"] for s in ref["stages"]] == [s.name for s in config.train.resolved_stages()]
    assert all(np.isfinite(s["final_loss"]) for s in ref["stages"])
    with open(os.path.join(str(tmp_path / "ref"), "run.json")) as f:
        assert r.config_from_dict(json.load(f)["config"]) == config
    work = str(tmp_path / "run")
    with pytest.raises(_Crash):
        run(r, config, preset=preset, work_dir=work, data_dir=data, strategy="default", verbose=0,
            callbacks=[_CrashAt(None, crash_at)])
    assert not os.path.isfile(os.path.join(work, "model.weights.h5"))
    resumed = run(r, config, preset=preset, work_dir=work, data_dir=data, strategy="default", verbose=0)
    assert resumed["resumed_from_step"] > 0
    # the models' weights (the optimizer state in the file differs: the resumed run never
    # compiled the stages it skipped)
    a = [np.asarray(w) for w in load_run(str(tmp_path / "ref"))[2].weights]
    b = [np.asarray(w) for w in load_run(work)[2].weights]
    assert len(a) == len(b) > 10
    diff = max(float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(a, b))
    assert diff <= 1e-6, diff
    np.testing.assert_allclose(resumed["stats"]["AP"], ref["stats"]["AP"], atol=1e-6)
    return resumed


@pytest.mark.slow
def test_decompnet_killed_mid_stage_resumes_to_the_uninterrupted_weights(tmp_path):
    # stages category 3, instance 3, joint 1, box 1 steps; killed after 5 steps: 2 into "instance"
    resumed = _staged_resume(tmp_path, "decompnet", "digits", {"category": 3, "instance": 3}, crash_at=5)
    assert [s["restored_step"] for s in resumed["stages"]] == [0, 2, 0, 0]


@pytest.mark.slow
def test_smn_killed_mid_stage_resumes_to_the_uninterrupted_weights(tmp_path):
    # base_1 2 steps, base_2 1, memory_n2 2, memory_n5 1, memory_n10 1; killed 1 step into memory_n2
    resumed = _staged_resume(tmp_path, "smn", "digits", {"base_1": 2, "memory_n2": 2}, crash_at=4)
    assert [s["restored_step"] for s in resumed["stages"]] == [0, 0, 1, 0, 0]


def test_export_precision_auto_needs_the_cpu_and_the_metric_check(monkeypatch):
    """``export.precision="auto"``: float32 without native bfloat16 (no evaluation);
    with it, bfloat16 only when the bfloat16 graph's headline metric is within
    ``export.max_metric_drop``; a forced value is taken as it is."""
    from kerasdet import precision
    from kerasdet.engine.predict import choose_export_precision

    r = load_recipe("retinanet")
    model = r.build_model(r.config("digits", SMALL), 10)
    model.build()
    config = r.config("digits", SMALL)
    seen = []

    def evaluate(ap):
        def fn(variant):
            seen.append(precision.compute_dtype(variant))
            return {"AP": ap}
        return fn

    monkeypatch.setattr(precision, "cpu_supports_bfloat16", lambda: False)
    assert choose_export_precision(model, config, evaluate(0.0), {"AP": 0.5}, "AP")["precision"] == "float32"
    assert seen == []
    monkeypatch.setattr(precision, "cpu_supports_bfloat16", lambda: True)
    chosen = choose_export_precision(model, config, evaluate(0.497), {"AP": 0.5}, "AP")
    assert chosen["precision"] == "bfloat16" and chosen["bfloat16"] == 0.497 and seen == ["bfloat16"]
    assert choose_export_precision(model, config, evaluate(0.49), {"AP": 0.5}, "AP")["precision"] == "float32"
    assert precision.compute_dtype(model) == "float32"  # the trained model is left as it was
    forced = r.config("digits", {**SMALL, "export.precision": "bfloat16"})
    assert choose_export_precision(model, forced, evaluate(0.0), {"AP": 0.5}, "AP")["precision"] == "bfloat16"
