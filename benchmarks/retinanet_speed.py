"""RetinaNet speed: predict latency and train-step time, with and without XLA.

Prints medians over repeated runs (after warm-up) for

* R50-FPN (P3-P7, 9 anchors, 4x256 subnets, 80 classes, random init) at 512x512, batch 1
  and 4: predict (forward + decode + NMS, a static-batch ``tf.function``) and one
  ``train_on_batch`` step (SGD);
* the ``digits`` preset of the ``retinanet`` recipe (:mod:`kerasdet.recipes.retinanet`,
  built from ``load_recipe("retinanet").config("digits")``) at its 128x128 input and at
  512x512, batch 1 and 16.

``jit_compile=True`` compiles the predict function with XLA (using the XLA-compatible
padded NMS) and the train step via ``model.compile(jit_compile=True)``.

Usage: ``python benchmarks/retinanet_speed.py [--repeats 5] [--skip-r50] [--skip-train]``
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def median_time(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def fake_batch(batch, size, num_classes, seed=0):
    rng = np.random.RandomState(seed)
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    boxes = np.zeros((batch, 20, 4), "float32")
    classes = np.full((batch, 20), -1, "int32")
    for b in range(batch):
        for j in range(5):
            y, x = rng.uniform(0, size * 0.7, 2)
            h, w = rng.uniform(size * 0.05, size * 0.3, 2)
            boxes[b, j] = [y, x, y + h, x + w]
            classes[b, j] = rng.randint(num_classes)
    return images, {"boxes": boxes, "classes": classes}


def predict_fn(model, jit):
    post = model.postprocess_xla if jit else model.postprocess

    @tf.function(jit_compile=jit, reduce_retracing=True)
    def run(images):
        return model.detect(images, postprocessor=post)

    return run


def bench(name, build, size, batches, num_classes, repeats, train=True, train_batches=None):
    rows = []
    for jit in (False, True):
        model = build()
        model.build((None, size, size, 3))
        run = predict_fn(model, jit)
        for b in batches:
            x, _ = fake_batch(b, size, num_classes)
            x = tf.constant(x)
            t = median_time(lambda: run(x)["num_detections"].numpy(), repeats)
            rows.append((name, f"{size}x{size}", b, "predict", jit, t))
            print(f"{name:14s} {size}x{size} batch {b:2d} predict    jit={jit!s:5s} {t * 1000:9.1f} ms", flush=True)
        if train:
            model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9), jit_compile=jit)
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
    args = parser.parse_args()

    from kerasdet.backbones import resnet_backbone
    from kerasdet.engine.recipes import load_recipe
    from kerasdet.models.retinanet import RetinaNet

    recipe = load_recipe("retinanet")

    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, devices: "
          f"{[d.device_type for d in tf.config.list_physical_devices()]}, CPUs: {os.cpu_count()}")
    rows = []
    digits = recipe.config("digits")
    rows += bench("digits preset", lambda: recipe.build_model(digits, 10), 128, (1, 16), 10, args.repeats,
                  train=not args.skip_train)
    rows += bench("digits preset", lambda: recipe.build_model(digits, 10), 512, (1, 4), 10, args.repeats,
                  train=not args.skip_train)
    if not args.skip_r50:
        rows += bench("R50-FPN", lambda: RetinaNet(backbone=resnet_backbone(50), num_classes=80), 512, (1, 4), 80,
                      args.repeats, train=not args.skip_train)
    print("\n| model | input | batch | what | jit_compile | median |")
    print("|---|---|---|---|---|---|")
    for name, size, b, what, jit, t in rows:
        print(f"| {name} | {size} | {b} | {what} | {jit} | {t * 1000:.1f} ms |")


if __name__ == "__main__":
    main()
