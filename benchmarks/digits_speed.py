"""Digits RetinaNet: serving precision (AP and latency) and input-pipeline headroom.

With a trained digits run (``kerasdet train --recipe retinanet --preset digits --work-dir
runs/perf_digits``, or ``python recipes/retinanet.py ...``: the runner writes
``runs/perf_digits/run.json``), the model rebuilt by :func:`kerasdet.engine.runner.load_run`,
on the run's validation split:

1. COCO AP / AP50 (pycocotools, :func:`kerasdet.engine.builders.evaluate`) of the model
   computing in float32 and in bfloat16 (:func:`kerasdet.precision.set_compute_dtype`;
   decode and NMS stay float32), and the difference in AP points;
2. predict latency of one validation batch in each precision, alternated, medians;
3. the training pipeline alone (:func:`kerasdet.engine.builders.build_dataset`, the run's
   exact input settings) in images/s against what one training step consumes (batch /
   median ``train_on_batch`` time of the same model with the run's first-stage optimizer,
   :func:`kerasdet.engine.builders.build_optimizer`), i.e. the pipeline's headroom factor.

Flags: ``--run`` the run's work dir (default ``runs/perf_digits``); ``--weights`` other
weights of that run (default its ``model.weights.h5``); ``--data-dir`` the digits set whose
training split feeds the pipeline (default the run's own set, the folder of the validation
annotations its ``run.json`` records; an existing set with the run's ``data.generate`` is
reused, not regenerated); ``--repeats``, ``--pipeline-batches``, ``--skip-ap``, ``--precisions``.

Usage: ``python benchmarks/digits_speed.py [--run runs/perf_digits] [--repeats 5]
[--pipeline-batches 100] [--skip-ap]`` (~4 min on 2 cores).
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default=os.path.join("runs", "perf_digits"),
                        help="work dir of a trained retinanet digits run (holds run.json)")
    parser.add_argument("--weights", default=None, help="weights of that run (default: its model.weights.h5)")
    parser.add_argument("--data-dir", default=None,
                        help="digits set for the pipeline timing (default: the run's own set)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pipeline-batches", type=int, default=100)
    parser.add_argument("--skip-ap", action="store_true")
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args(argv)

    from kerasdet.engine import builders
    from kerasdet.engine.runner import load_run, val_source_of_run
    from kerasdet.precision import set_compute_dtype

    print(f"TensorFlow {tf.__version__}, CPUs: {os.cpu_count()}, load average at start: {os.getloadavg()}")
    _, config, model, record = load_run(args.run, weights=args.weights)
    val_source = val_source_of_run(config, record)
    data_dir = args.data_dir
    if data_dir is None and config.data.kind == "digits":  # the run's set: <dir>/annotations/instances_val.json
        data_dir = os.path.dirname(os.path.dirname(record["paths"]["val"]["val_annotations"]))
    paths = builders.data_paths(config, data_dir)  # digits: the run's generated set (found, not regenerated)
    train_source = builders.build_source(config, "train", paths=paths, category_ids=val_source.category_ids)
    train_ds = builders.build_dataset(config, train_source, training=True)
    val_ds = builders.build_dataset(config, val_source, training=False)

    if not args.skip_ap:
        stats = {}
        for precision in args.precisions:
            set_compute_dtype(model, precision)
            stats[precision] = builders.evaluate(model, val_ds, val_source, metric="coco")
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
    batch = config.train.batch_size
    it = iter(train_ds)
    next(it)  # first batch builds the image cache / autotune state
    t = time.perf_counter()
    for _ in range(args.pipeline_batches):
        next(it)
    pipe_rate = args.pipeline_batches * batch / (time.perf_counter() - t)
    stage = config.train.resolved_stages()[0]
    epochs, steps = builders.stage_length(stage, builders.steps_per_epoch(config, len(train_source)))
    model.compile(optimizer=builders.build_optimizer(stage, epochs * steps, train=config.train))
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
