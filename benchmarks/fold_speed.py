"""``model.predict``'s folded BatchNorm: the predict graph with BN as is, folded inside the
graph (``Detector(fold_batchnorm=True)``, the default; :func:`kerasdet.precision.
fold_batchnorm_calls`) and a folded copy (:func:`kerasdet.precision.fold_detector_batchnorm`,
what the exports trace), timed in alternating rounds (medians; the CPU flags printed).

Usage::

    python benchmarks/fold_speed.py --model r50 --repeats 6      # R50-FPN RetinaNet 512², batch 1
    python benchmarks/fold_speed.py --model digits --repeats 20  # the digits preset, 128², batch 16
"""
import argparse
import statistics
import time

import numpy as np
import tensorflow as tf

from machine import cpu_flags_text  # noqa: E402  (benchmarks/, the script's folder, is on the path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("r50", "digits"), default="digits")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    from kerasdet.precision import fold_batchnorm_calls, fold_detector_batchnorm

    if args.model == "r50":
        from kerasdet.backbones import resnet_backbone
        from kerasdet.models.retinanet import RetinaNet

        model, size, batch = RetinaNet(backbone=resnet_backbone(50), num_classes=80), 512, 1
    else:
        from kerasdet.engine.recipes import load_recipe

        recipe = load_recipe("retinanet")
        model, size, batch = recipe.build_model(recipe.config("digits"), 10), 128, 16
    model.build()
    x = tf.random.stateless_uniform((batch, size, size, 3), seed=(0, 1)) * 255

    def in_graph(images):
        with fold_batchnorm_calls(model.backbone, only_frozen=False):
            return model.detect(images)

    copy = fold_detector_batchnorm(model, only_frozen=False)
    fns = {"as is": tf.function(lambda t: model.detect(t)), "folded in the graph": tf.function(in_graph),
           "folded copy": tf.function(lambda t: copy.detect(t))}
    for fn in fns.values():
        for _ in range(2):
            tf.nest.map_structure(np.asarray, fn(x))
    times = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            tf.nest.map_structure(np.asarray, fn(x))
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["as is"])
    for name, ts in times.items():
        print(f"{args.model} b{batch} {name:20s} {statistics.median(ts) * 1000:8.1f} ms  ratio {statistics.median(ts) / base:.3f}")
    print(f"CPU flags: {cpu_flags_text()}; load average {tuple(round(v, 1) for v in __import__('os').getloadavg())}")


if __name__ == "__main__":
    main()
