"""Fine-tuned vs from-scratch RetinaNet on a small digits subset, at the same budget.

Through the runner (:func:`kerasdet.engine.runner.run`, the code of ``kerasdet train``),
the ``retinanet`` recipe's ``digits`` preset architecture:

1. **pretrain**: one run on generated images holding only the digits 0-6
   (``data.generate.classes``), ``--pretrain-images`` images, ``--pretrain-epochs`` epochs;
2. **target**: ``--target-images`` (200) training images holding only the digits 7, 8, 9
   and a held-out validation set of ``--val-images`` images of the same classes (other
   generator seeds: no image in common with the pretraining set);
3. for each seed in ``--seeds``, two runs on the target set with the same budget
   (``--epochs``, optimizer, schedule, data order):

   * ``scratch``: random initialization;
   * ``finetune``: ``--set model.weights=<pretrain run folder>``: every weight but the
     classification output (10 -> 3 classes: re-initialized with the prior bias) from
     the pretraining run (:func:`kerasdet.weights.load_detector_weights`).

Scores: pycocotools AP and AP50 on the target validation set (the runner's final
evaluation). Prints mean +- std per arm and writes every figure to
``benchmarks/results/finetune_digits/results.json``.

Usage (about 25 min on 2 cores with the defaults)::

    PYTHONPATH=$PWD python benchmarks/finetune_digits.py
"""
import argparse
import json
import os
import statistics
import time
from machine import cpu_flags  # noqa: E402  (benchmarks/, the script's folder, is on the path)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def digits_overrides(data_dir, classes, num_train, num_val, seed):
    return {"data.dir": data_dir,
            "data.generate": {"num_train": num_train, "num_val": num_val, "image_size": [128, 128],
                              "seed": seed, "classes": list(classes)}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default="runs/finetune_digits")
    parser.add_argument("--pretrain-images", type=int, default=1500)
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--target-images", type=int, default=200)
    parser.add_argument("--val-images", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/results/finetune_digits/results.json")
    args = parser.parse_args()

    import tensorflow as tf

    from kerasdet.engine.recipes import load_recipe
    from kerasdet.engine.runner import run

    recipe = load_recipe("retinanet")
    common = {"export.enabled": False, "eval.every_n_epochs": 1000}
    t0 = time.time()
    pre_dir = os.path.join(args.work_dir, "pretrain")
    if not os.path.isfile(os.path.join(pre_dir, "run.json")):
        over = {**common, **digits_overrides(os.path.join(args.work_dir, "data_0to6"), range(7),
                                             args.pretrain_images, 200, 100),
                "train.epochs": args.pretrain_epochs, "train.warmup_steps": 100}
        run(recipe, recipe.config("digits", over), preset="digits", work_dir=pre_dir, seed=0, verbose=2)
    with open(os.path.join(pre_dir, "run.json")) as f:
        pre = json.load(f)
    t_pre = time.time() - t0

    target = digits_overrides(os.path.join(args.work_dir, "data_7to9"), (7, 8, 9), args.target_images,
                              args.val_images, 200)
    rows = []
    for seed in args.seeds:
        for arm in ("scratch", "finetune"):
            over = {**common, **target, "train.epochs": args.epochs, "train.warmup_steps": args.warmup_steps}
            if arm == "finetune":
                over["model.weights"] = os.path.abspath(pre_dir)
            t = time.time()
            summary = run(recipe, recipe.config("digits", over), preset="digits",
                          work_dir=os.path.join(args.work_dir, f"{arm}_seed{seed}"), seed=seed, verbose=0)
            rows.append({"arm": arm, "seed": seed, "AP": summary["stats"]["AP"], "AP50": summary["stats"]["AP50"],
                         "train_seconds": summary["times"]["train_seconds"], "wall_seconds": time.time() - t})
            print(json.dumps(rows[-1]), flush=True)

    table = {}
    for arm in ("scratch", "finetune"):
        sel = [r for r in rows if r["arm"] == arm]
        table[arm] = {k: {"mean": statistics.mean(r[k] for r in sel),
                          "std": statistics.stdev(r[k] for r in sel) if len(sel) > 1 else 0.0}
                      for k in ("AP", "AP50")}
    print(f"\npretrain: digits 0-6, {args.pretrain_images} images x {args.pretrain_epochs} epochs "
          f"(AP on its own val {pre['stats']['AP']:.3f}), {t_pre / 60:.1f} min")
    print(f"target: digits 7-9, {args.target_images} train / {args.val_images} val images, {args.epochs} epochs, "
          f"seeds {args.seeds}")
    print(f"{'arm':10s} {'AP':>15s} {'AP50':>15s}")
    for arm, s in table.items():
        print(f"{arm:10s} {s['AP']['mean']:7.3f} +- {s['AP']['std']:.3f} {s['AP50']['mean']:7.3f} +- "
              f"{s['AP50']['std']:.3f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    result = {"args": vars(args), "rows": rows, "table": table, "pretrain_stats": pre["stats"],
              "pretrain_seconds": t_pre, "total_seconds": time.time() - t0, "cpu_flags": cpu_flags(),
              "cpus": os.cpu_count(), "tensorflow": tf.__version__}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"written {args.out}; total {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
