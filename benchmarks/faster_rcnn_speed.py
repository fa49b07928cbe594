"""Faster R-CNN speed: predict latency and train-step time.

Prints medians over repeated runs (after warm-up) for

* R50-FPN (the ``paper`` preset's model: P2-P6 RPN, 1000 test / 2000 train proposals,
  512 sampled RoIs, RoIAlign 7x7, 2 x fc1024, 80 classes, random init) at 512x512, batch 1:
  predict (backbone + RPN + proposals + RoI head + per-class NMS, a ``tf.function``) and
  one ``train_on_batch`` step (SGD);
* the ``digits`` preset of the ``faster_rcnn_fpn`` recipe
  (:mod:`kerasdet.recipes.faster_rcnn_fpn`) at its 128x128 input (batch 1 and 16) and at
  512x512 (batch 1).

Default (CPU) ops: ``crop_and_resize`` RoIAlign and ``combined_non_max_suppression``.
``--jit`` adds rows with ``jit_compile=True`` (gather RoIAlign + padded NMS under XLA).

Usage: ``python benchmarks/faster_rcnn_speed.py [--repeats 5] [--skip-r50] [--skip-train] [--jit]``
"""
import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from retinanet_speed import fake_batch, median_time  # noqa: E402  (benchmarks/, the script's folder)


def bench(name, build, size, batches, num_classes, repeats, train=True, train_batches=None, jits=(False,)):
    rows = []
    for jit in jits:
        model = build()
        model.build((None, size, size, 3))
        # compile(jit_compile=...) selects the XLA-compatible RoIAlign/NMS inside detect()
        model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9), jit_compile=jit)
        run = tf.function(model.detect, jit_compile=jit, reduce_retracing=True)
        for b in batches:
            x, _ = fake_batch(b, size, num_classes)
            x = tf.constant(x)
            t = median_time(lambda: run(x)["num_detections"].numpy(), repeats)
            rows.append((name, f"{size}x{size}", b, "predict", jit, t))
            print(f"{name:14s} {size}x{size} batch {b:2d} predict    jit={jit!s:5s} {t * 1000:9.1f} ms", flush=True)
        if train:
            for b in train_batches or batches:
                x, y = fake_batch(b, size, num_classes)
                t = median_time(lambda: model.train_on_batch(x, y), max(2, repeats // 2), warmup=1)
                rows.append((name, f"{size}x{size}", b, "train step", jit, t))
                print(f"{name:14s} {size}x{size} batch {b:2d} train step jit={jit!s:5s} {t * 1000:9.1f} ms", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-r50", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--jit", action="store_true", help="also time jit_compile=True")
    args = parser.parse_args()

    from kerasdet.engine.recipes import load_recipe

    recipe = load_recipe("faster_rcnn_fpn")

    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, devices: "
          f"{[d.device_type for d in tf.config.list_physical_devices()]}, CPUs: {os.cpu_count()}")
    jits = (False, True) if args.jit else (False,)
    rows = []
    digits = recipe.config("digits")
    rows += bench("digits preset", lambda: recipe.build_model(digits, 10), 128, (1, 16), 10, args.repeats,
                  train=not args.skip_train, jits=jits)
    rows += bench("digits preset", lambda: recipe.build_model(digits, 10), 512, (1,), 10, args.repeats,
                  train=not args.skip_train, jits=jits)
    if not args.skip_r50:
        paper = recipe.config("paper", {"backbone.weights": None})  # random init, nothing downloaded
        rows += bench("R50-FPN", lambda: recipe.build_model(paper, 80), 512, (1,), 80, args.repeats,
                      train=not args.skip_train, jits=jits)
    print("\n| model | input | batch | what | jit_compile | median |")
    print("|---|---|---|---|---|---|")
    for name, size, b, what, jit, t in rows:
        print(f"| {name} | {size} | {b} | {what} | {jit} | {t * 1000:.1f} ms |")


if __name__ == "__main__":
    main()
