"""kerasdet RetinaNet vs keras-hub's ``RetinaNetObjectDetector``, alternated in one process.

Both models: ResNet-50 (random init), FPN P3-P7 with P6 from C5 (RetinaNet paper; keras-hub
calls this ``use_p5=True``), 256-channel FPN, 4x256 subnets, 9 anchors, ``--num-classes``
classes, ``--size`` square input. keras-hub's is built from its config classes only
(``ResNetBackbone`` with the resnet_50 arguments, ``RetinaNetBackbone``,
``RetinaNetObjectDetector``): nothing is downloaded. Parameter counts are printed and
checked (they differ only by the conv biases of keras.applications' ResNet-50, which
kerasdet uses and keras-hub's ResNet does not have).

Timed, each model's calls alternating round by round, medians over ``--repeats`` rounds:

* predict latency, post-processing included on both sides (each model's ``predict_step``
  body in one ``tf.function``: keras-hub's anchor decoding + class-agnostic NMS, kerasdet's
  two-stage top-k + decode + per-class NMS), for each ``--batches`` and each ``--precisions`` (``bfloat16`` is
  keras-hub built under ``mixed_bfloat16`` vs kerasdet switched with
  :func:`kerasdet.precision.set_compute_dtype`);
* one training step (``train_on_batch``, SGD momentum) at ``--train-batch`` in float32
  (kerasdet as it trains, and the same model with its frozen BN folded into the convs in the
  training graph, which measured slower; ``--train-only``: only this);
* ``--savedmodel``: kerasdet's exported ``serving_default`` (loaded back with
  ``tf.saved_model.load``) vs the same model in-process (``make_serving_function``);
* ``--fold-bn``: kerasdet with its frozen BatchNorm folded into the convolutions
  (:func:`kerasdet.precision.fold_detector_batchnorm`), in the same rounds;
* ``--xla``: kerasdet's predict with the network XLA-compiled (``jit_compile=True``
  predict function; post-processing stays outside XLA) vs plain.

Prints each median and the ratio kerasdet / keras-hub, the fastest kerasdet serving path
vs keras-hub's float32 predict, and (``--json``) writes every figure to a file.

Usage (a quick run, ~5 min on 2 cores)::

    pip install -e ".[bench]"
    python benchmarks/vs_keras_hub.py --repeats 3 --batches 1 --precisions float32
    python benchmarks/vs_keras_hub.py  # full: batch 1 and 4, float32 and bfloat16, train b2
"""
import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from retinanet_speed import fake_batch  # noqa: E402  (benchmarks/, the script's folder, is on the path)


def keras_hub_retinanet(num_classes, dtype=None):
    """keras-hub's RetinaNet (ResNet-50, P3-P7, P6 from C5) from config, random weights."""
    import keras_hub

    encoder = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 128, 256, 512],
        stackwise_num_blocks=[3, 4, 6, 3], stackwise_num_strides=[1, 2, 2, 2], block_type="bottleneck_block",
        use_pre_activation=False, dtype=dtype,
    )
    backbone = keras_hub.models.RetinaNetBackbone(image_encoder=encoder, min_level=3, max_level=7, use_p5=True,
                                                  dtype=dtype)
    return keras_hub.models.RetinaNetObjectDetector(backbone=backbone, num_classes=num_classes, dtype=dtype)


def kerasdet_retinanet(num_classes, fold_train=False):
    """kerasdet's R50-FPN RetinaNet; ``fold_train``: its train step traced with the frozen BN
    folded into the convolutions (:func:`kerasdet.precision.fold_batchnorm_calls`)."""
    from kerasdet.backbones import resnet_backbone
    from kerasdet.models.retinanet import RetinaNet
    from kerasdet.precision import fold_batchnorm_calls

    class FoldedTrainRetinaNet(RetinaNet):
        def train_step(self, data):
            with fold_batchnorm_calls(self.backbone, only_frozen=True):
                return super().train_step(data)

    model = (FoldedTrainRetinaNet if fold_train else RetinaNet)(backbone=resnet_backbone(50), num_classes=num_classes)
    model.build()
    return model


def parameter_report(hub, kd):
    hub_parts = {
        "backbone": hub.backbone.image_encoder.count_params(),
        "fpn": hub.backbone.feature_pyramid.count_params(),
        "heads": hub.box_head.count_params() + hub.classification_head.count_params(),
    }
    kd_parts = {"backbone": kd.backbone.count_params(), "fpn": kd.fpn.count_params(),
                "heads": kd.head.count_params()}
    conv_biases = sum(
        int(np.prod(layer.bias.shape)) for layer in kd.backbone.layers
        if isinstance(layer, keras.layers.Conv2D) and layer.use_bias
    )
    hub_total, kd_total = hub.count_params(), kd.count_params()
    print(f"parameters: keras-hub {hub_total:,}  kerasdet {kd_total:,}  (kerasdet - keras-hub = "
          f"{kd_total - hub_total:,}; keras.applications ResNet-50 conv biases: {conv_biases:,})")
    for part in hub_parts:
        print(f"  {part:9s} keras-hub {hub_parts[part]:>12,}  kerasdet {kd_parts[part]:>12,}")
    assert kd_parts["fpn"] == hub_parts["fpn"] and kd_parts["heads"] == hub_parts["heads"], "FPN/heads differ"
    assert kd_total - hub_total == conv_biases, "models differ by more than the backbone conv biases"
    return {"keras_hub": hub_total, "kerasdet": kd_total, "backbone_conv_biases": conv_biases}


def alternate(fns, repeats, warmup=1):
    """Runs ``fns`` (name -> callable) round-robin; returns name -> list of seconds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def predict_fn(model):
    """The model's ``predict_step`` body as one ``tf.function``: forward pass plus its own
    post-processing (keras-hub: ``decode_predictions``, i.e. anchor decoding and NMS;
    kerasdet: ``detect``). keras-hub's ``predict_on_batch`` cannot be used: its
    ``decode_predictions`` unpacks the ``(x,)`` batch Keras hands it as ``(images, y)``."""
    if hasattr(model, "decode_predictions"):
        return tf.function(lambda x: model.decode_predictions(model(x, training=False), x))
    return tf.function(lambda x: model.detect(x))


def _block(outputs):
    return tf.nest.map_structure(lambda t: np.asarray(t), outputs)


def report(results, key, kd_name, hub_name, times, labels=("kerasdet", "keras-hub")):
    """Prints and records the medians of ``times[kd_name]`` and ``times[hub_name]`` and their
    ratio (first / second)."""
    kd_t, hub_t = statistics.median(times[kd_name]), statistics.median(times[hub_name])
    results[key] = {"first": labels[0], "second": labels[1], "first_s": kd_t, "second_s": hub_t,
                    "ratio": kd_t / hub_t, "first_all": times[kd_name], "second_all": times[hub_name]}
    print(f"{key:34s} {labels[0]} {kd_t * 1000:8.1f} ms   {labels[1]} {hub_t * 1000:8.1f} ms   "
          f"ratio {kd_t / hub_t:.3f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16"])
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--train-only", action="store_true", help="only the train-step rounds")
    parser.add_argument("--savedmodel", action="store_true", help="also time the exported SavedModel")
    parser.add_argument("--xla", action="store_true", help="also time kerasdet with an XLA-compiled network")
    parser.add_argument("--fold-bn", action="store_true",
                        help="also time kerasdet with its frozen BN folded into the convolutions")
    parser.add_argument("--json", help="write every figure to this file")
    args = parser.parse_args()

    from kerasdet.precision import fold_detector_batchnorm, set_compute_dtype

    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, CPUs: {os.cpu_count()}, "
          f"load average at start: {os.getloadavg()}")
    results = {"args": vars(args)}
    x_by_batch = {b: tf.constant(fake_batch(b, args.size, args.num_classes)[0]) for b in args.batches}

    keras.utils.set_random_seed(0)
    hub = keras_hub_retinanet(args.num_classes)
    kd = kerasdet_retinanet(args.num_classes)
    results["parameters"] = parameter_report(hub, kd)

    # Every predict variant is traced in its own precision up front (a tf.function keeps the
    # dtype it was traced with), then all of them alternate in the same rounds, so every
    # ratio below compares figures taken under the same machine load.
    variants = {}
    for precision in ([] if args.train_only else args.precisions):
        hub_p = hub if precision == "float32" else keras_hub_retinanet(args.num_classes, dtype="mixed_bfloat16")
        variants[f"keras-hub {precision}"] = predict_fn(hub_p)
        set_compute_dtype(kd, precision)
        variants[f"kerasdet {precision}"] = predict_fn(kd)
        for b in args.batches:
            variants[f"kerasdet {precision}"](x_by_batch[b])
        if args.fold_bn:
            folded = set_compute_dtype(fold_detector_batchnorm(kd), precision)
            variants[f"kerasdet folded-BN {precision}"] = predict_fn(folded)
    set_compute_dtype(kd, "float32")
    for b in ([] if args.train_only else args.batches):
        x = x_by_batch[b]
        times = alternate({name: (lambda fn=fn, x=x: _block(fn(x))) for name, fn in variants.items()}, args.repeats)
        for precision in args.precisions:
            report(results, f"predict {precision} b{b}", f"kerasdet {precision}", f"keras-hub {precision}", times)
            if args.fold_bn:
                report(results, f"predict {precision} folded-BN b{b}", f"kerasdet folded-BN {precision}",
                       f"keras-hub {precision}", times, labels=("kerasdet folded-BN", "keras-hub"))
                report(results, f"folded-BN / plain {precision} b{b}", f"kerasdet folded-BN {precision}",
                       f"kerasdet {precision}", times, labels=("folded-BN", "plain"))
        if "float32" in args.precisions:
            kd_names = [n for n in variants if n.startswith("kerasdet")]
            best = min(kd_names, key=lambda n: statistics.median(times[n]))
            key = f"fastest kerasdet vs keras-hub float32 b{b}"
            report(results, key, best, "keras-hub float32", times, labels=(best, "keras-hub float32"))

    if args.xla:
        xla_net = tf.function(lambda x: kd.forward(x, training=False), jit_compile=True)

        def xla_predict(x):
            class_logits, box_deltas, anchors = xla_net(x)
            return kd.postprocess(class_logits, box_deltas, anchors, image_shape=(args.size, args.size))

        plain = tf.function(lambda x: kd.detect(x, postprocessor=kd.postprocess))
        for b in args.batches:
            x = x_by_batch[b]
            times = alternate({"xla": lambda x=x: _block(xla_predict(x)), "plain": lambda x=x: _block(plain(x))},
                              args.repeats)
            report(results, f"kerasdet XLA net / plain b{b}", "xla", "plain", times, labels=("XLA", "plain"))

    if args.savedmodel:
        from kerasdet.export import export_saved_model, make_serving_function

        with tempfile.TemporaryDirectory() as tmp:
            export_saved_model(kd, tmp, image_size=(args.size, args.size))
            loaded = tf.saved_model.load(tmp).signatures["serving_default"]
            in_process = make_serving_function(kd, image_size=(args.size, args.size))
            for b in args.batches:
                u8 = tf.cast(x_by_batch[b], tf.uint8)
                times = alternate({"saved": lambda u8=u8: _block(loaded(images=u8)),
                                   "inproc": lambda u8=u8: _block(in_process(u8))}, args.repeats)
                report(results, f"SavedModel / in-process b{b}", "saved", "inproc", times,
                       labels=("SavedModel", "in-process"))

    if not args.skip_train:
        images, labels = fake_batch(args.train_batch, args.size, args.num_classes)
        hub_labels = {"boxes": np.where(labels["classes"][..., None] >= 0, labels["boxes"], -1.0).astype("float32"),
                      "labels": labels["classes"].astype("float32")}
        # keras-hub's PipelineModel.train_on_batch converts the label dict to one tensor and
        # fails; keras.Model.train_on_batch is what it would call (no preprocessor here).
        kd.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9))
        hub.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9))
        # the same model with its frozen BN folded into the convs inside the training graph
        # (kerasdet.precision.fold_batchnorm_calls(only_frozen=True)), same weights: the
        # experiment behind training NOT folding (it measured slower)
        kd_fold = kerasdet_retinanet(args.num_classes, fold_train=True)
        kd_fold.set_weights(kd.get_weights())
        kd_fold.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9))
        fns = {"kd": lambda: kd.train_on_batch(images, labels),
               "kd_fold": lambda: kd_fold.train_on_batch(images, labels),
               "hub": lambda: keras.Model.train_on_batch(hub, images, hub_labels)}
        times = alternate(fns, max(2, args.repeats), warmup=1)
        report(results, f"train step float32 b{args.train_batch}", "kd", "hub", times)
        report(results, f"train step frozen BN folded / as is b{args.train_batch}", "kd_fold", "kd", times,
               labels=("folded in training", "as is"))

    print(f"load average at end: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
