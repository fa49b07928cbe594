"""Segment and box proposals on the digits: DeepMask, SharpMask, FPN mask proposals and the RPN
of the two-stage detector, one run, same data and budget (T.-Y. Lin, "Detecting Common
Objects in Context", Cornell 2017 thesis: Table 3.3 / Fig. 3.6 for DeepMask and SharpMask,
Table 4.6 for the FPN mask proposals, Table 4.1 for the FPN RPN).

Every model trains through the runner (:func:`kerasdet.engine.runner.run`, the code of
``kerasdet train``) on the same generated digits set:

* ``deepmask``: ``sharpmask`` recipe, ``deepmask_digits`` preset;
* ``sharpmask``: ``sharpmask_digits`` (its ``--steps`` split between the DeepMask and the
  refinement stage in the preset's 600 : 400 proportion);
* ``fpn_proposals``: ``fpn_proposals`` recipe, ``fpn_proposals_digits`` preset;
* ``rpn``: ``faster_rcnn_fpn`` recipe, ``digits`` preset (the whole two-stage detector
  trains; its RPN proposals are scored, boxes only).

Budget: ``--steps`` optimizer steps of ``--batch-size`` images each (DeepMask / SharpMask
cut patches out of those images), each preset's optimizer and schedule otherwise. Every
model returns up to 1000 proposals per image at evaluation (``model.num_proposals=1000``;
the RPN: ``model.rpn_post_nms_topk_test=1000``).

Scores: :class:`~kerasdet.evaluation.proposal_recall.ProposalRecallEvaluator` (pycocotools,
class-agnostic) on the validation split: box AR (all four) and segment AR (the three mask
models) at 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000 proposals, AR^S/M/L at 1000 (the digits
are all COCO-"small", so M/L are -1). Inference time: seconds per image of the compiled
predict function over the validation split at ``--eval-batch`` images a batch, after one
warm-up batch. Writes ``--output`` (JSON) and a PNG of AR vs number of proposals next to it.

Full run (measured 2026-12-01 on 2 cores loaded by other jobs: about 1.5 h, most of it the
runner's and this script's scorings of SharpMask's 1000 refined windows per image, 2 s per
image; ``--reuse-runs`` scores finished runs of the same config instead of retraining them;
the JSON is rewritten after every model)::

    PYTHONPATH=$PWD python benchmarks/proposals_digits.py [--reuse-runs]

Smoke run (a few steps on a tiny set under /tmp, tiny networks)::

    PYTHONPATH=$PWD python benchmarks/proposals_digits.py --tiny --steps 2 --num-train 16 --num-val 4 \\
        --image-size 64 --work-dir /tmp/pbench/runs --data-dir /tmp/pbench/data \\
        --output /tmp/pbench/proposals_digits.json
"""
import argparse
import json
import os
import sys
import time

from machine import cpu_flags_text  # noqa: E402  (benchmarks/, the script's folder, is on the path)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CURVE = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
MODELS = {  # name: (recipe, preset, masks)
    "deepmask": ("sharpmask", "deepmask_digits", True),
    "sharpmask": ("sharpmask", "sharpmask_digits", True),
    "fpn_proposals": ("fpn_proposals", "fpn_proposals_digits", True),
    "rpn": ("faster_rcnn_fpn", "digits", False),
}
# --tiny: the runner test's tiny networks (tests/engine/test_runner.py), for a smoke run only
TINY_SMALL = {"backbone.widths": [8, 16, 16, 16], "backbone.blocks": [0, 0, 0, 0]}
TINY = {
    "deepmask": {"backbone.widths": [8, 8, 8, 8], "model.patch_size": 32, "model.features": 4,
                 "model.embedding": 8, "model.mask_size": 8, "model.score_hidden": 8, "model.skip_hidden": 4,
                 "model.scales": [1.0], "patches.patches_per_image": 2},
    "fpn_proposals": {**TINY_SMALL, "model.fpn_channels": 8, "model.hidden": 8, "model.samples_per_image": 16},
    "rpn": {**TINY_SMALL, "model.fpn_channels": 16, "model.rpn_channels": 8, "model.fc_dim": 16,
            "model.num_rois": 16, "model.rpn_post_nms_topk_train": 32},
}
TINY["sharpmask"] = TINY["deepmask"]


def overrides(name, args):
    """The runner overrides of one model: the shared data, the budget, 1000 proposals."""
    size = [args.image_size, args.image_size]
    out = {"data.dir": args.data_dir,
           "data.generate": {"num_train": args.num_train, "num_val": args.num_val, "image_size": size,
                             "seed": args.data_seed},
           "input.image_size": size, "train.batch_size": args.batch_size, "eval.batch_size": args.eval_batch,
           "export.enabled": False}
    if name == "rpn":
        out.update({"train.steps": args.steps, "model.rpn_post_nms_topk_test": 1000})
    elif name == "sharpmask":
        first = max(1, round(0.6 * args.steps))
        out.update({"train.stages.0.steps": first, "train.stages.1.steps": max(1, args.steps - first),
                    "model.num_proposals": 1000})
    else:
        out.update({"train.stages.0.steps": args.steps, "model.num_proposals": 1000})
    if args.tiny:
        out.update(TINY[name])
        out.update({"train.warmup_steps": 0} if name == "rpn" else {"train.stages.0.warmup_steps": 0})
    return out


def rpn_predict(model):
    """The two-stage detector's RPN proposals (boxes only, objectness scores, class 0)."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def predict(images):
        images = tf.cast(images, tf.float32)
        shape = tf.shape(images)
        feats = model.features(images, training=False)
        logits, deltas, anchors = model.rpn(feats)
        boxes, scores, valid = model.proposals(logits, deltas, anchors, (shape[1], shape[2]), training=False)
        return {"boxes": boxes, "scores": scores, "classes": tf.where(valid, 0, -1),
                "num_detections": tf.reduce_sum(tf.cast(valid, tf.int32), axis=1)}

    return predict


def score(name, work_dir, args):
    """AR at :data:`CURVE` and seconds per image of one trained run."""
    import tensorflow as tf

    from kerasdet.engine import builders
    from kerasdet.engine.runner import load_run, val_source_of_run
    from kerasdet.evaluation.proposal_recall import ProposalRecallEvaluator

    _, config, model, record = load_run(work_dir)
    masks = MODELS[name][2]
    source = val_source_of_run(config, record)
    dataset = builders.build_dataset(config, source, training=False)
    predict = rpn_predict(model) if name == "rpn" else tf.function(model.predict_step, reduce_retracing=True)
    evaluator = ProposalRecallEvaluator(source, iou_type=("bbox", "segm") if masks else "bbox", max_dets=CURVE)
    batches = list(dataset)
    predict(batches[0][0])  # warm-up: tracing and the first run
    seconds, images = 0.0, 0
    for batch, labels in batches:
        t0 = time.perf_counter()
        out = {k: v.numpy() for k, v in predict(batch).items()}
        seconds += time.perf_counter() - t0
        images += int(batch.shape[0])
        evaluator.update(labels["image_id"].numpy(), out["boxes"], out["scores"], out["classes"],
                         out["num_detections"], labels["image_scale"].numpy(),
                         masks=out.get("masks") if masks else None)
    stats = evaluator.evaluate()
    return {"recipe": MODELS[name][0], "preset": MODELS[name][1], "params": int(model.count_params()),
            "stats": stats, "infer_s_per_image": seconds / max(images, 1), "val_images": images,
            "train_s": record.get("times", {}).get("train_seconds"), "stages": [
                {"name": s["name"], "steps": s["epochs"] * s["steps_per_epoch"], "seconds": s["seconds"],
                 "final_loss": s["final_loss"]} for s in record["stages"]]}


def _finished_run(work_dir, recipe, config):
    """A finished run of this very config in ``work_dir`` (``run.json`` with stats)."""
    path = os.path.join(work_dir, "run.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        record = json.load(f)
    return bool(record.get("stats")) and recipe.config_from_dict(record["config"]) == config


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, prefix, title in ((axes[0], "", "box proposals"), (axes[1], "mask_", "segment proposals")):
        for i, (name, r) in enumerate(results.items()):  # one colour per model in both panels
            keys = [f"{prefix}AR{n}" for n in CURVE]
            if all(k in r["stats"] for k in keys):
                ax.plot(CURVE, [r["stats"][k] for k in keys], marker="o", label=name, color=f"C{i}")
        ax.set_xscale("log")
        ax.set_xlabel("number of proposals")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("average recall (IoU 0.5:0.95)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per model (default 600)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-val", type=int, default=500)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--eval-batch", type=int, default=4, help="images per evaluation batch (1000 masks each)")
    parser.add_argument("--tiny", action="store_true", help="tiny networks (smoke runs only)")
    parser.add_argument("--work-dir", default="runs/proposals_bench")
    parser.add_argument("--data-dir", default="data/proposals_bench")
    parser.add_argument("--output", default="benchmarks/results/proposals_digits.json")
    parser.add_argument("--reuse-runs", action="store_true",
                        help="score a model's finished run in --work-dir (same config) instead of training it again")
    args = parser.parse_args(argv)

    from kerasdet.engine.recipes import load_recipe
    from kerasdet.engine.runner import run

    names = [n for n in args.models.split(",") if n]
    unknown = set(names) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {list(MODELS)}")
    results = {}
    t_start = time.time()
    for name in names:
        recipe_name, preset, _ = MODELS[name]
        recipe = load_recipe(recipe_name)
        config = recipe.config(preset, overrides(name, args))
        work = os.path.join(args.work_dir, name)
        t0 = time.time()
        if args.reuse_runs and _finished_run(work, recipe, config):
            print(f"{name}: reusing the finished run in {work}", flush=True)
            train_wall = None
        else:
            run(recipe, config, preset=preset, work_dir=work, data_dir=args.data_dir, strategy="default", verbose=0)
            train_wall = time.time() - t0
        results[name] = score(name, work, args)
        results[name]["run_wall_s"] = train_wall
        s = results[name]["stats"]
        print(f"{name}: box AR10/100/1000 {s['AR10']:.3f} / {s['AR100']:.3f} / {s['AR1000']:.3f}"
              + (f"  segm {s['mask_AR10']:.3f} / {s['mask_AR100']:.3f} / {s['mask_AR1000']:.3f}"
                 if "mask_AR10" in s else "")
              + f"  {results[name]['infer_s_per_image'] * 1000:.1f} ms/image", flush=True)
        png = write_results(results, args, t_start)  # after every model: an interrupted run keeps what it scored
    print(f"wrote {args.output} and {png}")
    return 0


def write_results(results, args, t_start):
    """Writes ``--output`` (JSON) and the recall-vs-proposals PNG next to it; returns the PNG path."""
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    record = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "args": vars(args),
              "budget": f"{args.steps} steps x {args.batch_size} images", "curve": list(CURVE),
              "wall_s": time.time() - t_start, "results": results}
    record["machine"] = {"cpu_flags": cpu_flags_text(), "cpus": os.cpu_count()}
    with open(args.output, "w") as f:
        json.dump(record, f, indent=2, default=float)
    png = os.path.splitext(args.output)[0] + ".png"
    plot(results, png)
    return png


if __name__ == "__main__":
    raise SystemExit(main())
