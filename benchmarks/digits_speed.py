"""Digits RetinaNet: serving precision (AP and latency) and input-pipeline headroom.

With a trained digits model (``python recipes/retinanet.py --preset digits --work-dir
runs/perf_digits``), on the digits validation set:

1. COCO AP / AP50 (pycocotools, :func:`kerasdet.evaluation.callback.evaluate_model`) of
   the model computing in float32 and in bfloat16 (:func:`kerasdet.precision.
   set_compute_dtype`; decode and NMS stay float32), and the difference in AP points;
2. predict latency of one validation batch in each precision, alternated, medians;
3. the training pipeline alone (``cli.make_datasets``, the recipe's exact input settings)
   in images/s against what one training step consumes (batch / median
   ``train_on_batch`` time of the same model), i.e. the pipeline's headroom factor.

Usage: ``python benchmarks/digits_speed.py --weights runs/perf_digits/model.weights.h5
[--repeats 5] [--pipeline-batches 100] [--skip-ap]`` (~4 min on 2 cores).
"""
import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import tensorflow as tf  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default=os.path.join("runs", "perf_digits", "model.weights.h5"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pipeline-batches", type=int, default=100)
    parser.add_argument("--skip-ap", action="store_true")
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()

    from kerasdet.cli import build, get_config, load_recipe, make_datasets, make_optimizer, prepare_sources
    from kerasdet.evaluation.callback import evaluate_model
    from kerasdet.precision import set_compute_dtype

    print(f"TensorFlow {tf.__version__}, CPUs: {os.cpu_count()}, load average at start: {os.getloadavg()}")
    recipe = load_recipe("retinanet")
    config = get_config(recipe, "digits")
    train_source, val_source = prepare_sources(config)
    model = build(recipe, config, train_source.num_classes)
    model.load_weights(args.weights)
    train_ds, val_ds = make_datasets(config, train_source, val_source)

    if not args.skip_ap:
        stats = {}
        for precision in args.precisions:
            set_compute_dtype(model, precision)
            stats[precision] = evaluate_model(model, val_ds, val_source.annotation_file,
                                              category_ids=val_source.category_ids)
            print(f"{precision:9s} AP {stats[precision]['AP']:.4f}  AP50 {stats[precision]['AP50']:.4f}", flush=True)
        ref = stats[args.precisions[0]]
        for precision in args.precisions[1:]:
            print(f"{precision} - {args.precisions[0]}: AP {100 * (stats[precision]['AP'] - ref['AP']):+.2f} points, "
                  f"AP50 {100 * (stats[precision]['AP50'] - ref['AP50']):+.2f} points")

    images = next(iter(val_ds))[0]
    fns = {}
    for precision in args.precisions:
        set_compute_dtype(model, precision)
        fns[precision] = tf.function(lambda x: model.detect(x))
        fns[precision](images)  # trace in this precision (tf.functions keep the traced dtype)
    times = {p: [] for p in fns}
    for _ in range(args.repeats):
        for p, fn in fns.items():
            t = time.perf_counter()
            tf.nest.map_structure(lambda v: v.numpy(), fn(images))
            times[p].append(time.perf_counter() - t)
    ref_t = statistics.median(times[args.precisions[0]])
    for p in fns:
        t = statistics.median(times[p])
        print(f"predict {p:9s} batch {images.shape[0]} {images.shape[1]}x{images.shape[2]}: {t * 1000:8.1f} ms "
              f"({images.shape[0] / t:6.1f} img/s), ratio to {args.precisions[0]} {t / ref_t:.3f}")
    set_compute_dtype(model, "float32")

    # Pipeline alone vs the training step's consumption.
    batch = config["train"]["batch_size"]
    it = iter(train_ds)
    next(it)  # first batch builds the image cache / autotune state
    t = time.perf_counter()
    for _ in range(args.pipeline_batches):
        next(it)
    pipe_rate = args.pipeline_batches * batch / (time.perf_counter() - t)
    model.compile(optimizer=make_optimizer(config, steps_per_epoch=250))
    x, y = next(it)
    model.train_on_batch(x, y)
    step = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        model.train_on_batch(x, y)
        step.append(time.perf_counter() - t)
    consume = batch / statistics.median(step)
    print(f"pipeline alone: {pipe_rate:8.1f} img/s; training consumes {consume:6.1f} img/s "
          f"(step {statistics.median(step) * 1000:.0f} ms at batch {batch}); headroom {pipe_rate / consume:.1f}x")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
