"""RetinaNet post-processing: two-stage top-k (kerasdet) vs one top-k over all pairs.

COCO-sized RetinaNet outputs at 512x512 (P3-P7, 9 anchors, 80 classes, random logits around
the prior), decode + per-class NMS with the default settings (1000 candidates per level,
score 0.05, IoU 0.5, 100 detections). ``DetectionPostProcessor`` (two-stage exact top-k:
over the per-anchor maxima, then over the kept anchors' pairs; sigmoid on the kept logits
only) is timed against the previous single top-k over all ``N x K`` sigmoid scores,
alternated, medians; detections are checked equal first.

Usage: ``python benchmarks/postprocess_speed.py [--repeats 10] [--batches 1 4]`` (~1 min).
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerasdet import boxes as box_ops  # noqa: E402
from kerasdet.anchors import AnchorGenerator  # noqa: E402
from kerasdet.layers.postprocess import DetectionPostProcessor  # noqa: E402


class SingleTopK(DetectionPostProcessor):
    """The previous candidate selection: sigmoid on every score, one top-k over N x K."""

    def _level_candidates(self, logits, deltas, anchors):
        probs = self._scores(logits)
        num_classes = probs.shape[-1]
        flat = tf.reshape(probs, [tf.shape(probs)[0], -1])
        scores, index = tf.math.top_k(flat, k=min(self.pre_nms_topk, flat.shape[1]), sorted=False)
        anchor_index = index // num_classes
        deltas = tf.gather(tf.cast(deltas, tf.float32), anchor_index, batch_dims=1)
        boxes = box_ops.decode(deltas, tf.gather(anchors, anchor_index), weights=self.box_weights)
        return boxes, scores, index % num_classes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--num-classes", type=int, default=80)
    args = parser.parse_args()
    print(f"TensorFlow {tf.__version__}, CPUs: {os.cpu_count()}, load average at start: {os.getloadavg()}")
    gen = AnchorGenerator(min_level=3, max_level=7, anchor_size=4.0, scales=(1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
                          aspect_ratios=(0.5, 1.0, 2.0))
    for batch in args.batches:
        rng = np.random.RandomState(0)
        logits, deltas, anchors = [], [], []
        for level in range(3, 8):
            side = args.size // 2**level
            n = side * side * 9
            logits.append(tf.constant(rng.normal(-4.6, 1.0, (batch, n, args.num_classes)).astype("float32")))
            deltas.append(tf.constant(rng.normal(0, 0.1, (batch, n, 4)).astype("float32")))
            anchors.append(gen.level_anchors(level, side, side))
        shape = (args.size, args.size)
        new, old = DetectionPostProcessor(), SingleTopK()
        fns = {"single": tf.function(lambda: old(logits, deltas, anchors, image_shape=shape)),
               "two-stage": tf.function(lambda: new(logits, deltas, anchors, image_shape=shape))}
        a, b = fns["single"](), fns["two-stage"]()
        np.testing.assert_array_equal(a["num_detections"], b["num_detections"])
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-6)
        times = {k: [] for k in fns}
        for r in range(args.repeats + 1):
            for k, fn in fns.items():
                t = time.perf_counter()
                tf.nest.map_structure(lambda v: v.numpy(), fn())
                if r:
                    times[k].append(time.perf_counter() - t)
        single, two = statistics.median(times["single"]), statistics.median(times["two-stage"])
        print(f"batch {batch}: decode+NMS single top-k {single * 1000:8.1f} ms, two-stage {two * 1000:8.1f} ms, "
              f"ratio {two / single:.3f} (same {int(b['num_detections'][0])} detections)", flush=True)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
