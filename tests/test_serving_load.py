"""Load: 8 threads call one loaded model's ``encoded_image`` signature with mixed-size
batches (as TF Serving's worker threads share one session) for a bounded number of
requests: every answer equals the sequential answer for that request, none is lost, and
throughput and tail latency are reported (printed; run with ``-s`` to see them)."""
import concurrent.futures
import time

import numpy as np
import tensorflow as tf

from test_serving import exported_family, png

THREADS = 8
REQUESTS = 48


def _requests(seed=0):
    """``REQUESTS`` batches of 1-4 PNGs, sizes 16..160 px, all different."""
    rng = np.random.RandomState(seed)
    batches = []
    for _ in range(REQUESTS):
        sizes = [(int(rng.randint(16, 161)), int(rng.randint(16, 161))) for _ in range(int(rng.randint(1, 5)))]
        batches.append([png(rng.randint(0, 256, (h, w, 3)).astype(np.uint8)) for h, w in sizes])
    return batches


def test_eight_threads_get_the_sequential_answers(tmp_path_factory):
    ex = exported_family("retinanet", tmp_path_factory)
    fn = ex.loaded.signatures["encoded_image"]
    batches = _requests()

    def call(i):
        start = time.perf_counter()
        out = fn(image_bytes=tf.constant(batches[i]))
        return i, {k: v.numpy() for k, v in out.items()}, time.perf_counter() - start

    sequential = {i: call(i)[1] for i in range(REQUESTS)}
    assert sum(int(o["num_detections"].sum()) for o in sequential.values()) > 0
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        answers = list(pool.map(call, range(REQUESTS)))
    wall = time.perf_counter() - start
    assert sorted(i for i, _, _ in answers) == list(range(REQUESTS))  # none lost, none duplicated
    for i, out, _ in answers:
        assert set(out) == set(sequential[i])
        for key, value in out.items():
            np.testing.assert_array_equal(value, sequential[i][key], err_msg=f"request {i} {key}")
        np.testing.assert_array_equal(out["image_shapes"][:, 0] > 0, True)
    latencies = np.array([t for _, _, t in answers]) * 1000
    images = sum(len(b) for b in batches)
    print(f"\n{THREADS} threads, {REQUESTS} requests ({images} images, 1-4 per request, 16-160 px): "
          f"{REQUESTS / wall:.1f} requests/s, {images / wall:.1f} images/s, latency p50 "
          f"{np.percentile(latencies, 50):.0f} ms, p99 {np.percentile(latencies, 99):.0f} ms, "
          f"max {latencies.max():.0f} ms")
