"""SSD vs ASSD on the embedded digits set under the same budget (issue: seed 002).

Trains the ``ssd_digits`` and ``assd_digits`` presets of the ``assd`` recipe one after the
other, each as a subprocess of the recipe's command line (``python recipes/assd.py --preset
P --epochs E --work-dir <work-dir>/<preset> --no-export``, i.e. ``kerasdet train``: the
runner; same data, seed, epochs, optimizer: the presets differ only in
``attention``/``fusion``), reads each run's ``run.json`` (pycocotools stats of the
validation split, train time) and prints AP / AP50 / AP75 and train / wall time as a table;
``<work-dir>/results.json`` holds the run records.

Flags: ``--epochs`` (``train.epochs``), ``--work-dir``, ``--data-dir`` (the digits folder),
``--seed``, ``--presets``; smoke: ``--num-train N --num-val M`` generate (once) a smaller
set under ``<work-dir>/digits_<N>_<M>``, ``--batch-size`` overrides ``train.batch_size``
(and drops the warm-up) with it.

Usage::

    python benchmarks/assd_digits.py [--epochs 12] [--work-dir runs/assd_bench] [--presets ...]
    python benchmarks/assd_digits.py --epochs 1 --num-train 32 --num-val 8 --batch-size 8   # smoke
"""
import argparse
import json
import os
import subprocess
import sys
import time

from kerasdet.engine.runner import read_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(preset, args):
    out = os.path.join(args.work_dir, preset)
    cmd = [
        sys.executable, os.path.join(ROOT, "recipes", "assd.py"), "--preset", preset, "--epochs", str(args.epochs),
        "--work-dir", out, "--seed", str(args.seed), "--verbose", "2", "--no-export",
    ]
    if args.num_train:
        cmd += ["--data-dir", os.path.join(args.work_dir, f"digits_{args.num_train}_{args.num_val}"),
                "--set", f"data.generate.num_train={args.num_train}", "--set", f"data.generate.num_val={args.num_val}"]
        if args.batch_size:
            cmd += ["--set", f"train.batch_size={args.batch_size}", "--set", "train.warmup_steps=0"]
    elif args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    t = time.time()
    subprocess.run(cmd, check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    summary = read_run(out)  # the run.json the runner wrote
    summary["wall_seconds"] = time.time() - t
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--work-dir", default=os.path.join("runs", "assd_bench"))
    parser.add_argument("--data-dir", default=None, help="digits data folder (default: the preset's data/digits)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--presets", nargs="+", default=["ssd_digits", "assd_digits"])
    parser.add_argument("--num-train", type=int, default=0, help="smoke: a generated set of this many train images")
    parser.add_argument("--num-val", type=int, default=32, help="smoke: validation images of that set")
    parser.add_argument("--batch-size", type=int, default=0, help="smoke: override train.batch_size (with --num-train)")
    args = parser.parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    rows = [(p, run(p, args)) for p in args.presets]
    print(f"\n| preset | epochs | AP | AP50 | AP75 | train min | wall min |")
    print("|---|---|---|---|---|---|---|")
    for preset, s in rows:
        st = s["stats"]
        print(f"| {preset} | {args.epochs} | {st['AP']:.3f} | {st['AP50']:.3f} | {st['AP75']:.3f} | "
              f"{s['times']['train_seconds'] / 60:.1f} | {s['wall_seconds'] / 60:.1f} |")
    with open(os.path.join(args.work_dir, "results.json"), "w") as f:
        json.dump({p: s for p, s in rows}, f, indent=2)
    return dict(rows)


if __name__ == "__main__":
    main()
