"""The claims harness (benchmarks/paper_claims.py): statistics by hand, the record's layout,
and its plumbing end to end on tiny data (--quick)."""
import dataclasses
import json
import math
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
sys.path.insert(0, BENCHMARKS)
import paper_claims  # noqa: E402


def test_mean_and_sample_std_by_hand():
    mean, std = paper_claims.mean_std([0.50, 0.54, 0.58])
    assert mean == pytest.approx(0.54)
    assert std == pytest.approx(0.04)  # sqrt((0.04^2 + 0 + 0.04^2) / 2)
    assert paper_claims.mean_std([0.3]) == (0.3, 0.0)
    with pytest.raises(ValueError):
        paper_claims.mean_std([])


def test_compare_welch_stderr_and_verdicts_by_hand():
    base, treat = [0.50, 0.54, 0.58], [0.60, 0.61, 0.62]  # s_b = 0.04, s_t = 0.01
    out = paper_claims.compare(base, treat)
    assert out["difference"] == pytest.approx(0.07)
    assert out["stderr"] == pytest.approx(math.sqrt(0.01**2 / 3 + 0.04**2 / 3))  # 0.0238
    assert out["holds"] is True  # 0.07 > 2 * 0.0238
    noisy = paper_claims.compare([0.40, 0.60, 0.50], [0.55, 0.57, 0.56])  # s_b = 0.1: stderr 0.0578
    assert noisy["difference"] == pytest.approx(0.06) and noisy["holds"] is False
    worse = paper_claims.compare(treat, base)
    assert worse["difference"] == pytest.approx(-0.07) and worse["holds"] is False
    same = paper_claims.compare([0.30, 0.31], [0.315, 0.32], rule="equivalent", margin=0.02)
    assert same["holds"] is True and same["difference"] == pytest.approx(0.0125)
    assert paper_claims.compare([0.30, 0.31], [0.34, 0.35], rule="equivalent", margin=0.02)["holds"] is False
    # not_below: holds unless the treatment is below the baseline by more than 2 stderr
    slightly = paper_claims.compare([0.50, 0.54, 0.58], [0.48, 0.52, 0.56], rule="not_below")  # -0.02, stderr 0.0327
    assert slightly["difference"] == pytest.approx(-0.02) and slightly["holds"] is True
    clearly = paper_claims.compare([0.60, 0.61, 0.62], [0.55, 0.56, 0.57], rule="not_below")  # -0.05, stderr 0.0082
    assert clearly["stderr"] == pytest.approx(math.sqrt(2 * 0.01**2 / 3)) and clearly["holds"] is False
    assert paper_claims.compare(base, treat, rule="not_below")["holds"] is True
    with pytest.raises(ValueError, match="rule"):
        paper_claims.compare(base, treat, rule="less")


def test_claims_differ_only_in_the_papers_contribution():
    from kerasdet.engine.recipes import load_recipe

    claims = paper_claims.CLAIMS
    assert set(claims) >= {"focal", "assd", "assd_fusion", "couplenet", "acouplenet", "decompnet", "decompnet_stop"}
    for claim in claims.values():
        b, t = claim.baseline, claim.treatment
        assert b.name != t.name
        cb = load_recipe(b.recipe).config(b.preset, dict(b.overrides))
        ct = load_recipe(t.recipe).config(t.preset, dict(t.overrides))
        assert cb.data == ct.data, claim.name  # the same data
        # the same scoring (Mask R-CNN's coco_segm scores the boxes as coco does, and the masks)
        assert cb.eval.metric == ct.eval.metric or (cb.eval.metric, ct.eval.metric) == ("coco", "coco_segm"), claim.name
        if b.recipe == t.recipe and not (b.scores or t.scores or b.base_from or t.base_from):
            assert cb.train == ct.train and cb.eval == ct.eval, claim.name  # the same budget and schedule
    # decompNet against its paper's baseline: two models, each with its own schedule, on one data set
    assert claims["decompnet"].baseline.recipe == "sliding_window" and claims["decompnet"].epochs is None
    stop = claims["decompnet_stop"]  # one set of weights, scored with both stop rules
    assert stop.baseline.scores is stop.treatment.scores is claims["decompnet"].treatment
    assert stop.rule == "equivalent" and stop.margin == 0.02
    mask = claims["mask_rcnn_boxes"]  # Faster R-CNN and the same with a mask head, the same schedule
    cb, ct = (load_recipe(a.recipe).config(a.preset, dict(a.overrides)) for a in (mask.baseline, mask.treatment))
    assert mask.rule == "not_below" and mask.metric == "AP"
    assert cb.train == ct.train and cb.model == ct.model and cb.backbone == ct.backbone
    assert dataclasses.replace(ct.input, masks=cb.input.masks) == cb.input and ct.input.masks == "instances"
    focal = claims["focal"]
    recipe = load_recipe("retinanet")
    ce = recipe.config(focal.baseline.preset, dict(focal.baseline.overrides)).model
    fl = recipe.config(focal.treatment.preset, dict(focal.treatment.overrides)).model
    assert (ce.get("focal_gamma"), ce.get("focal_alpha")) == (0.0, 0.75)
    assert {k: v for k, v in ce.items() if k not in ("focal_gamma", "focal_alpha")} == \
        {k: v for k, v in fl.items() if k not in ("focal_gamma", "focal_alpha")}


def test_summary_record_and_table_row():
    claim = paper_claims.CLAIMS["couplenet"]
    runs = {
        "rfcn": [{"seed": s, "AP": v, "history": [v / 2, v]} for s, v in enumerate([0.40, 0.42, 0.44])],
        "couplenet": [{"seed": s, "AP": v, "history": [v / 2, v]} for s, v in enumerate([0.47, 0.48, 0.49])],
    }
    result = paper_claims.summarize(claim, runs, budget={"epochs": 2})
    for key in ("claim", "paper", "metric", "baseline", "treatment", "budget", "runs", "difference", "stderr", "holds"):
        assert key in result
    assert result["summary"]["rfcn"] == {"mean": pytest.approx(0.42), "std": pytest.approx(0.02), "n": 3, "stats": {}}
    assert result["difference"] == pytest.approx(0.06)
    assert result["stderr"] == pytest.approx(math.sqrt(0.01**2 / 3 + 0.02**2 / 3))
    assert result["holds"] is True
    row = paper_claims.format_row(result)
    assert "0.420 ± 0.020" in row and "0.480 ± 0.010" in row and "+0.060" in row and "holds" in row
    json.dumps(result)  # JSON-serializable
    # the other stats every seed has, summarized per arm beside the claim's metric
    for arm, rs in runs.items():
        for r in rs:
            r["mask_AP"] = r["AP"] - 0.1
    runs["rfcn"][0]["AP75"] = 0.3  # one seed only: not summarized
    stats = paper_claims.summarize(claim, runs, budget={})["summary"]["rfcn"]["stats"]
    assert stats == {"mask_AP": {"mean": pytest.approx(0.32), "std": pytest.approx(0.02)}}


@pytest.mark.slow
def test_quick_claim_end_to_end(tmp_path):
    """Two seeds of both arms of the focal claim on 24 tiny images, two runs at a time:
    the JSON and the PNG, per-epoch AP histories, cached runs reused on a second call."""
    results = tmp_path / "results"
    args = ["--claim", "focal", "--quick", "--seeds", "0,1", "--epochs", "1", "--jobs", "2",
            "--work-dir", str(tmp_path / "runs"), "--results-dir", str(results)]
    out = paper_claims.main(args)["focal"]
    with open(results / "focal.json") as f:
        record = json.load(f)
    assert os.path.getsize(results / "focal.png") > 1000
    assert record["budget"]["epochs"] == 1 and record["budget"]["threads_per_run"] == max(1, os.cpu_count() // 2)
    for arm in ("retinanet_ce", "retinanet_focal"):
        assert [r["seed"] for r in record["runs"][arm]] == [0, 1]
        assert all(len(r["history"]) == 1 and 0.0 <= r["AP"] <= 1.0 for r in record["runs"][arm])
    assert record["difference"] == pytest.approx(out["difference"])
    before = os.path.getmtime(tmp_path / "runs" / "quick" / "retinanet_ce_s0" / "run.json")
    paper_claims.main(args)  # cached: nothing retrained
    assert os.path.getmtime(tmp_path / "runs" / "quick" / "retinanet_ce_s0" / "run.json") == before
    with pytest.raises(SystemExit):
        paper_claims.main(["--claim", "nope"])


@pytest.mark.slow
def test_scoring_arm_and_per_class_ap50_of_a_run(tmp_path):
    """An arm that scores another arm's weights with an inference option changed, and the
    per-category AP50 diagnostic, on a tiny RetinaNet run through the runner."""
    from kerasdet.engine.recipes import load_recipe
    from kerasdet.engine.runner import run

    recipe = load_recipe("retinanet")
    overrides = {"data.generate.num_train": 8, "data.generate.num_val": 4, "train.batch_size": 4,
                 "eval.batch_size": 4, "export.enabled": False, "train.warmup_steps": 0, "train.epochs": 1,
                 "backbone.widths": [8, 16, 16, 16], "backbone.blocks": [0, 0, 0, 0], "model.fpn_channels": 8,
                 "model.head_channels": 8}
    source = paper_claims.Arm("tiny", "retinanet", "digits")
    run(recipe, recipe.config("digits", overrides), preset="digits", work_dir=str(tmp_path / "tiny_s0"),
        data_dir=str(tmp_path / "data"), seed=0)
    arm = paper_claims.Arm("tiny_strict", "retinanet", "digits", (("model.score_threshold", 0.99),), scores=source)
    row = paper_claims.score_run(arm, 0, work_root=str(tmp_path), log=lambda *a: None)
    assert row["seed"] == 0 and row["scored_with"] == {"model.score_threshold": 0.99}
    with open(os.path.join(paper_claims.ROOT, row["results_file"])) as f:
        assert all(r["score"] >= 0.99 for r in json.load(f))  # the option reached the rebuilt model
    assert paper_claims.score_run(arm, 0, work_root=str(tmp_path), log=pytest.fail) == row  # cached
    per_class = paper_claims.per_class_ap50(str(tmp_path / "tiny_s0"))
    counts = per_class.pop("counts")
    assert set(per_class) == {str(d) for d in range(10)} and all(0.0 <= v <= 1.0 or v != v for v in per_class.values())
    assert counts["score_threshold"] == 0.0 and 0.0 <= counts["per_image"] <= 1.0


def test_count_accuracy_of_results_by_hand():
    coco = _context_gt()  # one image: one "2" (id 3) and one "7" (id 8)
    results = [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 0.9},
               {"image_id": 1, "category_id": 8, "bbox": [0, 0, 1, 1], "score": 0.4},
               {"image_id": 1, "category_id": 8, "bbox": [0, 0, 1, 1], "score": 0.3}]
    loose = paper_claims.count_accuracy_of_results(coco, results)
    assert loose["per_class"]["3"] == 1.0 and loose["per_class"]["8"] == 0.0  # two "7"s counted for one
    assert loose["per_image"] == 0.0 and loose["mae"] == pytest.approx(1 / 10)  # one error over 10 categories
    strict = paper_claims.count_accuracy_of_results(coco, results, score_threshold=0.35)
    assert strict["per_image"] == 1.0 and strict["mae"] == 0.0


def test_smn_context_arms_train_the_same_extra_steps_from_one_base():
    from kerasdet.engine.recipes import load_recipe
    from kerasdet.recipes.smn import CONTEXT_EXTRA_STEPS

    recipe = load_recipe("smn")
    arms = {}
    for name in ("smn_context", "smn_context_final", "smn_vs_mlp"):
        claim = paper_claims.CLAIMS[name]
        for arm in (claim.baseline, claim.treatment):
            arms[arm.name] = arm.scores or arm
    assert {a.base_from for a in arms.values()} == {paper_claims._SMN_BASE}
    for arm in arms.values():
        config = recipe.config(arm.preset, dict(arm.overrides))
        steps = sum(stage.steps for stage in config.train.resolved_stages())
        assert steps == CONTEXT_EXTRA_STEPS, arm.name
        assert all(stage.kind != "base" for stage in config.train.stages) or arm.preset.endswith("base_more")
        cmd = paper_claims.run_command(arm, 1, epochs=None, work_dir="/w/x_s1", data_dir=None, quick=None)
        assert 'base.weights="/w/smn_context_base_s0/base.weights.h5"' in cmd  # seed 1 starts from base seed 0
    base = recipe.config("digits_context_base", {})
    assert base.data == recipe.config("digits_context", {}).data and base.data.generate["context_pairs"]
    assert base.model["inference"] == "base"


def _context_gt():
    # one image, one pair: a clean "2" and its degraded partner "7" ((2 + 5) % 10), ids = digit + 1
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0,
             "pair_id": 0, "degraded": False},
            {"id": 2, "image_id": 1, "category_id": 8, "bbox": [40, 10, 20, 20], "area": 400, "iscrowd": 0,
             "pair_id": 0, "degraded": True}]
    return {"images": [{"id": 1, "width": 100, "height": 100}], "annotations": anns,
            "categories": [{"id": d + 1, "name": str(d)} for d in range(10)]}


def test_context_oracle_relabels_only_the_degraded_member_by_the_pair_rule():
    from kerasdet.data.digits import partner_class_of

    assert partner_class_of(2) == 7 and partner_class_of(7) == 2
    assert partner_class_of(4, (2, 4, 6, 8)) == 8
    results = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},  # clean: kept as is
               {"image_id": 1, "category_id": 1, "bbox": [41, 10, 20, 20], "score": 0.8},  # on the degraded "7"
               {"image_id": 1, "category_id": 1, "bbox": [70, 70, 10, 10], "score": 0.7}]  # background
    out = paper_claims.oracle_context_results(_context_gt(), results)
    assert [r["category_id"] for r in out] == [1, 8, 1]
    assert results[1]["category_id"] == 1  # the input is not modified


def test_smn_context_breakdown_of_a_run(tmp_path):
    gt_path = tmp_path / "val.json"
    gt_path.write_text(json.dumps(_context_gt()))
    (tmp_path / "run.json").write_text(json.dumps({"paths": {"val": {"val_annotations": str(gt_path)}}}))
    results = [{"image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "score": 0.9},  # clean "2": right
               {"image_id": 1, "category_id": 3, "bbox": [11, 10, 20, 20], "score": 0.6},  # its duplicate
               {"image_id": 1, "category_id": 1, "bbox": [40, 10, 20, 20], "score": 0.8}]  # degraded "7" as "0"
    (tmp_path / "val_results.json").write_text(json.dumps(results))
    out = paper_claims.smn_context_breakdown(str(tmp_path))
    assert out["clean_AP50"] == pytest.approx(1.0) and out["degraded_AP50"] == pytest.approx(0.0)
    assert out["oracle_degraded_AP50"] == pytest.approx(1.0)  # the partner's class recovers it
    assert (out["degraded_objects"], out["clean_objects"]) == (1, 1)
    assert out["dup@0.3"] == 1


def test_run_claims_with_scoring_arms_and_shared_bases(tmp_path, monkeypatch):
    """The queue and the record without training: a claim whose arms both score one trained
    arm (decompnet_stop: no train time for them) and the SMN arms, whose shared base trains
    first and is saved once before the arms that start from it."""
    calls = []

    def fake_train(arm, seed, *, epochs, work_root, data_dir, quick, threads, log):
        calls.append(("train", arm.name, seed))
        return {"seed": seed, "AP": 0.5, "AP50": 0.7 + 0.01 * seed, "history": [0.4, 0.5], "train_seconds": 60.0,
                "parameters": 10, "work_dir": arm.name}

    def fake_score(arm, seed, *, work_root, log):
        calls.append(("score", arm.name, seed))
        return {"seed": seed, "AP": 0.5, "AP50": 0.7 + 0.01 * seed, "history": [], "parameters": 10}

    monkeypatch.setattr(paper_claims, "train_run", fake_train)
    monkeypatch.setattr(paper_claims, "score_run", fake_score)
    monkeypatch.setattr(paper_claims, "_ensure_data", lambda *a, **k: None)
    monkeypatch.setattr(paper_claims, "export_base", lambda arm, root, log=None: calls.append(("export", arm.name)))
    claims = [paper_claims.CLAIMS["decompnet_stop"], paper_claims.CLAIMS["smn_context"]]
    out = paper_claims.run_claims(claims, seeds=[0, 1], work_root=str(tmp_path), results_dir=str(tmp_path),
                                  diagnose=False, log=lambda *a: None)
    stop = out["decompnet_stop"]
    assert stop["budget"]["train_minutes_mean"] == {"decompnet_ordered_bright": None,
                                                    "decompnet_ordered_first_black": None}
    assert stop["difference"] == pytest.approx(0.0) and stop["holds"] is True  # equivalent within 0.02
    assert out["smn_context"]["budget"]["train_minutes_mean"]["smn_context_base_more"] == pytest.approx(1.0)
    first_export = calls.index(next(c for c in calls if c[0] == "export"))
    assert calls[:first_export] == [("train", "smn_context_base", 0)]  # the shared base, once, first
    assert ("train", "smn_context_base", 1) not in calls
    assert os.path.isfile(tmp_path / "smn_context.json") and os.path.isfile(tmp_path / "decompnet_stop.png")
