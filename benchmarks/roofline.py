"""How close the RetinaNet forward pass is to this machine's float32 peak.

1. Peak: the best median throughput of TensorFlow float32 kernels that run at the
   machine's limit (a square ``tf.matmul`` of ``--matmul-size`` and the RetinaNet head's own
   3x3 256->256 convolution on a 64x64 map, batch 1 and 4), in GFLOP/s.
2. FLOPs of the forward pass, counted two ways on the traced graph at ``--size`` (static
   shape, batch 1): TensorFlow's profiler (``tf.compat.v1.profiler`` ``float_operation``:
   every op with registered FLOP statistics) and by summing ``2 * out_pixels * kh * kw *
   c_in * c_out`` over the graph's Conv2D/MatMul nodes. A multiply-add counts as 2 FLOPs.
3. Achieved: FLOPs / median forward latency, and its fraction of the peak, for kerasdet's
   RetinaNet network (backbone + FPN + heads), its full predict (plus decode and NMS), and
   (with ``keras-hub`` installed, ``--keras-hub``) keras-hub's RetinaNet forward. The peak
   kernels and the forward passes are timed alternately in the same rounds.

Usage: ``python benchmarks/roofline.py [--repeats 5] [--size 512] [--batch 1] [--keras-hub]``
(~3 min on 2 cores at 512x512).
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def _median_times(fns, repeats, warmup=2):
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _block(out):
    return tf.nest.map_structure(lambda t: t.numpy(), out)


def peak_kernels(matmul_size):
    """Large float32 kernels that run at the machine's limit: name -> (callable, FLOPs)."""
    rng = np.random.RandomState(0)
    n = matmul_size
    a = tf.constant(rng.standard_normal((n, n)).astype("float32"))
    b = tf.constant(rng.standard_normal((n, n)).astype("float32"))
    matmul = tf.function(lambda: tf.matmul(a, b))
    kernel = tf.constant(rng.standard_normal((3, 3, 256, 256)).astype("float32") * 0.01)
    kernels = {f"matmul {n}x{n}": (lambda: matmul().numpy(), 2.0 * n**3)}
    for batch in (1, 4):
        x = tf.constant(rng.standard_normal((batch, 64, 64, 256)).astype("float32"))
        conv = tf.function(lambda x=x: tf.nn.conv2d(x, kernel, 1, "SAME"))
        kernels[f"conv3x3 256->256 64x64 b{batch}"] = (lambda conv=conv: conv().numpy(),
                                                        2.0 * batch * 64 * 64 * 9 * 256 * 256)
    return kernels


def count_flops(concrete):
    """(profiler FLOPs, Conv2D+MatMul FLOPs counted from node shapes) of a concrete function."""
    graph = concrete.graph
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    prof = tf.compat.v1.profiler.profile(graph, options=opts)
    profiler_flops = float(prof.total_float_ops)
    conv_flops = 0.0
    for op in graph.get_operations():
        if op.type in ("Conv2D", "DepthwiseConv2dNative"):
            k = op.inputs[1].shape.as_list()  # kh, kw, cin, cout (or multiplier)
            out = op.outputs[0].shape.as_list()
            if None in k or None in out:
                raise ValueError(f"{op.name}: dynamic shape, trace with a static input signature")
            per_out = k[0] * k[1] * (k[2] if op.type == "Conv2D" else 1)
            conv_flops += 2.0 * np.prod(out) * per_out
        elif op.type in ("MatMul", "BatchMatMulV2"):
            a = op.inputs[0].shape.as_list()
            out = op.outputs[0].shape.as_list()
            conv_flops += 2.0 * np.prod(out) * a[-1]
    return profiler_flops, conv_flops


def _gradient_function(model, spec):
    """Forward in training mode + gradients of the summed outputs (the conv/matmul work of a
    train step without its loss, target assignment and optimizer update)."""
    variables = model.trainable_variables

    @tf.function(input_signature=[spec])
    def grads(x):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = tf.add_n([tf.reduce_sum(tf.cast(t, tf.float32)) for t in tf.nest.flatten(out)])
        return [g for g in tape.gradient(loss, variables) if g is not None]

    return grads


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--keras-hub", action="store_true", help="also measure keras-hub's RetinaNet")
    parser.add_argument("--train", action="store_true",
                        help="also the training computation: forward (training=True) + gradients of a sum of "
                             "the head outputs w.r.t. the trainable variables (each model's own frozen/trainable "
                             "split; no loss, matching or optimizer update), FLOPs counted on its graph")
    args = parser.parse_args()

    import keras

    from vs_keras_hub import kerasdet_retinanet, keras_hub_retinanet  # benchmarks/ (the script's folder)

    print(f"TensorFlow {tf.__version__}, CPUs: {os.cpu_count()}, load average at start: {os.getloadavg()}")
    keras.utils.set_random_seed(0)
    kd = kerasdet_retinanet(args.num_classes)
    spec = tf.TensorSpec([args.batch, args.size, args.size, 3], tf.float32)
    net = tf.function(lambda x: kd(x, training=False), input_signature=[spec])
    predict = tf.function(lambda x: kd.detect(x), input_signature=[spec])
    fns = {"kerasdet network": net, "kerasdet predict": predict}
    if args.keras_hub:
        hub = keras_hub_retinanet(args.num_classes)
        fns["keras-hub network"] = tf.function(lambda x: hub(x, training=False), input_signature=[spec])
    if args.train:
        fns["kerasdet train fwd+bwd"] = _gradient_function(kd, spec)
        if args.keras_hub:
            fns["keras-hub train fwd+bwd"] = _gradient_function(hub, spec)
    flops = {}
    for name, fn in fns.items():
        profiler_flops, conv_flops = count_flops(fn.get_concrete_function())
        flops[name] = profiler_flops
        print(f"{name:18s} FLOPs: profiler {profiler_flops / 1e9:8.2f} G, Conv2D/MatMul nodes {conv_flops / 1e9:8.2f} G")
    x = tf.constant(np.random.RandomState(0).uniform(0, 255, (args.batch, args.size, args.size, 3)).astype("float32"))
    # Peak kernels and forward passes alternate round by round, so a varying load on a
    # shared machine hits both sides of the fraction alike.
    kernels = peak_kernels(args.matmul_size)
    timed = {k: fn for k, (fn, _) in kernels.items()}
    timed.update({k: (lambda f=f: _block(f(x))) for k, f in fns.items()})
    times = _median_times(timed, args.repeats)
    rates = {k: kernels[k][1] / times[k] / 1e9 for k in kernels}
    for name, rate in rates.items():
        print(f"peak kernel {name:32s} {rate:7.1f} GFLOP/s")
    peak = max(rates.values())
    print(f"float32 peak (best kernel): {peak:.1f} GFLOP/s")
    for name in fns:
        achieved = flops[name] / times[name] / 1e9
        print(f"{name:18s} {times[name] * 1000:8.1f} ms  {achieved:7.1f} GFLOP/s  = {achieved / peak:.3f} of peak")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
