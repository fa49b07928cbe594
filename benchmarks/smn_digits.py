"""Base Faster R-CNN vs the MLP control vs SMN on the embedded digits set under one budget (seed 000).

Two runs of the ``smn`` recipe (:mod:`kerasdet.recipes.smn`) through the runner
(:func:`kerasdet.engine.runner.run`, the same code as ``kerasdet train``), one data set,
one seed:

1. ``<work-dir>/smn``: the ``digits`` preset: the C4 base Faster R-CNN's stages
   (``base_1``, ``base_2``: 2 + 2 epochs), then SMN on the frozen base with the curriculum
   N = 2 -> 5 -> 10 (the memory stages: 100 + 75 + 50 steps). The trained base is saved
   from that run (rebuilt by :func:`~kerasdet.engine.runner.load_run`) as
   ``<work-dir>/base.weights.h5`` (train time in ``base_seconds.json`` beside it);
2. ``<work-dir>/mlp``: the MLP control, the ``digits_mlp`` preset (``context="mlp"``: the
   same context net on ``conv5_3``, the same output modules, no memory) with
   ``base.weights`` = that base and only its ``mlp`` stage (225 steps: the memory stages'
   steps and images, same optimizer and learning rate), at the context width whose
   inference-time parameter count matches SMN's
   (:func:`kerasdet.models.smn.matched_mlp_channels`, ``model.mlp_channels``).

Both runs use ``--seed`` (the memory / MLP weights are initialised from the run's seed;
the pre-engine script used ``seed + 1`` for them) and do not export. The runner evaluates
each run itself (``run.json``); the rows below are scored again here from the rebuilt
models so that each writes its COCO results file for the duplicate count.

Each variant is scored with pycocotools on the validation split (AP, AP50), and the
*duplicate detections* are counted: a detection is a duplicate when a higher-scored
detection of the same class in the same image overlaps it with IoU > 0.5 (counted among
detections with score >= 0.05 and >= 0.3). Rows:

* ``base (NMS)``: the base's own per-class NMS (0.5) output (up to 100 detections);
* ``base (NMS, top-10)``: the same, at most N = 10 detections (the paper's "Baseline" at
  N): a second base built from the run's config with ``base.max_detections = 10``
  (:func:`kerasdet.recipes.smn.build_base`) and the trained base weights;
* ``base top-N (no NMS)``: the top N = 10 RoIs by base score, no NMS (what the greedy
  selection outputs without memory: the control for "SMN replaces NMS";
  ``SMN.configure(inference="base_topn")``);
* ``SMN final``: N1 = 5 base (NMS) detections written, then N2 = 5 memory steps, no NMS on
  the memory steps (spec §3 final mode);
* ``SMN steps``: N = 10 memory steps from the start, no NMS anywhere (ablation mode);
* ``MLP control``: base + MLP residual logits, per-class NMS.

Results go to ``<work-dir>/results.json`` (and ``<work-dir>/<row>_results.json``, the
COCO detections of each row).

Flags:

* ``--work-dir`` (default ``runs/smn_bench``), ``--data-dir`` (the digits folder; default
  the preset's ``data/digits``), ``--seed``, ``--verbose`` (``fit`` verbosity);
* ``--base-weights FILE``: reuse a base trained earlier (e.g. ``<old-work-dir>/base.weights.h5``):
  the SMN run gets ``base.weights=FILE`` and only its memory stages; the base's train time
  is read from ``base_seconds.json`` next to FILE (nan if absent);
* ``--base-only``: train only the base stages (the SMN run; its own end-of-run evaluation
  scores the SMN with an untrained memory and is ignored), score the two base rows, stop;
* ``--mlp-only`` (with ``--base-weights``): train and score only the MLP control (and the
  base rows), no SMN run;
* ``--mlp-unmatched``: the MLP control at the memory width instead of SMN's parameter count;
* ``--epoch-scale F``: multiply every stage's length (epochs or steps; at least 1 step);
* ``--set KEY=VALUE`` (repeatable): a config override for both runs (e.g.
  ``train.batch_size=8``, ``base.rpn_post_nms_topk_test=32``); ``--smn-set KEY=VALUE``: one
  for the SMN run only, applied to the ``digits`` preset before its stages are selected
  (e.g. ``train.stages.4.params.num_steps=3``: the N = 10 stage unrolled 3 steps);
* smoke: ``--num-train N --num-val M`` generate (once) a set of that size under
  ``<work-dir>/digits_<N>_<M>``.

Dropped with the move to the runner: ``--base-continue`` (train a loaded base more
epochs): the preset's two base stages are that 2 + 2 schedule in one run; a different base
schedule is ``--smn-set 'train.stages.1.epochs=...'``.

Measured (seed 0, pre-engine script; the base trained 2 epochs in one run, ``--base-only``,
then 2 more with ``--base-weights ... --base-continue 2``, which is the preset's 2 + 2 base
stages):

=====================  =====  =====  ===============  ===============  ==========
model                  AP     AP50   dup (>=0.05)     dup (>=0.3)      train min
=====================  =====  =====  ===============  ===============  ==========
base (NMS)             0.523  0.777  0 / 4066         0 / 1707         20.6
base (NMS, top-10)     0.517  0.765  0 / 3437         0 / 1707         (same)
base top-10, no NMS    0.285  0.388  6625 / 9872      3046 / 4568      0
SMN final (5 + 5)      0.503  0.741  859 / 3224       26 / 1653        4.6
SMN steps (N = 10)     0.509  0.762  1346 / 4170      22 / 1294        4.6
MLP control (NMS)      0.537  0.798  0 / 3622         0 / 1666         1.5
=====================  =====  =====  ===============  ===============  ==========

(duplicates / detections at that score.) The memory learns the de-duplication that NMS
does (3046 -> 22 duplicates without any NMS, AP 0.285 -> 0.509), but it does not improve
over the base with NMS, and the MLP control (same output modules on ``conv5_3``, no
memory) is best: the paper's context gain does not show at this scale.

Usage::

    python benchmarks/smn_digits.py [--work-dir runs/smn_bench]
    python benchmarks/smn_digits.py --work-dir runs/smn_mlp --base-weights runs/smn_bench/base.weights.h5 --mlp-only
    python benchmarks/smn_digits.py --work-dir /tmp/smn_smoke --num-train 32 --num-val 8 --epoch-scale 0.05 \
        --smn-set train.stages.3.params.num_steps=2 --smn-set train.stages.4.params.num_steps=2   # smoke
"""
import argparse
import json
import logging
import math
import os
import time

from kerasdet.evaluation.duplicates import count_duplicates


def scaled_stages(stages, scale):
    """Plain stage dicts with every length multiplied by ``scale`` (``steps`` at least 1;
    fractional ``epochs`` are allowed: the runner rounds them to steps, at least 1)."""
    out = []
    for stage in stages:
        stage = dict(stage)
        if scale != 1.0:
            if stage.get("steps") is not None:
                stage["steps"] = max(1, int(round(stage["steps"] * scale)))
            if stage.get("epochs") is not None:
                stage["epochs"] = stage["epochs"] * scale
        out.append(stage)
    return out


def stage_seconds(record, kind):
    """Train seconds of a run's stages of ``kind`` (``base`` / ``memory``)."""
    return sum(s.get("seconds", 0.0) for s in record["stages"] if s["kind"] == kind)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default=os.path.join("runs", "smn_bench"))
    parser.add_argument("--data-dir", default=None, help="digits data folder (default: the preset's data/digits)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=0, help="smoke: a generated set of this many train images")
    parser.add_argument("--num-val", type=int, default=32)
    parser.add_argument("--epoch-scale", type=float, default=1.0, help="multiply every stage's length (min 1 step)")
    parser.add_argument("--verbose", type=int, default=2)
    parser.add_argument("--base-weights", default=None,
                        help="a base trained earlier (base.weights.h5): the SMN run trains only its memory stages")
    parser.add_argument("--base-only", action="store_true", help="train and score the base, then stop")
    parser.add_argument("--mlp-only", action="store_true",
                        help="with --base-weights: train and score only the MLP control (no SMN run)")
    parser.add_argument("--mlp-unmatched", action="store_true",
                        help="MLP control at the memory width instead of SMN's parameter count")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for both runs (JSON value)")
    parser.add_argument("--smn-set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the SMN (digits) run only, before its stages are selected")
    args = parser.parse_args(argv)
    if args.mlp_only and not args.base_weights:
        parser.error("--mlp-only needs --base-weights (the base the MLP control trains on)")
    if args.base_only and (args.mlp_only or args.base_weights):
        parser.error("--base-only trains the base: not with --base-weights or --mlp-only")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")  # runner progress

    from kerasdet.engine import builders
    from kerasdet.engine.config import parse_overrides
    from kerasdet.engine.recipes import load_recipe
    from kerasdet.engine.runner import load_run, run, val_source_of_run
    from kerasdet.models.smn import inference_parameters, matched_mlp_channels
    from kerasdet.recipes.smn import build_base

    os.makedirs(args.work_dir, exist_ok=True)
    recipe = load_recipe("smn")
    common = {"export.enabled": False}
    data_dir = args.data_dir
    if args.num_train:
        common.update({"data.generate.num_train": args.num_train, "data.generate.num_val": args.num_val})
        data_dir = os.path.join(args.work_dir, f"digits_{args.num_train}_{args.num_val}")
    common.update(parse_overrides(args.set))
    smn_dir, mlp_dir = os.path.join(args.work_dir, "smn"), os.path.join(args.work_dir, "mlp")
    t_start = time.time()
    results = {"seed": args.seed, "runs": {}}
    scoring = {}  # the validation split, shared by every row

    def evaluate(name, model, config, record, train_seconds, **extra):
        if not scoring:
            source = val_source_of_run(config, record)
            scoring.update(source=source, dataset=builders.build_dataset(config, source, training=False))
        t = time.time()
        path = os.path.join(args.work_dir, f"{name.replace(' ', '_')}_results.json")
        stats = builders.evaluate(model, scoring["dataset"], scoring["source"], metric="coco", results_file=path)
        with open(path) as f:
            dets = json.load(f)
        row = {"AP": stats["AP"], "AP50": stats["AP50"], "AP75": stats["AP75"], "train_seconds": train_seconds,
               "eval_seconds": time.time() - t, **count_duplicates(dets), **extra}
        results["runs"][name] = row
        with open(os.path.join(args.work_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(name, json.dumps(row), flush=True)

    def score_base(base, config, record, base_path, base_seconds):
        evaluate("base (NMS)", base, config, record, base_seconds, params=base.count_params())
        top = int(config.model["num_steps"])  # the paper's "Baseline" at N: a base built to keep N detections
        top_config = recipe.config_from_dict(record["config"], {"base.max_detections": top, "base.weights": base_path})
        evaluate(f"base (NMS, top-{top})", build_base(top_config, record["num_classes"]), config, record, base_seconds)
        return top

    # --- 1. the SMN run: base stages + memory stages (or a subset) ---------------------------
    smn_overrides = {**common, **parse_overrides(args.smn_set)}
    if args.base_weights:
        smn_overrides["base.weights"] = os.path.abspath(args.base_weights)
    preset_stages = [s for s in recipe.config("digits", smn_overrides).to_dict()["train"]["stages"]]
    if args.base_weights:
        kinds = ("memory",)
    elif args.base_only:
        kinds = ("base",)
    else:
        kinds = ("base", "memory")
    smn_stages = scaled_stages([s for s in preset_stages if s["kind"] in kinds], args.epoch_scale)

    if args.base_weights:
        base_path = os.path.abspath(args.base_weights)
        seconds_file = os.path.join(os.path.dirname(base_path), "base_seconds.json")
        base_seconds = float("nan")
        if os.path.isfile(seconds_file):
            with open(seconds_file) as f:
                base_seconds = json.load(f)["train_seconds"]
    else:
        base_path = os.path.abspath(os.path.join(args.work_dir, "base.weights.h5"))

    smn = smn_record = None
    if not args.mlp_only:
        config = recipe.config("digits", {**smn_overrides, "train.stages": smn_stages})
        run(recipe, config, preset="digits", work_dir=smn_dir, data_dir=data_dir, seed=args.seed,
            verbose=args.verbose)
        _, config, smn, smn_record = load_run(smn_dir)
        base = smn.base
        if not args.base_weights:  # the base this run trained, for the MLP control (and later runs)
            base.save_weights(base_path)
            base_seconds = stage_seconds(smn_record, "base")
            with open(os.path.join(args.work_dir, "base_seconds.json"), "w") as f:
                json.dump({"train_seconds": base_seconds, "run": os.path.abspath(smn_dir)}, f)
        top = score_base(base, config, smn_record, base_path, base_seconds)
        if args.base_only:
            return _report(results, args, t_start)
        smn_seconds = stage_seconds(smn_record, "memory")
        smn_params = smn.count_params() - base.count_params()
        smn.configure(inference="base_topn", num_steps=top)
        evaluate("base top-N (no NMS)", smn, config, smn_record, 0.0)
        smn.configure(inference="final")
        evaluate("SMN final", smn, config, smn_record, smn_seconds, memory_params=smn_params)
        smn.configure(inference="steps", num_steps=top)
        evaluate("SMN steps", smn, config, smn_record, smn_seconds, memory_params=smn_params)

    # --- 2. the MLP control: digits_mlp with the trained base, only its mlp stage ------------
    mlp_overrides = {**common, "base.weights": base_path}
    mlp_preset = recipe.config("digits_mlp", mlp_overrides)
    mlp_stages = scaled_stages([s for s in mlp_preset.to_dict()["train"]["stages"] if s["kind"] == "memory"],
                               args.epoch_scale)
    if not args.mlp_unmatched:
        shape = (None, *mlp_preset.input.image_size, 3)
        if smn is not None:
            base, num_classes = smn.base, smn_record["num_classes"]
        else:  # --mlp-only: the classes of the data set, the base as given
            num_classes = builders.build_source(mlp_preset, "train", data_dir=data_dir).num_classes
            base = build_base(mlp_preset, num_classes)
        smn_args = dict(recipe.config("digits", smn_overrides).model)
        channels, smn_params, mlp_params = matched_mlp_channels(
            base, shape, weight_decay=mlp_preset.train.weight_decay, **smn_args)
        mlp_overrides["model.mlp_channels"] = channels
        print(f"MLP control: context width {channels}: {mlp_params:,} inference parameters vs SMN's {smn_params:,}")
    else:
        print("MLP control at the memory width (not matched)")
    config = recipe.config("digits_mlp", {**mlp_overrides, "train.stages": mlp_stages})
    run(recipe, config, preset="digits_mlp", work_dir=mlp_dir, data_dir=data_dir, seed=args.seed,
        verbose=args.verbose)
    _, config, mlp, mlp_record = load_run(mlp_dir)
    if smn is None:  # --mlp-only: the base rows from the MLP run's (frozen, as given) base
        score_base(mlp.base, config, mlp_record, base_path, base_seconds)
    evaluate("MLP control", mlp, config, mlp_record, stage_seconds(mlp_record, "memory"),
             memory_params=inference_parameters(mlp))
    return _report(results, args, t_start)


def _report(results, args, t_start):
    results["total_seconds"] = time.time() - t_start
    with open(os.path.join(args.work_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("\n| model | AP | AP50 | dup (score>=0.05) | dets (>=0.05) | dup (>=0.3) | train min |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results["runs"].items():
        minutes = r["train_seconds"] / 60 if math.isfinite(r["train_seconds"]) else float("nan")
        print(f"| {name} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['dup@0.05']} | {r['dets@0.05']} | {r['dup@0.3']} | "
              f"{minutes:.1f} |")
    print(f"\ntotal {results['total_seconds'] / 60:.1f} min; JSON: {os.path.join(args.work_dir, 'results.json')}")
    return results


if __name__ == "__main__":
    main()
