"""Mask R-CNN against its Faster R-CNN: train-step and predict time of two trained digits runs.

Loads a finished ``mask_rcnn_fpn`` run and a finished ``faster_rcnn_fpn`` run (the digits
presets: the same network but the mask head), then prints, in one process on this machine,

* the median time of a ``train_on_batch`` step on real training batches (16 images; the
  masks loaded for the mask model) and the ratio mask / box;
* the median time of ``predict_on_batch`` on real validation images (batch 16 and 1), with
  the mean number of real detections per image (the mask branch runs on the detection slots
  up to the last real one of the batch) and the ratio.

Usage::

    python benchmarks/mask_rcnn_speed.py --mask-run runs/paper_claims/mask_rcnn_fpn_s0 \\
        --box-run runs/paper_claims/faster_rcnn_fpn_s0 [--repeats 10]
"""
import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from machine import cpu_flags_text  # noqa: E402  (benchmarks/, the script's folder, is on the path)
from retinanet_speed import median_time  # noqa: E402


def time_run(work_dir, repeats):
    """``{"train_step", "predict_16", "predict_1", "detections"}`` of one finished run."""
    import numpy as np

    from kerasdet.engine import builders
    from kerasdet.engine.runner import load_run, val_source_of_run

    _, config, model, record = load_run(work_dir)
    train = builders.build_dataset(config, builders.build_source(config, "train"), training=True, seed=0)
    val = builders.build_dataset(config, val_source_of_run(config, record), training=False)
    model.compile(optimizer=builders.build_optimizer(config.train.resolved_stages()[0], 1000, train=config.train),
                  jit_compile=config.train.jit_compile)
    batches = iter(train)
    step = median_time(lambda: model.train_on_batch(*next(batches)), repeats)
    images = next(iter(val))
    images = images[0] if isinstance(images, tuple) else images
    images = images["images"] if isinstance(images, dict) else images
    images = images[:16]
    out = model.predict_on_batch(images)
    return {"train_step": step, "predict_16": median_time(lambda: model.predict_on_batch(images), repeats),
            "predict_1": median_time(lambda: model.predict_on_batch(images[:1]), repeats),
            "detections": float(np.mean(out["num_detections"])), "max_detections": int(out["boxes"].shape[1])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mask-run", default=os.path.join("runs", "paper_claims", "mask_rcnn_fpn_s0"))
    parser.add_argument("--box-run", default=os.path.join("runs", "paper_claims", "faster_rcnn_fpn_s0"))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    rows = {"Mask R-CNN": time_run(args.mask_run, args.repeats), "Faster R-CNN": time_run(args.box_run, args.repeats)}
    print(f"\nCPU: {os.cpu_count()} cores, {cpu_flags_text()}")
    print("| model | train step (16 images) | predict batch 16 | predict batch 1 | real detections / image |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['train_step'] * 1000:.0f} ms | {r['predict_16'] * 1000:.0f} ms | "
              f"{r['predict_1'] * 1000:.0f} ms | {r['detections']:.1f} of {r['max_detections']} |")
    m, b = rows["Mask R-CNN"], rows["Faster R-CNN"]
    print(f"mask / box: train step {m['train_step'] / b['train_step']:.2f}x, predict 16 "
          f"{m['predict_16'] / b['predict_16']:.2f}x, predict 1 {m['predict_1'] / b['predict_1']:.2f}x")
    return rows


if __name__ == "__main__":
    main()
