"""R-FCN vs CoupleNet vs Attention CoupleNet on the embedded digits set under one budget (seed 004).

Trains the ``rfcn_digits``, ``couplenet_digits`` and ``acouplenet_digits`` presets of
``recipes/couplenet.py`` one after the other, each as a subprocess of the recipe's command
line (``python recipes/couplenet.py --preset P --epochs E --work-dir <work-dir>/<run>
--no-export [--set ...]``, i.e. ``kerasdet train``: the runner; same data, seed, epochs,
optimizer and schedule: the presets differ only in the global branch and the attention
blocks), reads each run's ``run.json`` (the runner's pycocotools evaluation of the
validation split, train time) and prints AP / AP50 / AP75 and train / wall time as a table. ``--ablation``
adds the coupling ablation of the paper's Table I: ``couplenet_digits`` with
``coupling_norm`` in {none, l2, conv} x ``coupling_op`` in {sum, product, max} (the
conv + sum cell is the ``couplenet_digits`` run itself, so 8 more runs).

``--num-train N --num-val M`` generate (once) a smaller digits set under
``<work-dir>/digits_<N>_<M>`` for a smoke run; by default the presets' own 4000/500 set is
used. Results go to ``<work-dir>/results.json`` (one entry per run: its ``run.json`` record
with the preset, overrides and wall seconds added).

Usage::

    python benchmarks/couplenet_digits.py [--epochs 4] [--ablation] [--work-dir runs/couplenet_bench]
    python benchmarks/couplenet_digits.py --epochs 1 --num-train 64 --num-val 32   # smoke
"""
import argparse
import json
import os
import subprocess
import sys
import time

from kerasdet.engine.runner import read_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("rfcn_digits", "couplenet_digits", "acouplenet_digits")
NORMS = ("none", "l2", "conv")
OPS = ("sum", "product", "max")


def run(name, preset, overrides, args):
    out = os.path.join(args.work_dir, name)
    cmd = [
        sys.executable, os.path.join(ROOT, "recipes", "couplenet.py"), "--preset", preset,
        "--epochs", str(args.epochs), "--work-dir", out, "--seed", str(args.seed), "--verbose", "2", "--no-export",
    ]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
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
    summary.update(preset=preset, overrides=overrides, wall_seconds=time.time() - t)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--work-dir", default=os.path.join("runs", "couplenet_bench"))
    parser.add_argument("--data-dir", default=None, help="digits data folder (default: the presets' data/digits)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=list(MODELS), help=f"subset of {MODELS}")
    parser.add_argument("--ablation", action="store_true", help="also the 3 x 3 coupling norm x op ablation")
    parser.add_argument("--num-train", type=int, default=0, help="smoke: a generated set of this many train images")
    parser.add_argument("--num-val", type=int, default=32, help="smoke: validation images of that set")
    parser.add_argument("--batch-size", type=int, default=0, help="smoke: override train.batch_size (with --num-train)")
    args = parser.parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)

    jobs = [(m.replace("_digits", ""), m, {}) for m in args.models]
    if args.ablation:
        for norm in NORMS:
            for op in OPS:
                if (norm, op) == ("conv", "sum") and "couplenet_digits" in args.models:
                    continue  # the couplenet_digits run itself
                jobs.append((f"couple_{norm}_{op}", "couplenet_digits",
                             {"model.coupling_norm": norm, "model.coupling_op": op}))
    results = {}
    for name, preset, overrides in jobs:
        results[name] = run(name, preset, overrides, args)
        with open(os.path.join(args.work_dir, "results.json"), "w") as f:
            json.dump({"epochs": args.epochs, "seed": args.seed, "runs": results}, f, indent=2)

    print(f"\n| run | preset | coupling | epochs | AP | AP50 | AP75 | train min | wall min |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s in results.items():
        st = s["stats"]
        ov = s["overrides"]
        coupling = "-" if name == "rfcn" else f"{ov.get('model.coupling_norm', 'conv')}+{ov.get('model.coupling_op', 'sum')}"
        print(f"| {name} | {s['preset']} | {coupling} | {args.epochs} | {st['AP']:.3f} | {st['AP50']:.3f} | "
              f"{st['AP75']:.3f} | {s['times']['train_seconds'] / 60:.1f} | {s['wall_seconds'] / 60:.1f} |")
    print(f"\nJSON: {os.path.join(args.work_dir, 'results.json')}")
    return results


if __name__ == "__main__":
    main()
