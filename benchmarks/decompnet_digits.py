"""decompNet vs the sliding-window baseline on the paper's 3-6-9 digits protocol (seed 001).

One run: generate the set (100x100, 5-10 digits of classes 3/6/9, scale 0.5-2, IoU <= 0.2,
30 clutter patches, disjoint digit pools), train decompNet in its stages
(``recipes/decompnet.py``) and the sliding-window CNN + NMS 0.3 baseline
(:class:`kerasdet.models.sliding_window.SlidingWindowDetector`), then report, with
pycocotools on the validation split:

* per-class box AP50 (decompNet boxes scored by Eq. 5; baseline windows by class probability),
* per-class mask AP50 (decompNet masks thresholded at 0.1, scored by Eq. 6),
* count accuracy (exact number of instances per category; per class, per image, MAE;
  the baseline counts its detections with score >= ``--baseline-count-threshold``),
* precision-recall curves per class saved as a PNG like the paper's Fig. 4 / Fig. 5.

Run: ``python benchmarks/decompnet_digits.py`` (CPU preset, see ``--help`` for sizes).
Needs matplotlib for the PNG (``pip install -e ".[bench]"``).
"""
import argparse
import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _recipe():
    spec = importlib.util.spec_from_file_location("decompnet_recipe", os.path.join(ROOT, "recipes", "decompnet.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default=os.path.join("runs", "decompnet_bench"))
    parser.add_argument("--data-dir", default=os.path.join("data", "digits369_bench"))
    parser.add_argument("--num-train", type=int, default=1200)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--units", type=int, default=512, help="recurrent units (paper: 2048)")
    parser.add_argument("--instance-filters", type=int, default=16, help="instance conv width (paper: 32)")
    parser.add_argument("--stage-epochs", default="2,3,1,0", help="category,instance,joint,box epochs")
    parser.add_argument("--baseline-epochs", type=int, default=3)
    parser.add_argument("--baseline-count-threshold", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import keras
    import numpy as np

    from kerasdet.cli import get_config, make_datasets, prepare_sources
    from kerasdet.evaluation.coco_eval import detections_to_coco_results
    from kerasdet.evaluation.per_class import count_accuracy, masks_to_coco_results, per_class_pr
    from kerasdet.models.sliding_window import SlidingWindowDetector

    os.makedirs(args.work_dir, exist_ok=True)
    recipe = _recipe()
    epochs = [int(e) for e in args.stage_epochs.split(",")]
    config = get_config(recipe, "digits", {
        "data.dir": args.data_dir, "data.generate.num_train": args.num_train, "data.generate.num_val": args.num_val,
        "train.batch_size": args.batch_size, "model.units": args.units, "model.instance_filters": args.instance_filters})
    config["train"]["stages"] = [dict(s, epochs=e) for s, e in zip(config["train"]["stages"], epochs) if e > 0]
    keras.utils.set_random_seed(args.seed)
    train_source, val_source = prepare_sources(config)
    train_ds, val_ds = make_datasets(config, train_source, val_source, seed=args.seed, repeat=True)
    steps = len(train_source) // args.batch_size
    num_classes = train_source.num_classes
    cat_ids = list(val_source.category_ids)
    names = list(val_source.category_names)
    results = {"config": {k: v for k, v in vars(args).items()}, "categories": names}

    # --- decompNet ------------------------------------------------------------------------
    model = recipe.build_model(config, num_classes)
    results["decompnet_params"] = model.count_params()
    t0 = time.time()
    stages = recipe.train_stages(model, train_ds, config, steps_per_epoch=steps, verbose=2)
    results["decompnet_train_seconds"] = time.time() - t0
    results["decompnet_stages"] = [(s, sec) for s, sec, _ in stages]
    model.save_weights(os.path.join(args.work_dir, "decompnet.weights.h5"))
    t0 = time.time()
    det = _collect(model.predict_on_batch, val_ds, count_fn=model.count_instances)
    results["decompnet_predict_seconds"] = time.time() - t0
    box_results = detections_to_coco_results(
        image_ids=det["image_ids"], boxes=det["boxes"], scores=det["scores"], classes=det["classes"],
        num_detections=det["num_detections"], image_scales=det["scales"], category_ids=cat_ids)
    mask_results = masks_to_coco_results(
        image_ids=det["image_ids"], masks=det["masks"], scores=det["mask_scores"], classes=det["classes"],
        num_detections=det["num_detections"], category_ids=cat_ids)
    gt_counts = _gt_counts(det["gt_classes"], num_classes)
    curves = {"decomp box": per_class_pr(val_source.annotation_file, box_results, iou_type="bbox"),
              "decomp mask": per_class_pr(val_source.annotation_file, mask_results, iou_type="segm")}
    results["decompnet_counts"] = count_accuracy(det["counts"], gt_counts)

    # --- sliding-window baseline ------------------------------------------------------------
    keras.utils.set_random_seed(args.seed)
    base_cfg = dict(config, train=dict(config["train"], batch_size=16))
    base_train, _ = make_datasets(base_cfg, train_source, val_source, seed=args.seed, repeat=True)
    baseline = SlidingWindowDetector(num_classes=num_classes, image_size=config["input"]["image_size"])
    base_steps = len(train_source) // 16
    baseline.compile(optimizer=keras.optimizers.Adam(
        keras.optimizers.schedules.CosineDecay(2e-3, args.baseline_epochs * base_steps)))
    results["baseline_params"] = baseline.count_params()
    t0 = time.time()
    baseline.fit(base_train, epochs=args.baseline_epochs, steps_per_epoch=base_steps, verbose=2)
    results["baseline_train_seconds"] = time.time() - t0
    t0 = time.time()
    bdet = _collect(baseline.predict_on_batch, val_ds)
    results["baseline_predict_seconds"] = time.time() - t0
    b_results = detections_to_coco_results(
        image_ids=bdet["image_ids"], boxes=bdet["boxes"], scores=bdet["scores"], classes=bdet["classes"],
        num_detections=bdet["num_detections"], image_scales=bdet["scales"], category_ids=cat_ids)
    curves["sliding window box"] = per_class_pr(val_source.annotation_file, b_results, iou_type="bbox")
    keep = (bdet["scores"] >= args.baseline_count_threshold) & (bdet["classes"] >= 0)
    b_counts = np.stack([((bdet["classes"] == c) & keep).sum(1) for c in range(num_classes)], axis=1)
    results["baseline_counts"] = count_accuracy(b_counts, gt_counts)

    # --- report -----------------------------------------------------------------------------
    results["ap50"] = {name: {names[j]: curve[cid]["ap"] for j, cid in enumerate(cat_ids)} | {"mean": curve["mean"]}
                       for name, curve in curves.items()}
    with open(os.path.join(args.work_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, num_classes, figsize=(4 * num_classes, 4))
        for j, cid in enumerate(cat_ids):
            ax = np.atleast_1d(axes)[j]
            for name, curve in curves.items():
                ax.plot(curve[cid]["recall"], curve[cid]["precision"], label=f"{name} (AP50 {curve[cid]['ap']:.2f})")
            ax.set_title(f"digit {names[j]}")
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
    print("\n| model | " + " | ".join(f"AP50 {n}" for n in names) + " | mean | count acc per class | per image | MAE |")
    print("|---|" + "---|" * (len(names) + 4))
    for name, curve in curves.items():
        counts = results["baseline_counts" if name.startswith("sliding") else "decompnet_counts"]
        per_class = " / ".join(f"{c:.2f}" for c in counts["per_class"])
        print(f"| {name} | " + " | ".join(f"{curve[cid]['ap']:.3f}" for cid in cat_ids)
              + f" | {curve['mean']:.3f} | {per_class} | {counts['per_image']:.3f} | {counts['mae']:.2f} |")
    print(f"\ndecompNet: {results['decompnet_params']:,} params, train {results['decompnet_train_seconds'] / 60:.1f} "
          f"min, predict {results['decompnet_predict_seconds']:.1f} s; baseline: {results['baseline_params']:,} "
          f"params, train {results['baseline_train_seconds'] / 60:.1f} min, predict "
          f"{results['baseline_predict_seconds']:.1f} s; JSON {os.path.join(args.work_dir, 'results.json')}")
    return results


if __name__ == "__main__":
    main()
