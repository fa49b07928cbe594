"""Paper claims over seeds: does each paper's idea beat its baseline on digits?

One harness for every claim: ``--claim NAME --seeds 0,1,2 [--epochs N]`` trains each arm of
the claim through the runner (``kerasdet train``, one subprocess per run) on the same data,
with the same budget, schedule and seeds, and writes
``benchmarks/results/paper_claims/NAME.json``::

    {"claim", "paper", "metric", "baseline", "treatment", "budget": {...},
     "runs": {ARM: [{"seed", "AP", "AP50", ..., "history": [val AP per epoch]}, ...]},
     "summary": {ARM: {"mean", "std", "n", "stats": {AP50, AP75, mask_AP, ...: {"mean", "std"}}}},
     "difference": mean(treatment) - mean(baseline),
     "stderr": sqrt(s_t^2 / n_t + s_b^2 / n_b),        (s: sample standard deviations)
     "holds": difference > 2 * stderr,                 (rule "greater"; see compare())
     "diagnostics": {...}}

plus ``NAME.png``: validation AP against epoch for each arm (mean line, min-max band over
the seeds). The arms differ only in the paper's contribution (``--set`` overrides of one
preset, or two presets that tests pin as identical but for it).

Claims (treatment vs baseline):

* ``focal``: RetinaNet with the focal loss (gamma 2, alpha 0.25) vs gamma 0 with the
  alpha-balanced cross-entropy (alpha 0.75, the best CE row of Lin's thesis Table 5.1a; "Focal
  Loss for Dense Object Detection" Table 1a), everything else the same (thesis §5.5.1).
* ``assd``: ASSD (attention + fusion) vs SSD (Yi et al., "ASSD: Attentive Single Shot
  Multibox Detector", Table 1 / Table 4: +attention and +fusion over SSD).
* ``assd_fusion``: ASSD vs ASSD without the fusion (attention only; ASSD Table 4).
* ``couplenet``: CoupleNet vs R-FCN (Zhu et al., "CoupleNet: Coupling Global Structure with
  Local Parts", Table 2; the Attention CoupleNet paper's Table II).
* ``acouplenet``: Attention CoupleNet vs CoupleNet (Zhu et al., "Attention CoupleNet", TIP
  2019, Table II: cascade attention).
* ``decompnet``: decompNet (``digits`` preset with the ordered loss, the ConvGRU's learned
  initial state and the paper's ``first_black`` stop rule) vs the sliding-window CNN + NMS
  (the ``sliding_window`` recipe) on the 3-6-9 digits, AP50 (per digit in ``diagnostics``)
  (Park & Berg, "Learning to decompose ...", Fig. 4).
* ``decompnet_stop``: the same decompNet weights scored with ``first_black`` vs ``bright``
  (every map whose peak reaches 0.5): holds when the AP50s agree within 0.02 (the paper's
  stop sign works).
* ``mask_rcnn_boxes``: Mask R-CNN (``mask_rcnn_fpn`` digits) vs the Faster R-CNN it
  extends (``faster_rcnn_fpn`` digits, the same network and schedule), box AP with the rule
  ``not_below`` (He et al., "Mask R-CNN", ICCV 2017, Table 3: multi-task training does not
  hurt, and there helps, the boxes); the mask AP / AP50 / AP75 in ``summary``.
* the SMN context claims (``smn_context``, ``smn_context_final``, ``smn_vs_mlp``,
  ``smn_memory_steps``) and the decompNet ablation ``decompnet_map_boxes``: see ``CLAIMS``.

An arm may score another arm's weights (``Arm.scores``) with an inference option changed:
it trains nothing.

Runs are cached: ``<work-dir>/<arm>_s<seed>/run.json`` of a finished run with the same
command is read, not retrained (an interrupted run resumes where its backup stopped; the
runner's exact resume), so arms shared by two claims (ASSD in ``assd`` and
``assd_fusion``) train once. ``--jobs 2`` runs two trainings at a time, each with
``cores / jobs`` TensorFlow threads: the digits models do not scale to 2 threads (measured on
2 cores: one R-FCN digits run 306 ms/step with 2 threads, two at once 293 / 298 ms/step with
1 thread each), so two one-thread runs take about half the wall time of two two-thread runs.

Diagnostics (``diagnostics`` in the JSON, printed): for the ASSD claims the mean entropy of
each attention unit's softmax rows relative to ``log N`` (1 = uniform, 0 = one-hot), per
source; for ``acouplenet`` the mean ``sigmoid(A)`` inside vs outside the ground-truth boxes
per attention level (what the A * f blocks pass through), on validation images.

``--quick``: a tiny generated set, a few steps and tiny networks (``QUICK_NETWORKS``; the CI test of the harness' plumbing;
its numbers mean nothing).

Usage::

    PYTHONPATH=$PWD python benchmarks/paper_claims.py --claim acouplenet,couplenet --seeds 0,1,2 --jobs 2
    PYTHONPATH=$PWD python benchmarks/paper_claims.py --claim focal --quick --seeds 0,1
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_flags_text  # noqa: E402  (benchmarks/, the script's folder, is on the path)

RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results", "paper_claims")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm: a recipe preset plus ``--set`` overrides. ``scores``: this arm trains nothing
    and scores the weights of that other arm (same seed) with ``overrides`` applied to the
    rebuilt model (an inference option such as decompNet's stop rule)."""

    name: str
    recipe: str
    preset: str
    overrides: tuple = ()
    scores: "Arm | None" = None
    base_from: "Arm | None" = None  # SMN arms: start from this arm's trained base (its seed base_seed)
    base_seed: int = 0

    def describe(self):
        sets = " ".join(f"--set {k}={json.dumps(v)}" for k, v in self.overrides)
        return f"--recipe {self.recipe} --preset {self.preset}" + (f" {sets}" if sets else "")


@dataclasses.dataclass(frozen=True)
class Claim:
    """A claim: ``treatment`` beats ``baseline`` on ``metric`` (``rule="greater"``), or the two
    agree within ``margin`` (``rule="equivalent"``)."""

    name: str
    paper: str
    baseline: Arm
    treatment: Arm
    epochs: float | None  # None: each arm's preset schedule (staged recipes)
    metric: str = "AP"
    rule: str = "greater"
    margin: float = 0.0
    diagnostics: str | None = None


_RETINA_CE = Arm("retinanet_ce", "retinanet", "digits", (("model.focal_gamma", 0.0), ("model.focal_alpha", 0.75)))
_RETINA_FL = Arm("retinanet_focal", "retinanet", "digits")
_SSD = Arm("ssd", "assd", "ssd_digits")
_ASSD = Arm("assd", "assd", "assd_digits")
_ASSD_ATTENTION = Arm("assd_attention_only", "assd", "assd_digits", (("model.fusion", False),))
_DECOMPNET_FIXES = (("model.order", "ordered"), ("model.initial_state", "input"), ("model.stop", "first_black"))
_DECOMPNET = Arm("decompnet_ordered", "decompnet", "digits", _DECOMPNET_FIXES)
_SLIDING_WINDOW = Arm("sliding_window", "sliding_window", "digits")
_DECOMPNET_BRIGHT = Arm("decompnet_ordered_bright", "decompnet", "digits", (("model.stop", "bright"),), scores=_DECOMPNET)
_DECOMPNET_FIRST_BLACK = Arm("decompnet_ordered_first_black", "decompnet", "digits", (("model.stop", "first_black"),),
                             scores=_DECOMPNET)
# decompNet's boxes from its maps (the tight box of the map above half its peak) instead of the regressor
_DECOMPNET_MAP_BOXES = Arm("decompnet_ordered_map_boxes", "decompnet", "digits", (("model.box_source", "maps"),),
                           scores=_DECOMPNET)
_RFCN = Arm("rfcn", "couplenet", "rfcn_digits")
_COUPLENET = Arm("couplenet", "couplenet", "couplenet_digits")
_ACOUPLENET = Arm("acouplenet", "couplenet", "acouplenet_digits")
_ACOUPLENET_RESIDUAL = Arm("acouplenet_residual", "couplenet", "acouplenet_digits",
                           (("backbone.attention_residual", True),))
# SMN on the context digits: one base trained to its plateau (seed 0), then every arm trains
# the same extra steps from it (recipes/smn.py, the digits_context* presets)
_SMN_BASE = Arm("smn_context_base", "smn", "digits_context_base")
_SMN_BASE_MORE = Arm("smn_context_base_more", "smn", "digits_context_base_more", base_from=_SMN_BASE)
_SMN_FINAL = Arm("smn_context", "smn", "digits_context", base_from=_SMN_BASE)
_SMN_STEPS = Arm("smn_context_steps", "smn", "digits_context", (("model.inference", "steps"),), scores=_SMN_FINAL)
_SMN_MLP = Arm("smn_context_mlp", "smn", "digits_context_mlp", base_from=_SMN_BASE)
# the final mode without its N2 memory steps: the N1 = 5 base detections it writes (= the base's top 5)
# Mask R-CNN's box AP against the Faster R-CNN it extends (same digits preset, same schedule)
_FASTER_RCNN = Arm("faster_rcnn_fpn", "faster_rcnn_fpn", "digits")
_MASK_RCNN = Arm("mask_rcnn_fpn", "mask_rcnn_fpn", "digits")
_SMN_WRITES_ONLY = Arm("smn_context_writes_only", "smn", "digits_context", (("model.num_memory_steps", 0),),
                       scores=_SMN_FINAL)

CLAIMS = {
    c.name: c
    for c in (
        Claim("focal", "Lin, Detecting Common Objects in Context (thesis), §5.5.1, Table 5.1a-b: FL gamma 2 "
              "34.0 AP vs alpha-balanced CE 31.1 AP (R50, 600 px)", _RETINA_CE, _RETINA_FL, epochs=4),
        Claim("assd", "Yi et al., ASSD: Attentive Single Shot Multibox Detector, Table 1 / 4: ASSD321 +attention "
              "+fusion over SSD321 (VOC07 test mAP 76.8 -> 80.0... see the README)", _SSD, _ASSD, epochs=4,
              diagnostics="assd"),
        Claim("assd_fusion", "Yi et al., ASSD, Table 4 (ablation): fusion on top of attention", _ASSD_ATTENTION, _ASSD,
              epochs=4, diagnostics="assd"),
        Claim("couplenet", "Zhu et al., CoupleNet (ICCV 2017) Table 2 / Attention CoupleNet (TIP 2019) Table II: "
              "coupling the global branch to R-FCN", _RFCN, _COUPLENET, epochs=4),
        Claim("acouplenet", "Zhu et al., Attention CoupleNet (TIP 2019), Table II: cascade attention over CoupleNet",
              _COUPLENET, _ACOUPLENET, epochs=4, diagnostics="acouplenet"),
        Claim("acouplenet_residual", "ablation of acouplenet: the cascade attention as (1 + A) * f, which keeps "
              "the context A * f erases", _COUPLENET, _ACOUPLENET_RESIDUAL, epochs=4, diagnostics="acouplenet"),
        Claim("decompnet", "Park & Berg, Learning to decompose (ICLR 2016 workshop), Fig. 4: decompNet above the "
              "sliding-window CNN + NMS on the 3-6-9 digits (box AP50 per digit)", _SLIDING_WINDOW, _DECOMPNET,
              epochs=None, metric="AP50", diagnostics="per_class_ap50"),
        Claim("decompnet_map_boxes", "ablation of decompnet: the same weights with boxes from the maps (Park & "
              "Berg §2.3: boxes 'by a simple program' from the maps) instead of the regressor, against the "
              "sliding window", _SLIDING_WINDOW, _DECOMPNET_MAP_BOXES, epochs=None, metric="AP50",
              diagnostics="per_class_ap50"),
        Claim("smn_context", "Chen & Gupta, Spatial Memory for Context Reasoning in Object Detection (ICCV 2017), "
              "Table 1/3: SMN (N = 10 steps, no NMS) above its base Faster R-CNN (per-class NMS) on the context "
              "digits", _SMN_BASE_MORE, _SMN_STEPS, epochs=None, diagnostics="smn"),
        Claim("smn_context_final", "Chen & Gupta, Sec. 6.1: the final mode (N1 base writes + N2 memory steps, "
              "trained that way) above the base on the context digits", _SMN_BASE_MORE, _SMN_FINAL, epochs=None,
              diagnostics="smn"),
        Claim("smn_memory_steps", "ablation of smn_context_final: the N2 memory steps over the N1 base writes "
              "alone (the same weights; what the memory adds to the base's top detections)", _SMN_WRITES_ONLY,
              _SMN_FINAL, epochs=None, diagnostics="smn"),
        Claim("smn_vs_mlp", "Chen & Gupta, Table 2: SMN above the MLP control at the same parameter count",
              _SMN_MLP, _SMN_FINAL, epochs=None, diagnostics="smn"),
        Claim("decompnet_stop", "Park & Berg, §2.2: the last map is black and works as a stop sign (first_black "
              "agrees with keeping every bright map, same weights)", _DECOMPNET_BRIGHT, _DECOMPNET_FIRST_BLACK,
              epochs=None, metric="AP50", rule="equivalent", margin=0.02),
        Claim("mask_rcnn_boxes", "He et al., Mask R-CNN (ICCV 2017), Table 3: the mask branch does not hurt "
              "boxes (multi-task training: box AP 37.3 Faster R-CNN with RoIAlign -> 38.2 Mask R-CNN, R101-FPN, "
              "COCO); box AP on the digits, the preset schedule", _FASTER_RCNN, _MASK_RCNN, epochs=None,
              rule="not_below"),
    )
}


# --- statistics ---------------------------------------------------------------------------
def mean_std(values):
    """``(mean, sample std)`` (``ddof = 1``; std 0 for one value)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def compare(baseline, treatment, *, rule="greater", margin=0.0):
    """``{"difference", "stderr", "holds"}`` of two lists of per-seed values:
    difference = mean(t) - mean(b), stderr = sqrt(s_t^2 / n_t + s_b^2 / n_b) (Welch's);
    ``rule="greater"``: holds when difference > 2 stderr; ``"equivalent"``: when
    ``|difference| <= margin``; ``"not_below"``: when the treatment is not significantly
    below the baseline, difference >= -2 stderr (a bar of "should not hurt")."""
    mb, sb = mean_std(baseline)
    mt, st = mean_std(treatment)
    difference = mt - mb
    stderr = math.sqrt(st**2 / len(treatment) + sb**2 / len(baseline))
    if rule == "greater":
        holds = difference > 2.0 * stderr
    elif rule == "equivalent":
        holds = abs(difference) <= margin
    elif rule == "not_below":
        holds = difference >= -2.0 * stderr
    else:
        raise ValueError(f"rule must be 'greater', 'equivalent' or 'not_below', got {rule!r}")
    return {"difference": difference, "stderr": stderr, "holds": bool(holds)}


# --- runs ---------------------------------------------------------------------------------
#: ``--quick``: tiny networks of a recipe (the plumbing test trains in seconds, not minutes).
QUICK_NETWORKS = {
    "retinanet": {"backbone.widths": [8, 16, 16, 16], "backbone.blocks": [0, 0, 0, 0], "model.fpn_channels": 8,
                  "model.head_channels": 8},
}


def run_command(arm, seed, *, epochs, work_dir, data_dir, quick):
    """The ``kerasdet train`` command line of one run (``epochs`` None: the preset's)."""
    cmd = [sys.executable, "-m", "kerasdet.cli", "train", "--recipe", arm.recipe, "--preset", arm.preset,
           "--seed", str(seed), "--work-dir", work_dir, "--no-export", "--verbose", "2",
           "--set", "eval.every_n_epochs=1"]
    if epochs is not None:
        cmd += ["--set", f"train.epochs={json.dumps(epochs)}"]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    if quick:
        cmd += ["--set", f"data.generate.num_train={quick['num_train']}",
                "--set", f"data.generate.num_val={quick['num_val']}",
                "--set", f"train.batch_size={quick['batch_size']}", "--set", "train.warmup_steps=0"]
        for key, value in QUICK_NETWORKS.get(arm.recipe, {}).items():
            cmd += ["--set", f"{key}={json.dumps(value)}"]
    if arm.base_from is not None:
        cmd += ["--set", f"base.weights={json.dumps(base_weights_path(arm, os.path.dirname(work_dir)))}"]
    for key, value in arm.overrides:
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    return cmd


def base_weights_path(arm, work_root):
    """Where the base an arm starts from (``arm.base_from``) is saved."""
    return os.path.join(work_root, f"{arm.base_from.name}_s{arm.base_seed}", "base.weights.h5")


def export_base(arm, work_root, log=print):
    """Saves the C4 base of ``arm.base_from``'s finished run (seed ``arm.base_seed``) as
    :func:`base_weights_path` (once)."""
    path = base_weights_path(arm, work_root)
    source = os.path.dirname(path)
    if os.path.isfile(path) and os.path.getmtime(path) >= os.path.getmtime(os.path.join(source, "run.json")):
        return path
    from kerasdet.engine.runner import load_run

    log(f"save the base of {arm.base_from.name} seed {arm.base_seed} to {path}")
    _, _, model, _ = load_run(source)
    model.base.save_weights(path)
    return path


def _finished(work_dir, cmd):
    path = os.path.join(work_dir, "run.json")
    marker = os.path.join(work_dir, "claims_command.json")
    if not (os.path.isfile(path) and os.path.isfile(marker)):
        return False
    with open(marker) as f:  # the same arguments, in any order of the options
        if sorted(json.load(f)) != sorted(cmd[1:]):
            return False
    with open(path) as f:
        return bool(json.load(f).get("stats"))


def train_run(arm, seed, *, epochs, work_root, data_dir, quick, threads, log):
    """Trains (or reads the cached) run of ``arm`` at ``seed``; returns its record."""
    work_dir = os.path.join(work_root, f"{arm.name}_s{seed}")
    cmd = run_command(arm, seed, epochs=epochs, work_dir=work_dir, data_dir=data_dir, quick=quick)
    if not _finished(work_dir, cmd):
        if os.path.isfile(os.path.join(work_dir, "run.json")):  # finished with another command: start over
            os.replace(os.path.join(work_dir, "run.json"), os.path.join(work_dir, "run.previous.json"))
        os.makedirs(work_dir, exist_ok=True)
        with open(os.path.join(work_dir, "claims_command.json"), "w") as f:
            json.dump(cmd[1:], f)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if threads:
            env.update(TF_NUM_INTRAOP_THREADS=str(threads), TF_NUM_INTEROP_THREADS=str(threads))
        log(f"train {arm.name} seed {seed}: {' '.join(cmd[3:])}")
        t = time.time()
        with open(os.path.join(work_dir, "train.log"), "a") as out:
            result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if result.returncode != 0:
            raise RuntimeError(f"{arm.name} seed {seed} failed (exit {result.returncode}); see {work_dir}/train.log")
        log(f"done {arm.name} seed {seed} in {(time.time() - t) / 60:.1f} min")
    with open(os.path.join(work_dir, "run.json")) as f:
        record = json.load(f)
    history = record["stages"][-1]["history"]
    row = {"seed": seed, "work_dir": os.path.relpath(work_dir, ROOT)}
    row.update({k: float(v) for k, v in record["stats"].items() if isinstance(v, (int, float))})
    row["history"] = [float(v) for v in history.get("val_AP", [])]
    row["train_seconds"] = float(record["times"]["train_seconds"])
    row["parameters"] = record.get("parameters")
    return row


def score_run(arm, seed, *, work_root, log):
    """An arm that ``scores`` another's weights: the source run rebuilt with ``arm.overrides``
    and evaluated on its validation split (cached in ``<work_root>/<arm>_s<seed>.json``)."""
    from kerasdet.engine import builders
    from kerasdet.engine.runner import load_run, val_source_of_run

    source_dir = os.path.join(work_root, f"{arm.scores.name}_s{seed}")
    out = os.path.join(work_root, f"{arm.name}_s{seed}.json")
    if os.path.isfile(out) and os.path.getmtime(out) >= os.path.getmtime(os.path.join(source_dir, "run.json")):
        with open(out) as f:
            return json.load(f)
    log(f"score {arm.scores.name} seed {seed} as {arm.name}")
    _, config, model, record = load_run(source_dir, overrides=dict(arm.overrides))
    source = val_source_of_run(config, record)
    results_file = os.path.join(work_root, f"{arm.name}_s{seed}_results.json")
    stats = builders.evaluate(model, builders.build_dataset(config, source, training=False), source,
                              metric=config.eval.metric, results_file=results_file)
    row = {"seed": seed, "work_dir": os.path.relpath(source_dir, ROOT), "scored_with": dict(arm.overrides),
           "results_file": os.path.relpath(results_file, ROOT), "history": [],
           "parameters": record.get("parameters")}
    row.update({k: float(v) for k, v in stats.items() if isinstance(v, (int, float))})
    with open(out, "w") as f:
        json.dump(row, f)
    return row


# --- diagnostics --------------------------------------------------------------------------
def run_results(work_dir, results_file=None):
    """``(run.json record, COCO results list, validation annotations path)`` of a finished run
    (``results_file``: another results file of its validation split, e.g. a scoring arm's)."""
    with open(os.path.join(work_dir, "run.json")) as f:
        record = json.load(f)
    with open(results_file or os.path.join(work_dir, "val_results.json")) as f:
        results = json.load(f)
    gt_path = record["paths"]["val"]["val_annotations"]
    if not os.path.isabs(gt_path):
        gt_path = os.path.join(ROOT, gt_path)
    return record, results, gt_path


def per_class_ap50(work_dir, *, num_images=None, results_file=None):
    """Box AP at IoU 0.5 per category (pycocotools, :func:`kerasdet.evaluation.per_class.
    per_class_pr`) of a run's final validation results, by category name."""
    from kerasdet.evaluation.per_class import per_class_pr

    del num_images
    record, results, gt = run_results(work_dir, results_file)
    per_class = per_class_pr(gt, results, iou=0.5)
    with open(gt) as f:
        coco = json.load(f)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    out = {names[c]: v["ap"] for c, v in per_class.items() if c != "mean"}
    # the sliding window counts its detections scoring >= 0.5 (after NMS); decompNet every
    # map its stop rule keeps (its count is the number of maps: Park & Berg §3.3)
    threshold = COUNT_SCORE_THRESHOLDS.get(record.get("recipe"), 0.0)
    out["counts"] = count_accuracy_of_results(coco, results, score_threshold=threshold)
    out["counts"]["score_threshold"] = threshold
    return out


#: Score a detection needs to count as an instance in the count accuracy, per recipe.
COUNT_SCORE_THRESHOLDS = {"sliding_window": 0.5}


def count_accuracy_of_results(coco, results, *, score_threshold=0.0):
    """Instance-count accuracy (:func:`kerasdet.evaluation.per_class.count_accuracy`) of COCO
    results against a COCO ground-truth dict: per validation image and category, the number
    of detections scoring >= ``score_threshold`` vs the number of (non-crowd) objects."""
    import numpy as np

    from kerasdet.evaluation.per_class import count_accuracy

    cats = sorted(c["id"] for c in coco["categories"])
    images = sorted(i["id"] for i in coco["images"])
    row = {i: n for n, i in enumerate(images)}
    col = {c: n for n, c in enumerate(cats)}
    target = np.zeros((len(images), len(cats)), np.int64)
    predicted = np.zeros_like(target)
    for a in coco["annotations"]:
        if not a.get("iscrowd", 0):
            target[row[a["image_id"]], col[a["category_id"]]] += 1
    for r in results:
        if r["score"] >= score_threshold and r["image_id"] in row:
            predicted[row[r["image_id"]], col[r["category_id"]]] += 1
    out = count_accuracy(predicted, target)
    out["per_class"] = {str(c): v for c, v in zip(cats, out["per_class"])}
    return out



def _val_batches(work_dir, num_images):
    from kerasdet.engine import builders
    from kerasdet.engine.runner import load_run, val_source_of_run

    _, config, model, record = load_run(work_dir)
    source = val_source_of_run(config, record)
    dataset = builders.build_dataset(config, source, training=False)
    batches, seen = [], 0
    for images, labels in dataset:
        batches.append((images, labels))
        seen += int(images.shape[0])
        if seen >= num_images:
            break
    return model, batches


def assd_attention_entropy(work_dir, *, num_images=100, results_file=None):
    """Mean entropy of each attention unit's softmax rows / ``log N`` (1 uniform, 0 one-hot),
    per source, on validation images (None for a 1x1 source)."""
    import tensorflow as tf

    model, batches = _val_batches(work_dir, num_images)
    if model.attention is None:
        return None
    totals = [0.0] * len(model.attention)
    count = 0
    for images, _ in batches:
        inputs = model.sources(tf.cast(images, tf.float32), attend=False)
        for i, (unit, x) in enumerate(zip(model.attention, inputs)):
            a = unit.attention_weights(x)  # [B, N, N]
            n = int(a.shape[-1])
            if n == 1:  # a 1x1 source: one key, the entropy is not defined
                totals[i] = None
                continue
            h = -tf.reduce_sum(a * tf.math.log(tf.maximum(a, 1e-12)), axis=-1)
            totals[i] += float(tf.reduce_mean(h)) / math.log(n) * int(images.shape[0])
        count += int(images.shape[0])
    return {f"source{i}": None if t is None else t / count for i, t in enumerate(totals)}


def acouplenet_attention_inside_outside(work_dir, *, num_images=100, results_file=None):
    """Mean ``sigmoid(A)`` of the cells whose centre lies inside / outside every ground-truth
    box, per attention level, on validation images."""
    import tensorflow as tf

    model, batches = _val_batches(work_dir, num_images)
    keys = getattr(model, "attention_keys", [])
    if not keys:
        return None
    sums = {k: [0.0, 0.0, 0.0, 0.0] for k in keys}  # inside sum, inside count, outside sum, outside count
    for images, labels in batches:
        feats = model.backbone(tf.cast(images, tf.float32), training=False)
        boxes = tf.cast(labels["boxes"], tf.float32)
        valid = labels["classes"] >= 0
        size = float(images.shape[1])
        for k in keys:
            a = tf.sigmoid(tf.cast(feats[k][..., 0], tf.float32))  # [B, h, w]
            h, w = int(a.shape[1]), int(a.shape[2])
            cy = (tf.range(h, dtype=tf.float32) + 0.5) * size / h
            cx = (tf.range(w, dtype=tf.float32) + 0.5) * size / w
            y0, x0, y1, x1 = [boxes[:, :, i][:, :, None, None] for i in range(4)]
            inside_box = (cy[None, None, :, None] >= y0) & (cy[None, None, :, None] < y1) & \
                         (cx[None, None, None, :] >= x0) & (cx[None, None, None, :] < x1)
            inside = tf.reduce_any(inside_box & valid[:, :, None, None], axis=1)
            fin = tf.cast(inside, tf.float32)
            s = sums[k]
            s[0] += float(tf.reduce_sum(a * fin))
            s[1] += float(tf.reduce_sum(fin))
            s[2] += float(tf.reduce_sum(a * (1 - fin)))
            s[3] += float(tf.reduce_sum(1 - fin))
    return {k: {"inside": s[0] / max(s[1], 1), "outside": s[2] / max(s[3], 1)} for k, s in sums.items()}


def oracle_context_results(gt, results, *, iou=0.5):
    """The context oracle: every detection whose best-overlapping ground truth (IoU >= ``iou``)
    is a degraded member of a pair is relabelled with the class the pair rule gives its
    partner's ground-truth class (``partner_class`` of the context digits generator, the
    class half-way round the digit classes). What perfect use of the partner would give."""
    import numpy as np

    from kerasdet.data.digits import partner_class_of

    names = {c["id"]: c["name"] for c in gt["categories"]}
    ids = {n: c for c, n in names.items()}
    digits = sorted(int(n) for n in names.values())
    by_image = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    out = []
    for r in results:
        anns = by_image.get(r["image_id"], [])
        r = dict(r)
        if anns:
            b = np.array([a["bbox"] for a in anns], np.float64)
            x, y, w, h = r["bbox"]
            iw = np.maximum(0, np.minimum(x + w, b[:, 0] + b[:, 2]) - np.maximum(x, b[:, 0]))
            ih = np.maximum(0, np.minimum(y + h, b[:, 1] + b[:, 3]) - np.maximum(y, b[:, 1]))
            inter = iw * ih
            overlap = inter / np.maximum(w * h + b[:, 2] * b[:, 3] - inter, 1e-9)
            best = int(np.argmax(overlap))
            target = anns[best]
            if overlap[best] >= iou and target.get("degraded"):
                partner = [a for a in anns if a.get("pair_id") == target["pair_id"] and a["id"] != target["id"]]
                if partner:
                    rule = partner_class_of(int(names[partner[0]["category_id"]]), digits)
                    r["category_id"] = ids[str(rule)]
        out.append(r)
    return out


def smn_context_breakdown(work_dir, *, num_images=None, results_file=None):
    """The context digits' breakdown of a run's validation results: AP / AP50 on the degraded
    and on the clean objects (the others ignored: :func:`kerasdet.evaluation.subsets.subset_ap`),
    the degraded objects' AP under the context oracle (:func:`oracle_context_results`), and the
    duplicate counts (:func:`kerasdet.evaluation.duplicates.count_duplicates`)."""
    from kerasdet.evaluation.duplicates import count_duplicates
    from kerasdet.evaluation.subsets import subset_ap

    del num_images
    _, results, gt_path = run_results(work_dir, results_file)
    with open(gt_path) as f:
        gt = json.load(f)
    degraded = subset_ap(gt_path, results, lambda a: bool(a.get("degraded")))
    clean = subset_ap(gt_path, results, lambda a: not a.get("degraded"))
    oracle = subset_ap(gt_path, oracle_context_results(gt, results), lambda a: bool(a.get("degraded")))
    return {"degraded_AP": degraded["AP"], "degraded_AP50": degraded["AP50"], "clean_AP": clean["AP"],
            "clean_AP50": clean["AP50"], "oracle_degraded_AP": oracle["AP"], "oracle_degraded_AP50": oracle["AP50"],
            "degraded_objects": degraded["objects"], "clean_objects": clean["objects"], **count_duplicates(results)}


DIAGNOSTICS = {"assd": assd_attention_entropy, "acouplenet": acouplenet_attention_inside_outside,
               "per_class_ap50": per_class_ap50, "smn": smn_context_breakdown}


# --- report -------------------------------------------------------------------------------
#: Stats summarized per arm beside the claim's metric, where every seed of the arm has them.
SUMMARY_STATS = ("AP", "AP50", "AP75", "mask_AP", "mask_AP50", "mask_AP75")


def summarize(claim, runs, *, budget, diagnostics=None):
    """The claim's JSON record from its per-arm run rows."""
    metric = claim.metric
    summary = {}
    for arm in (claim.baseline, claim.treatment):
        mean, std = mean_std([r[metric] for r in runs[arm.name]])
        summary[arm.name] = {"mean": mean, "std": std, "n": len(runs[arm.name])}
        # the other headline stats every seed of the arm has (box AP50 / AP75, mask AP ...)
        others = [k for k in SUMMARY_STATS if k != metric and all(k in r for r in runs[arm.name])]
        summary[arm.name]["stats"] = {k: dict(zip(("mean", "std"), mean_std([r[k] for r in runs[arm.name]])))
                                      for k in others}
    result = {
        "claim": claim.name,
        "paper": claim.paper,
        "metric": metric,
        "rule": claim.rule if claim.rule != "equivalent" else f"{claim.rule} within {claim.margin}",
        "baseline": {"arm": claim.baseline.name, "command": claim.baseline.describe()},
        "treatment": {"arm": claim.treatment.name, "command": claim.treatment.describe()},
        "budget": budget,
        "runs": runs,
        "summary": summary,
    }
    result.update(compare([r[metric] for r in runs[claim.baseline.name]], [r[metric] for r in runs[claim.treatment.name]],
                          rule=claim.rule, margin=claim.margin))
    result["diagnostics"] = diagnostics or {}
    return result


def plot(result, path):
    """Validation AP against epoch, per arm: mean line and min-max band over the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in (result["baseline"]["arm"], result["treatment"]["arm"]):
        histories = [r["history"] for r in result["runs"][arm] if r["history"]]
        if not histories:
            continue
        n = min(len(h) for h in histories)
        cols = list(zip(*[h[:n] for h in histories]))
        epochs = list(range(1, n + 1))
        means = [sum(c) / len(c) for c in cols]
        ax.plot(epochs, means, marker="o", label=f"{arm} (mean of {len(histories)})")
        ax.fill_between(epochs, [min(c) for c in cols], [max(c) for c in cols], alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation AP")
    verdict = "holds" if result["holds"] else "missed"
    ax.set_title(f"{result['claim']}: {result['difference']:+.3f} ± {result['stderr']:.3f} ({verdict})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_row(result):
    """One README table row: claim, paper, baseline / treatment mean ± std, difference, verdict."""
    s = result["summary"]
    b, t = result["baseline"]["arm"], result["treatment"]["arm"]
    verdict = "holds" if result["holds"] else "missed"
    return (f"| `{result['claim']}` | {t} vs {b} | {s[b]['mean']:.3f} ± {s[b]['std']:.3f} | "
            f"{s[t]['mean']:.3f} ± {s[t]['std']:.3f} | {result['difference']:+.3f} ± {result['stderr']:.3f} | {verdict} |")


def run_claims(claims, *, seeds, epochs=None, work_root, data_dir=None, quick=None, jobs=1, results_dir=RESULTS_DIR,
               log=print, diagnose=True):
    """Trains every (arm, seed) of ``claims`` (an arm shared by two claims once; ``jobs`` at a
    time from one queue), then writes ``<results_dir>/<claim>.json`` and ``.png`` per claim;
    returns ``{claim: record}``. ``epochs``: the same for every claim (default: each claim's)."""
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    budget_epochs = {c.name: c.epochs if epochs is None else epochs for c in claims}
    tasks, scoring = {}, {}
    for seed in seeds:
        for c in claims:
            for arm in (c.baseline, c.treatment):
                e = budget_epochs[c.name]
                if arm.scores is None:
                    tasks.setdefault((arm, seed, e), None)
                else:
                    tasks.setdefault((arm.scores, seed, e), None)
                    scoring.setdefault((arm, seed, e), None)
    bases = {(key[0].base_from, key[0].base_seed, None): None for key in tasks if key[0].base_from is not None}
    for arm in {key[0] for key in list(tasks) + list(bases)}:
        _ensure_data(arm, data_dir, quick)
    common = dict(work_root=work_root, data_dir=data_dir, quick=quick, threads=threads, log=log)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        # the shared bases first (their runs are not arms of a claim), then what starts from them
        for future in [pool.submit(train_run, key[0], key[1], epochs=key[2], **common) for key in bases]:
            future.result()
        for arm in {key[0] for key in tasks if key[0].base_from is not None}:
            export_base(arm, work_root, log=log)
        futures = {key: pool.submit(train_run, key[0], key[1], epochs=key[2], **common) for key in tasks}
        rows = {key: f.result() for key, f in futures.items()}
    for key in scoring:  # in this process, after the trainings
        rows[key] = score_run(key[0], key[1], work_root=work_root, log=log)
    results = {}
    for claim in claims:
        e = budget_epochs[claim.name]
        runs = {arm.name: [rows[(arm, s, e)] for s in seeds] for arm in (claim.baseline, claim.treatment)}
        budget = {
            "epochs": e,
            "seeds": list(seeds),
            "data": "quick" if quick else data_text(claim.baseline.scores or claim.baseline),
            "parameters": {arm: rs[0].get("parameters") for arm, rs in runs.items()},
            # an arm that scores another's weights trains nothing: None
            "train_minutes_mean": {arm: (sum(r["train_seconds"] for r in rs) / len(rs) / 60
                                         if all("train_seconds" in r for r in rs) else None) for arm, rs in runs.items()},
            "jobs": jobs,
            "threads_per_run": threads,
            "cpu_flags": cpu_flags_text(),
            "cores": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"),
        }
        diagnostics = {}
        if diagnose and claim.diagnostics:
            fn = DIAGNOSTICS[claim.diagnostics]
            for arm, rs in runs.items():
                per_seed = [fn(os.path.join(ROOT, r["work_dir"]), num_images=16 if quick else 100,
                               **({"results_file": os.path.join(ROOT, r["results_file"])} if "results_file" in r else {}))
                            for r in rs]
                diagnostics[arm] = per_seed if any(p is not None for p in per_seed) else None
        result = summarize(claim, runs, budget=budget, diagnostics=diagnostics)
        os.makedirs(results_dir, exist_ok=True)
        with open(os.path.join(results_dir, f"{claim.name}.json"), "w") as f:
            json.dump(result, f, indent=1)
        plot(result, os.path.join(results_dir, f"{claim.name}.png"))
        results[claim.name] = result
    return results


def data_text(arm):
    """The generated data set of an arm's preset, in words (for the record's budget)."""
    from kerasdet.engine.recipes import load_recipe

    data = load_recipe(arm.recipe).config(arm.preset, dict(arm.overrides)).data
    g = dict(data.generate)
    extra = ", ".join(f"{k}={g[k]}" for k in sorted(g) if k not in ("num_train", "num_val", "image_size", "seed"))
    size = "x".join(str(v) for v in g.get("image_size", ()))
    return (f"{data.dir}: {g.get('num_train')} train / {g.get('num_val')} val, {size}"
            f"{'; ' + extra if extra else ''}; data.generate.seed {g.get('seed', 0)}")


def _ensure_data(arm, data_dir, quick):
    """Generates the digits set once before runs share it (two runs must not both write it)."""
    from kerasdet.engine import builders
    from kerasdet.engine.recipes import load_recipe

    overrides = {}
    if quick:
        overrides = {"data.generate.num_train": quick["num_train"], "data.generate.num_val": quick["num_val"]}
    config = load_recipe(arm.recipe).config(arm.preset, overrides)
    builders.build_sources(config, data_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--claim", required=True, help=f"comma-separated claims: {', '.join(CLAIMS)}, or all")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    parser.add_argument("--epochs", type=float, default=None, help="epochs per run (default: the claim's)")
    parser.add_argument("--work-dir", default=os.path.join("runs", "paper_claims"))
    parser.add_argument("--data-dir", default=None, help="digits folder (default: the preset's data/digits)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at a time (threads split between them)")
    parser.add_argument("--quick", action="store_true", help="tiny data and steps: the plumbing, not the claim")
    parser.add_argument("--results-dir", default=RESULTS_DIR)
    parser.add_argument("--no-diagnostics", action="store_true")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    names = list(CLAIMS) if args.claim == "all" else [n.strip() for n in args.claim.split(",") if n.strip()]
    unknown = [n for n in names if n not in CLAIMS]
    if unknown:
        parser.error(f"unknown claim {unknown[0]!r}; claims: {', '.join(CLAIMS)}")
    if len(seeds) < 2:
        parser.error("--seeds: at least 2 seeds (a standard deviation needs two; the claims use 3)")
    quick = None
    epochs = args.epochs
    work_dir = args.work_dir
    data_dir = args.data_dir
    if args.quick:
        quick = {"num_train": 24, "num_val": 8, "batch_size": 8}
        epochs = 2 if epochs is None else epochs
        work_dir = os.path.join(work_dir, "quick")
        data_dir = data_dir or os.path.join(work_dir, "digits_quick")
    t = time.time()
    results = run_claims([CLAIMS[n] for n in names], seeds=seeds, epochs=epochs, work_root=work_dir,
                         data_dir=data_dir, quick=quick, jobs=args.jobs, results_dir=args.results_dir,
                         diagnose=not args.no_diagnostics)
    print("\n| claim | arms | baseline | treatment | difference ± stderr | verdict |")
    print("|---|---|---|---|---|---|")
    for result in results.values():
        print(format_row(result))
    for name, result in results.items():
        if result["diagnostics"]:
            print(f"{name} diagnostics:", json.dumps(result["diagnostics"]))
    print(f"{', '.join(names)}: {(time.time() - t) / 60:.1f} min, {cpu_flags_text()}; results in {args.results_dir}")
    return results


if __name__ == "__main__":
    main()
