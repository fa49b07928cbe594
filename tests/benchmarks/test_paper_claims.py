"""The claims harness (benchmarks/paper_claims.py): statistics by hand, the record's layout,
and its plumbing end to end on tiny data (--quick)."""
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
    with pytest.raises(ValueError, match="rule"):
        paper_claims.compare(base, treat, rule="less")


def test_claims_differ_only_in_the_papers_contribution():
    from kerasdet.engine.recipes import load_recipe

    claims = paper_claims.CLAIMS
    assert set(claims) >= {"focal", "assd", "assd_fusion", "couplenet", "acouplenet"}
    for claim in claims.values():
        b, t = claim.baseline, claim.treatment
        assert b.recipe == t.recipe and b.name != t.name
        recipe = load_recipe(b.recipe)
        cb, ct = recipe.config(b.preset, dict(b.overrides)), recipe.config(t.preset, dict(t.overrides))
        assert cb.train == ct.train and cb.data == ct.data and cb.eval == ct.eval, claim.name
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
    assert result["summary"]["rfcn"] == {"mean": pytest.approx(0.42), "std": pytest.approx(0.02), "n": 3}
    assert result["difference"] == pytest.approx(0.06)
    assert result["stderr"] == pytest.approx(math.sqrt(0.01**2 / 3 + 0.02**2 / 3))
    assert result["holds"] is True
    row = paper_claims.format_row(result)
    assert "0.420 ± 0.020" in row and "0.480 ± 0.010" in row and "+0.060" in row and "holds" in row
    json.dumps(result)  # JSON-serializable


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
