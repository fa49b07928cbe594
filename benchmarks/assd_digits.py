"""SSD vs ASSD on the embedded digits set under the same budget (issue: seed 002).

Trains the ``ssd_digits`` and ``assd_digits`` presets of ``recipes/assd.py`` one after the
other through the shared CLI (same data, seed, epochs, optimizer: the presets differ only in
``attention``/``fusion``), scores each with pycocotools on the validation split and prints
AP / AP50 / AP75, parameters and wall time as a table.

Usage: ``python benchmarks/assd_digits.py [--epochs 12] [--work-dir runs/assd_bench] [--presets ...]``
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(preset, epochs, work_dir, data_dir, seed):
    out = os.path.join(work_dir, preset)
    cmd = [
        sys.executable, os.path.join(ROOT, "recipes", "assd.py"), "--preset", preset, "--epochs", str(epochs),
        "--work-dir", out, "--export-dir", os.path.join(out, "saved_model"), "--seed", str(seed), "--verbose", "2", "--no-export",
    ]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    t = time.time()
    subprocess.run(cmd, check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    summary["wall_seconds"] = time.time() - t
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--work-dir", default=os.path.join("runs", "assd_bench"))
    parser.add_argument("--data-dir", default=None, help="digits data folder (default: the preset's data/digits)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--presets", nargs="+", default=["ssd_digits", "assd_digits"])
    args = parser.parse_args()
    rows = [(p, run(p, args.epochs, args.work_dir, args.data_dir, args.seed)) for p in args.presets]
    print(f"\n| preset | epochs | AP | AP50 | AP75 | train min | wall min |")
    print("|---|---|---|---|---|---|---|")
    for preset, s in rows:
        st = s["stats"]
        print(f"| {preset} | {args.epochs} | {st['AP']:.3f} | {st['AP50']:.3f} | {st['AP75']:.3f} | "
              f"{s['train_seconds'] / 60:.1f} | {s['wall_seconds'] / 60:.1f} |")
    with open(os.path.join(args.work_dir, "results.json"), "w") as f:
        json.dump({p: s for p, s in rows}, f, indent=2)


if __name__ == "__main__":
    main()
