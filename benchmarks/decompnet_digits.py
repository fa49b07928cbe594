"""decompNet vs the sliding-window baseline on the paper's 3-6-9 digits protocol (seed 001).

One run: generate the set (100x100, 5-10 digits of classes 3/6/9, scale 0.5-2, IoU <= 0.2,
30 clutter patches, disjoint digit pools; 1,500 / 300 images by default), train decompNet
variants, each a run of the ``decompnet`` recipe's ``digits`` preset
(:mod:`kerasdet.recipes.decompnet`) through the runner (:func:`kerasdet.engine.runner.run`,
the code of ``kerasdet train``) with ``--set``-style overrides (the flags below) in its own
work dir ``<work-dir>/<cell>_<target>`` (default variants: ``fc:boxes`` = the paper's fully
connected recurrent cell, ``conv_gru:boxes`` = its all-convolutional alternative, both on
filled box masks, the detection variant, and ``conv_gru:masks`` = the segmentation variant
on the digits' ink), then the sliding-window CNN + NMS 0.3 baseline
(:class:`kerasdet.models.sliding_window.SlidingWindowDetector`), and report, with
pycocotools on the validation split, each decompNet rebuilt from its ``run.json``
(:func:`kerasdet.engine.runner.load_run`, once per stop rule via ``model.stop``):

* per-class box AP50 (decompNet boxes scored by Eq. 5; baseline windows by class probability),
* per-class mask AP50 (decompNet masks thresholded at 0.1, scored by Eq. 6),
* count accuracy (exact number of instances per category; per class, per image, MAE;
  decompNet with the ``--stop`` rule and with the paper's ``first_black``; the baseline
  counts its detections with score >= ``--baseline-count-threshold``),
* precision-recall curves per class saved as a PNG like the paper's Fig. 4 / Fig. 5
  (``<work-dir>/pr_curves.png``), every figure in ``<work-dir>/results.json``.

Every variant trains all of its stages (category / instance / joint / box). The
pre-engine script trained the category network once per target and shared it between
the cells (``conv_gru:boxes`` reused ``fc:boxes``'); through the runner each variant
trains its own, which costs one more category stage for the default variants (~2.5 min of
the ~37, measured 146 s) and means the two box variants no longer start their instance
stage from the very same category network.

The sliding-window baseline is not a recipe: it is the comparison model of the paper,
trained here by its own plain ``fit`` (Adam, cosine decay, ``--baseline-epochs``, batch 16)
on the same training stream (:func:`kerasdet.engine.builders.build_dataset`); its weights go
to ``<work-dir>/baseline.weights.h5``.

Flags: ``--work-dir``; ``--data-dir`` (default ``data/digits369_<train>_<val>``);
``--num-train``, ``--num-val`` (``data.generate``); ``--batch-size`` (``train.batch_size``);
``--variants CELL:TARGET,...``; ``--units``, ``--instance-filters``, ``--conv-gru-filters``,
``--conv-gru-layers`` (``model.*``; ``fc`` variants use 2 recurrent layers);
``--stage-epochs C,I,J,B`` (each stage's epochs; a 0 drops the stage); ``--warmup-epochs``
(``params.warmup_epochs`` of the category and instance stages); ``--stop`` (``model.stop``);
``--baseline-epochs``, ``--baseline-count-threshold``; ``--reuse-weights``: a variant whose
``<work-dir>/<cell>_<target>/run.json`` exists is not trained again (its run is scored), the
baseline's ``baseline.weights.h5`` is loaded (its train time from the previous
``results.json``); ``--seed``.

Run: ``python benchmarks/decompnet_digits.py`` (~40 min on 2 quiet CPU cores, see ``--help`` for
sizes); ``--reuse-weights`` re-evaluates the runs in ``--work-dir``. Smoke::

    python benchmarks/decompnet_digits.py --work-dir /tmp/decomp_smoke --num-train 16 --num-val 8 \
        --batch-size 8 --variants conv_gru:boxes --stage-epochs 1,1,0,1 --warmup-epochs 0 --baseline-epochs 1

Needs matplotlib for the PNG (``pip install -e ".[bench]"``).
"""
import argparse
import json
import logging
import os
import time


def _collect(predict, dataset, count_fn=None):
    """Runs ``predict`` over the dataset; numpy detections, image ids/scales, GT classes."""
    import numpy as np

    out = {"image_ids": [], "scales": [], "gt_classes": [], "counts": []}
    for images, labels in dataset:
        det = predict(images)
        for key, value in det.items():
            out.setdefault(key, []).append(np.asarray(value))
        out["image_ids"].append(labels["image_id"].numpy())
        out["scales"].append(labels["image_scale"].numpy())
        out["gt_classes"].append(labels["classes"].numpy())
        if count_fn is not None:
            out["counts"].append(np.asarray(count_fn(images)))
    return {k: np.concatenate(v) for k, v in out.items() if v}


def _gt_counts(gt_classes, num_classes):
    import numpy as np

    return np.stack([(gt_classes == c).sum(1) for c in range(num_classes)], axis=1)


def _variant(text):
    cell, _, target = text.partition(":")
    if cell not in ("fc", "conv_gru") or target not in ("boxes", "masks"):
        raise argparse.ArgumentTypeError(f"a variant is CELL:TARGET with CELL fc|conv_gru and TARGET boxes|masks, "
                                         f"got {text!r}")
    return cell, target


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default=os.path.join("runs", "decompnet_bench"))
    parser.add_argument("--data-dir", default=None, help="default: data/digits369_<train>_<val>")
    parser.add_argument("--num-train", type=int, default=1500)
    parser.add_argument("--num-val", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variants", default="fc:boxes,conv_gru:boxes,conv_gru:masks",
                        help="comma-separated CELL:TARGET decompNet variants (cell fc = the paper's fully "
                             "connected recurrence, conv_gru = its all-convolutional alternative; target boxes = "
                             "filled box masks, the detection variant; masks = digit ink, the segmentation variant)")
    parser.add_argument("--units", type=int, default=512, help="fc recurrent units (paper: 2048)")
    parser.add_argument("--instance-filters", type=int, default=16, help="instance conv width (paper: 32)")
    parser.add_argument("--conv-gru-filters", type=int, default=32)
    parser.add_argument("--conv-gru-layers", type=int, default=1)
    parser.add_argument("--stage-epochs", default="15,8,1,1",
                        help="category,instance,joint,box epochs (0 drops the stage)")
    parser.add_argument("--warmup-epochs", type=int, default=6,
                        help="epochs of the category and instance stages at lambda = gamma = p = 0.3 before 1.0 "
                             "(the paper: one epoch of its 30,000 images)")
    parser.add_argument("--stop", default="bright", help="stop rule for AP and counts (first_black is also counted)")
    parser.add_argument("--baseline-epochs", type=int, default=4)
    parser.add_argument("--baseline-count-threshold", type=float, default=0.5)
    parser.add_argument("--reuse-weights", action="store_true",
                        help="do not train a variant whose <work-dir>/<cell>_<target>/run.json exists, and load "
                             "the baseline's weights saved in --work-dir; train times are taken from the runs and "
                             "the previous results.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    variants = [_variant(v) for v in args.variants.split(",") if v]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")  # runner progress

    import keras
    import numpy as np

    from kerasdet.engine import builders
    from kerasdet.engine.recipes import load_recipe
    from kerasdet.engine.runner import load_run, run, val_source_of_run
    from kerasdet.evaluation.coco_eval import detections_to_coco_results
    from kerasdet.evaluation.per_class import count_accuracy, masks_to_coco_results, per_class_pr
    from kerasdet.models.sliding_window import SlidingWindowDetector

    os.makedirs(args.work_dir, exist_ok=True)
    recipe = load_recipe("decompnet")
    epochs = [float(e) for e in args.stage_epochs.split(",")]
    data_dir = args.data_dir or os.path.join("data", f"digits369_{args.num_train}_{args.num_val}")
    common = {"data.dir": data_dir, "data.generate.num_train": args.num_train, "data.generate.num_val": args.num_val,
              "train.batch_size": args.batch_size, "model.units": args.units,
              "model.instance_filters": args.instance_filters, "model.conv_gru_filters": args.conv_gru_filters,
              "model.stop": args.stop, "export.enabled": False}
    preset_stages = recipe.config("digits", common).to_dict()["train"]["stages"]
    if len(epochs) != len(preset_stages):
        parser.error(f"--stage-epochs needs {len(preset_stages)} values "
                     f"({','.join(s['name'] for s in preset_stages)}), got {args.stage_epochs!r}")
    stages = []
    for stage, e in zip(preset_stages, epochs):
        if e <= 0:
            continue  # a stage of 0 epochs is dropped
        stage = dict(stage, epochs=e, params=dict(stage["params"]))
        if stage["kind"] in ("category", "instance"):
            stage["params"]["warmup_epochs"] = args.warmup_epochs
        stages.append(stage)
    if not stages:
        parser.error("--stage-epochs: every stage has 0 epochs")
    common["train.stages"] = stages

    # The data set (generated once; the runs find it in data.dir) and its classes.
    config = recipe.config("digits", common)
    train_source, val_source = builders.build_sources(config)
    num_classes = train_source.num_classes
    cat_ids = list(val_source.category_ids)
    names = list(val_source.category_names)
    results = {"config": {k: v for k, v in vars(args).items()}, "categories": names, "decompnet": {}}
    curves = {}
    previous = {}
    if args.reuse_weights and os.path.exists(os.path.join(args.work_dir, "results.json")):
        with open(os.path.join(args.work_dir, "results.json")) as f:
            previous = json.load(f)

    # --- decompNet variants, each a run of the digits preset --------------------------------
    for cell, target in variants:
        name = f"decomp {cell} {target}"
        vdir = os.path.join(args.work_dir, f"{cell}_{target}")
        overrides = {**common, "model.target": target, "model.cell": cell,
                     "model.recurrent_layers": args.conv_gru_layers if cell == "conv_gru" else 2}
        entry = {"work_dir": vdir}
        if args.reuse_weights and os.path.exists(os.path.join(vdir, "run.json")):
            entry["run_reused"] = vdir
        else:
            run(recipe, recipe.config("digits", overrides), preset="digits", work_dir=vdir, seed=args.seed)
        _, vconfig, model, record = load_run(vdir)
        entry.update(params=record["parameters"], train_seconds=record["times"]["train_seconds"],
                     stage_seconds=[(s["name"], s["seconds"]) for s in record["stages"]],
                     final_losses={s["name"]: {k: v[-1] for k, v in s["history"].items() if v}
                                   for s in record["stages"]})
        vsource = val_source_of_run(vconfig, record)
        val_ds = builders.build_dataset(vconfig, vsource, training=False)
        for stop in dict.fromkeys([args.stop, "first_black"]):
            if model.stop != stop:  # the same run's model built with this stop rule
                _, _, model, _ = load_run(vdir, overrides={"model.stop": stop})
            t0 = time.time()
            det = _collect(model.predict_on_batch, val_ds, count_fn=model.count_instances)
            seconds = time.time() - t0
            gt_counts = _gt_counts(det["gt_classes"], num_classes)
            box_results = detections_to_coco_results(
                image_ids=det["image_ids"], boxes=det["boxes"], scores=det["scores"], classes=det["classes"],
                num_detections=det["num_detections"], image_scales=det["scales"], category_ids=cat_ids)
            mask_results = masks_to_coco_results(
                image_ids=det["image_ids"], masks=det["masks"], scores=det["mask_scores"], classes=det["classes"],
                num_detections=det["num_detections"], category_ids=cat_ids)
            box = per_class_pr(vsource.annotation_file, box_results, iou_type="bbox")
            mask = per_class_pr(vsource.annotation_file, mask_results, iou_type="segm")
            entry[stop] = {"box_ap50": _ap_table(box, cat_ids, names), "mask_ap50": _ap_table(mask, cat_ids, names),
                           "counts": count_accuracy(det["counts"], gt_counts), "predict_seconds": seconds,
                           "detections_per_image": float(det["num_detections"].mean())}
            if stop == args.stop:
                curves[f"{name} box"] = box
                if target == "masks":
                    curves[f"{name} mask"] = mask
        results["decompnet"][name] = entry
        print(f"{name}: " + json.dumps({k: entry[k] for k in dict.fromkeys([args.stop, "first_black"])}), flush=True)

    # --- sliding-window baseline (not a recipe: its own plain fit) ---------------------------
    keras.utils.set_random_seed(args.seed)
    base_cfg = recipe.config("digits", {**common, "train.batch_size": 16})
    base_train = builders.build_dataset(base_cfg, train_source, training=True, seed=args.seed)
    val_ds = builders.build_dataset(base_cfg, val_source, training=False)
    baseline = SlidingWindowDetector(num_classes=num_classes, image_size=config.input.image_size)
    base_steps = builders.steps_per_epoch(base_cfg, len(train_source))
    baseline.compile(optimizer=keras.optimizers.Adam(
        keras.optimizers.schedules.CosineDecay(2e-3, args.baseline_epochs * base_steps)))
    entry = {"params": baseline.count_params()}
    weights = os.path.join(args.work_dir, "baseline.weights.h5")
    if args.reuse_weights and os.path.exists(weights):
        baseline.build((None, *config.input.image_size, 3))
        baseline.load_weights(weights)
        entry["train_seconds"] = previous.get("baseline", {}).get("train_seconds", float("nan"))
        entry["weights_reused"] = weights
    else:
        t0 = time.time()
        baseline.fit(base_train, epochs=args.baseline_epochs, steps_per_epoch=base_steps, verbose=2)
        entry["train_seconds"] = time.time() - t0
        baseline.save_weights(weights)
    t0 = time.time()
    bdet = _collect(baseline.predict_on_batch, val_ds)
    entry["predict_seconds"] = time.time() - t0
    b_results = detections_to_coco_results(
        image_ids=bdet["image_ids"], boxes=bdet["boxes"], scores=bdet["scores"], classes=bdet["classes"],
        num_detections=bdet["num_detections"], image_scales=bdet["scales"], category_ids=cat_ids)
    box = per_class_pr(val_source.annotation_file, b_results, iou_type="bbox")
    curves["sliding window box"] = box
    keep = (bdet["scores"] >= args.baseline_count_threshold) & (bdet["classes"] >= 0)
    b_counts = np.stack([((bdet["classes"] == c) & keep).sum(1) for c in range(num_classes)], axis=1)
    entry["box_ap50"] = _ap_table(box, cat_ids, names)
    entry["counts"] = count_accuracy(b_counts, _gt_counts(bdet["gt_classes"], num_classes))
    results["baseline"] = entry

    # --- report -----------------------------------------------------------------------------
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, num_classes, figsize=(5 * num_classes, 4.5))
        for j, cid in enumerate(cat_ids):
            ax = np.atleast_1d(axes)[j]
            for name, curve in curves.items():
                ax.plot(curve[cid]["recall"], curve[cid]["precision"], label=f"{name} (AP50 {curve[cid]['ap']:.2f})")
            ax.set_title(f"digit {names[j]} (IoU 0.5)")
            ax.set_xlabel("recall")
            ax.set_ylabel("precision")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        png = os.path.join(args.work_dir, "pr_curves.png")
        fig.savefig(png, dpi=100)
        results["png"] = png
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install -e '.[bench]')")
    with open(os.path.join(args.work_dir, "results.json"), "w") as f:  # after the PNG, so it names it
        json.dump(results, f, indent=2)
    print(f"\n| model | stop | box AP50 {' / '.join(names)} | mean | mask AP50 mean | exact count {' / '.join(names)} "
          "| per image | count MAE | train |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, entry in results["decompnet"].items():
        for stop in dict.fromkeys([args.stop, "first_black"]):
            r = entry[stop]
            print(f"| {name} | {stop} | {_fmt(r['box_ap50'], names)} | {r['box_ap50']['mean']:.3f} | "
                  f"{r['mask_ap50']['mean']:.3f} | {' / '.join(f'{c:.2f}' for c in r['counts']['per_class'])} | "
                  f"{r['counts']['per_image']:.3f} | {r['counts']['mae']:.2f} | {entry.get('train_seconds', float('nan')) / 60:.1f} min |")
    b = results["baseline"]
    print(f"| sliding window + NMS 0.3 | score >= {args.baseline_count_threshold} | {_fmt(b['box_ap50'], names)} | "
          f"{b['box_ap50']['mean']:.3f} | - | {' / '.join(f'{c:.2f}' for c in b['counts']['per_class'])} | "
          f"{b['counts']['per_image']:.3f} | {b['counts']['mae']:.2f} | {b['train_seconds'] / 60:.1f} min |")
    print(f"\nPNG {results.get('png')}; JSON {os.path.join(args.work_dir, 'results.json')}")
    return results


def _ap_table(curve, cat_ids, names):
    return {**{names[j]: curve[cid]["ap"] for j, cid in enumerate(cat_ids)}, "mean": curve["mean"]}


def _fmt(table, names):
    return " / ".join(f"{table[n]:.3f}" for n in names)


if __name__ == "__main__":
    main()
