"""Does a frozen stem + stage 2 cost backward work? The R50-FPN RetinaNet train step as it is
(``freeze_at=2``: conv1 and res2 frozen, TF differentiates only towards trainable variables)
against the same model with an explicit ``stop_gradient`` on res2's output (the two stage-3
convs that read it see a gradient-free input), same weights, alternating rounds (medians).
Equal times: TensorFlow already does no backward work below stage 3.

Usage::

    python benchmarks/frozen_stem_speed.py --repeats 3 [--batch 2 --size 512]
"""
import argparse
import statistics
import time

import keras
import numpy as np
import tensorflow as tf

from machine import cpu_flags_text  # noqa: E402  (benchmarks/, the script's folder, is on the path)
from retinanet_speed import fake_batch  # noqa: E402

#: the layers of keras.applications' ResNet-50 that read res2's output (C2)
STAGE3_INPUTS = ("conv3_block1_1_conv", "conv3_block1_0_conv")


def build(cut):
    from kerasdet.backbones import resnet_backbone
    from kerasdet.models.retinanet import RetinaNet

    class CutRetinaNet(RetinaNet):
        def train_step(self, data):
            layers = [self.backbone.get_layer(n) for n in STAGE3_INPUTS]
            for layer in layers:
                original = type(layer).call.__get__(layer)
                object.__setattr__(layer, "call", lambda x, *a, _f=original, **k: _f(tf.stop_gradient(x), *a, **k))
            try:
                return super().train_step(data)
            finally:
                for layer in layers:
                    object.__delattr__(layer, "call")

    model = (CutRetinaNet if cut else RetinaNet)(backbone=resnet_backbone(50), num_classes=80)
    model.build()
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9))
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)
    plain, cut = build(False), build(True)
    cut.set_weights(plain.get_weights())
    images, labels = fake_batch(args.batch, args.size, 80)
    frozen = [l.name for l in plain.backbone.layers if l.weights and not l.trainable]
    print(f"frozen backbone layers with weights: {len(frozen)} (conv1 + res2 + every BN)")
    fns = {"as is": lambda: plain.train_on_batch(images, labels),
           "stop_gradient at res2": lambda: cut.train_on_batch(images, labels)}
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    a, b = statistics.median(times["as is"]), statistics.median(times["stop_gradient at res2"])
    print(f"train step b{args.batch} {args.size}²: as is {a:.2f} s, stop_gradient at res2 {b:.2f} s, ratio {a / b:.3f}")
    print(f"CPU flags: {cpu_flags_text()}; load average {tuple(round(v, 1) for v in __import__('os').getloadavg())}")


if __name__ == "__main__":
    main()
