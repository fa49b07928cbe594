"""Base Faster R-CNN vs the MLP control vs SMN on the embedded digits set under one budget (seed 000).

One process, one data set, one seed (``recipes/smn.py``'s ``digits`` preset):

1. the C4 base Faster R-CNN is trained once (the preset's base stage);
2. SMN trains on the frozen base with the curriculum N = 2 -> 5 -> 10 (the preset's
   memory stages: 100 + 75 + 50 steps);
3. the MLP control (``context="mlp"``: the same context net on ``conv5_3``, the same output
   modules, no memory) trains on the same frozen base for the same number of memory
   steps (225) and images, with the same optimizer and learning rate.

Each is scored with pycocotools on the validation split (AP, AP50), and the *duplicate
detections* are counted: a detection is a duplicate when a higher-scored detection of the
same class in the same image overlaps it with IoU > 0.5 (counted among detections with
score >= 0.05 and >= 0.3). Rows:

* ``base (NMS)``: the base's own per-class NMS (0.5) output (up to 100 detections);
* ``base (NMS, top-10)``: the same, at most N = 10 detections (the paper's "Baseline" at N);
* ``base top-N (no NMS)``: the top N = 10 RoIs by base score, no NMS (what the greedy
  selection outputs without memory: the control for "SMN replaces NMS");
* ``MLP control``: base + MLP residual logits, per-class NMS;
* ``SMN final``: N1 = 5 base (NMS) detections written, then N2 = 5 memory steps, no NMS on
  the memory steps (spec §3 final mode);
* ``SMN steps``: N = 10 memory steps from the start, no NMS anywhere (ablation mode).

Results go to ``<work-dir>/results.json``.

Measured (seed 0; the base trained 2 epochs in one run, ``--base-only``, then 2 more with
``--base-weights ... --base-continue 2``, which is the preset's 2 + 2 base stages):

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
    python benchmarks/smn_digits.py --num-train 64 --num-val 16 --epoch-scale 0.25   # smoke
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "recipes"))


def count_duplicates(results, *, iou_threshold=0.5, score_thresholds=(0.05, 0.3)):
    """Duplicates in a COCO results list (``image_id, category_id, bbox xywh, score``):
    detections with a higher-scored same-class detection of IoU > ``iou_threshold`` in the
    same image. Returns ``{threshold: count}`` (and the detection counts)."""
    import numpy as np

    by_key = {}
    for r in results:
        by_key.setdefault((r["image_id"], r["category_id"]), []).append(r)
    out = {}
    for thr in score_thresholds:
        dups = total = 0
        for dets in by_key.values():
            dets = sorted((d for d in dets if d["score"] >= thr), key=lambda d: -d["score"])
            total += len(dets)
            if len(dets) < 2:
                continue
            b = np.array([d["bbox"] for d in dets], dtype=np.float64)
            x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
            iw = np.maximum(0, np.minimum(x2[:, None], x2[None]) - np.maximum(x1[:, None], x1[None]))
            ih = np.maximum(0, np.minimum(y2[:, None], y2[None]) - np.maximum(y1[:, None], y1[None]))
            inter = iw * ih
            area = b[:, 2] * b[:, 3]
            iou = inter / np.maximum(area[:, None] + area[None] - inter, 1e-9)
            higher = np.triu(iou > iou_threshold, 1)  # [i, j]: i scores higher than j
            dups += int(higher.any(axis=0).sum())
        out[f"dup@{thr}"] = dups
        out[f"dets@{thr}"] = total
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default=os.path.join("runs", "smn_bench"))
    parser.add_argument("--data-dir", default=None, help="digits data folder (default: the preset's data/digits)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=0, help="smoke: a generated set of this many train images")
    parser.add_argument("--num-val", type=int, default=32)
    parser.add_argument("--epoch-scale", type=float, default=1.0, help="multiply every stage's steps (min 1 step)")
    parser.add_argument("--verbose", type=int, default=2)
    parser.add_argument("--base-weights", default=None, help="load a base trained by an earlier run (skips its stage)")
    parser.add_argument("--base-only", action="store_true", help="train and evaluate the base, then stop")
    parser.add_argument("--mlp-only", action="store_true",
                        help="with --base-weights: train and evaluate only the MLP control (skips SMN)")
    parser.add_argument("--mlp-unmatched", action="store_true",
                        help="MLP control at the memory width instead of SMN's parameter count")
    parser.add_argument("--base-continue", type=float, default=0.0, metavar="EPOCHS",
                        help="with --base-weights: train the loaded base this many more epochs (lr 1e-3, x0.1 at 75%%)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    import smn as recipe
    from kerasdet.cli import get_config, make_datasets, prepare_sources
    from kerasdet.evaluation.callback import evaluate_model
    from kerasdet.models.smn import SMN, inference_parameters, matched_mlp_channels

    os.makedirs(args.work_dir, exist_ok=True)
    config = get_config(recipe, "digits")
    data_dir = args.data_dir
    if args.num_train:
        config["data"]["generate"].update(num_train=args.num_train, num_val=args.num_val)
        data_dir = os.path.join(args.work_dir, f"digits_{args.num_train}_{args.num_val}")
    t_start = time.time()
    train_source, val_source = prepare_sources(config, data_dir)
    train_ds, val_ds = make_datasets(config, train_source, val_source, seed=args.seed, repeat=True)
    steps_per_epoch = len(train_source) // config["train"]["batch_size"]

    def run_stages(model, stages):
        seconds = 0.0
        for stage in stages:
            _, sec = recipe.fit_stage(model, config, stage, train_ds, steps_per_epoch, verbose=args.verbose,
                                      scale=args.epoch_scale)
            seconds += sec
        return seconds

    results = {"seed": args.seed, "steps_per_epoch": steps_per_epoch, "runs": {}}

    def evaluate(name, model, train_seconds, **extra):
        t = time.time()
        path = os.path.join(args.work_dir, f"{name.replace(' ', '_')}_results.json")
        stats = evaluate_model(model, val_ds, val_source.annotation_file, category_ids=val_source.category_ids,
                               results_file=path)
        with open(path) as f:
            dets = json.load(f)
        row = {"AP": stats["AP"], "AP50": stats["AP50"], "AP75": stats["AP75"], "train_seconds": train_seconds,
               "eval_seconds": time.time() - t, **count_duplicates(dets), **extra}
        results["runs"][name] = row
        with open(os.path.join(args.work_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(name, json.dumps(row), flush=True)

    size = config["input"]["image_size"]
    keras.utils.set_random_seed(args.seed)
    base = recipe.build_base(config, train_source.num_classes)
    base.build((None, size[0], size[1], 3))
    base_stages = [s for s in config["stages"] if s["kind"] == "base"]
    if args.base_weights:
        base.load_weights(args.base_weights)
        with open(os.path.join(os.path.dirname(args.base_weights), "base_seconds.json")) as f:
            base_seconds = json.load(f)["train_seconds"]
        if args.base_continue:
            stage = {"kind": "base", "epochs": args.base_continue, "lr": 1e-3, "decay_at": (0.75,), "warmup_steps": 0}
            base_seconds += run_stages(base, [stage])
            base.save_weights(os.path.join(args.work_dir, "base.weights.h5"))
            with open(os.path.join(args.work_dir, "base_seconds.json"), "w") as f:
                json.dump({"train_seconds": base_seconds, "continued_epochs": args.base_continue}, f)
    else:
        base_seconds = run_stages(base, base_stages)
        base.save_weights(os.path.join(args.work_dir, "base.weights.h5"))
        with open(os.path.join(args.work_dir, "base_seconds.json"), "w") as f:
            json.dump({"train_seconds": base_seconds}, f)
    evaluate("base (NMS)", base, base_seconds, params=base.count_params())
    top = config["model"]["num_steps"]
    base.max_detections, base.predict_function = top, None
    evaluate(f"base (NMS, top-{top})", base, base_seconds)  # the paper's "Baseline" at N
    base.max_detections, base.predict_function = config["base"].get("max_detections", 100), None
    if args.base_only:
        return results

    model_args = dict(config["model"])
    mem_stages = [s for s in config["stages"] if s["kind"] == "memory"]
    keras.utils.set_random_seed(args.seed + 1)
    if not args.mlp_only:
        smn = SMN(base=base, weight_decay=config["train"]["weight_decay"], **model_args)
        smn.build((None, size[0], size[1], 3))
        smn_params = smn.count_params() - base.count_params()
        smn.configure(inference="base_topn", num_steps=10)
        evaluate("base top-N (no NMS)", smn, 0.0)
        smn_seconds = run_stages(smn, mem_stages)
        smn.save_weights(os.path.join(args.work_dir, "smn.weights.h5"))
        smn.configure(inference="final")
        evaluate("SMN final", smn, smn_seconds, memory_params=smn_params)
        smn.configure(inference="steps", num_steps=10)
        evaluate("SMN steps", smn, smn_seconds, memory_params=smn_params)

    keras.utils.set_random_seed(args.seed + 1)
    shape = (None, size[0], size[1], 3)
    channels, smn_params, mlp_params = (None, None, None) if args.mlp_unmatched else matched_mlp_channels(
        base, shape, weight_decay=config["train"]["weight_decay"], **model_args)
    print(f"MLP control: context width {channels}: {mlp_params:,} inference parameters vs SMN's {smn_params:,}"
          if channels else "MLP control at the memory width (not matched)")
    keras.utils.set_random_seed(args.seed + 1)
    mlp = SMN(base=base, weight_decay=config["train"]["weight_decay"],
              **dict(model_args, context="mlp", mlp_channels=channels))
    mlp.build(shape)
    mlp_seconds = run_stages(mlp, config["mlp_stages"])
    mlp.save_weights(os.path.join(args.work_dir, "mlp.weights.h5"))
    evaluate("MLP control", mlp, mlp_seconds, memory_params=inference_parameters(mlp))

    results["total_seconds"] = time.time() - t_start
    with open(os.path.join(args.work_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("\n| model | AP | AP50 | dup (score>=0.05) | dets (>=0.05) | dup (>=0.3) | train min |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results["runs"].items():
        print(f"| {name} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['dup@0.05']} | {r['dets@0.05']} | {r['dup@0.3']} | "
              f"{r['train_seconds'] / 60:.1f} |")
    print(f"\ntotal {results['total_seconds'] / 60:.1f} min; JSON: {os.path.join(args.work_dir, 'results.json')}")
    return results


if __name__ == "__main__":
    main()
