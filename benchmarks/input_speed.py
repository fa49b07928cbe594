"""Input pipeline speed: images/s of COCO-like 640x480 JPEGs resized to 800/1333 (issue 22).

Generates (once, locally, no download) ``--num-images`` 640x480 JPEGs with random boxes
(a COCO JSON, ``cv2.imencode`` quality 90) in a temp dir and measures training batches of
``--batch-size`` images (flip on, canvas 896x1152: the 800x1067 resized images padded to a
multiple of 128) through:

* ``opencv``: the pipeline before graph decoding (``make_dataset(decoder="opencv")``:
  OpenCV in a ``tf.numpy_function``),
* ``graph``: graph-native decoding (``make_dataset(decoder="tf")``, the default),
* ``tfrecord``: the same images as 4 TFRecord shards (``make_tfrecord_dataset``),
* ``service``: the graph pipeline on a tf.data service with a dispatcher and two workers
  on loopback (in this process, on the same cores),

then the images/s an R50-FPN RetinaNet train step consumes at that batch and size
(random weights, 80 classes; ``--skip-train`` leaves it out). Prints one table with the
ratios to ``opencv`` and the CPU flags; ``--output`` writes the figures as JSON.

Usage::

    python benchmarks/input_speed.py [--num-images 200] [--batches 40] [--batch-size 2]
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np
from machine import cpu_flags_text  # noqa: E402  (benchmarks/, the script's folder, is on the path)

IMAGE_SIZE = (896, 1152)


def make_set(root, num_images, seed=0):
    import cv2

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images, anns = [], []
    base = cv2.resize(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8), (640, 480), interpolation=cv2.INTER_CUBIC)
    for i in range(num_images):
        noise = rng.integers(0, 40, (480, 640, 3), dtype=np.uint8)
        pixels = cv2.add(np.roll(base, i * 7, axis=1), noise)  # photo-like: smooth + grain
        name = f"{i:06d}.jpg"
        cv2.imwrite(os.path.join(root, "images", name), pixels, [cv2.IMWRITE_JPEG_QUALITY, 90])
        images.append({"id": i + 1, "file_name": name, "height": 480, "width": 640})
        for _ in range(int(rng.integers(1, 8))):
            x, y = rng.uniform(0, 560), rng.uniform(0, 400)
            w, h = rng.uniform(10, 640 - x), rng.uniform(10, 480 - y)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(rng.integers(1, 81)),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    path = os.path.join(root, "instances.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns,
                   "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 81)]}, f)
    return path, os.path.join(root, "images")


def images_per_s(ds, batches, batch_size, warmup=5):
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        x, _ = next(it)
        x.numpy()
    return batches * batch_size / (time.perf_counter() - t)


def train_images_per_s(batch_size, steps=3):
    import keras
    import tensorflow as tf

    from kerasdet.engine.recipes import load_recipe

    recipe = load_recipe("retinanet")
    config = recipe.config("paper", {"input.image_size": list(IMAGE_SIZE), "train.batch_size": batch_size})
    keras.utils.set_random_seed(0)
    model = recipe.build_model(config, 80)
    model.build((None, *IMAGE_SIZE, 3))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1e-3, momentum=0.9))
    x = tf.random.uniform((batch_size, *IMAGE_SIZE, 3), 0, 255)
    y = {"boxes": tf.constant([[[100.0, 100.0, 400.0, 500.0]] * 4] * batch_size),
         "classes": tf.constant([[1, 2, -1, -1]] * batch_size, tf.int32),
         "is_crowd": tf.zeros((batch_size, 4), tf.bool),
         "image_id": tf.range(batch_size, dtype=tf.int64)}
    model.train_on_batch(x, y)  # trace + first step
    t = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return steps * batch_size / (time.perf_counter() - t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--batches", type=int, default=40, help="timed batches per arm (after 5 warm-up ones)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--arms", nargs="+", default=["opencv", "graph", "tfrecord", "service"])
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--output", default=None, help="write the figures as JSON")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from kerasdet.data.coco import load_coco
    from kerasdet.data.pipeline import make_dataset
    from kerasdet.data.tfrecord import load_tfrecord_source, make_tfrecord_dataset, write_tfrecords

    tmp = tempfile.mkdtemp(prefix="kerasdet_input_speed_")
    ann, image_dir = make_set(tmp, args.num_images)
    source = load_coco(ann, image_dir, check_images="exists")
    common = dict(batch_size=args.batch_size, image_size=IMAGE_SIZE, min_size=800, max_size=1333,
                  training=True, flip=True, seed=0)
    results = {"cpu_flags": cpu_flags_text(), "cores": os.cpu_count(), "num_images": args.num_images,
               "batch_size": args.batch_size, "image_size": list(IMAGE_SIZE), "images_per_s": {}}
    for arm in args.arms:
        if arm in ("opencv", "graph"):
            ds = make_dataset(source, repeat=True, decoder="tf" if arm == "graph" else "opencv", **common)
        elif arm == "tfrecord":
            write_tfrecords(source, os.path.join(tmp, "records", "train"), num_shards=4)
            pattern = os.path.join(tmp, "records", "train-*")
            cats = load_tfrecord_source(pattern).category_ids
            ds = make_tfrecord_dataset(pattern, category_ids=cats, shuffle_buffer_size=64, **common)
        elif arm == "service":
            svc = tf.data.experimental.service
            dispatcher = svc.DispatchServer(svc.DispatcherConfig(port=0, protocol="grpc"))
            address = dispatcher.target.split("://", 1)[1]
            workers = [svc.WorkerServer(svc.WorkerConfig(dispatcher_address=address, port=0, protocol="grpc"))
                       for _ in range(2)]
            ds = make_dataset(source, repeat=True, data_service=dispatcher.target, **common)
        else:
            raise SystemExit(f"unknown arm {arm}")
        results["images_per_s"][arm] = images_per_s(ds, args.batches, args.batch_size)
        print(f"{arm}: {results['images_per_s'][arm]:.1f} images/s", flush=True)
        del ds
        if arm == "service":
            for w in workers:
                w.stop()
            dispatcher.stop()
    if not args.skip_train:
        results["images_per_s"]["r50_fpn_train_step"] = train_images_per_s(args.batch_size)
    base = results["images_per_s"].get("opencv")
    print(f"\nCPU flags: {results['cpu_flags']}; {results['cores']} cores; {args.num_images} JPEGs 640x480 -> "
          f"800/1333 on a {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} canvas, batch {args.batch_size}")
    print(f"{'arm':<20} {'images/s':>9} {'x opencv':>9}")
    for arm, v in results["images_per_s"].items():
        print(f"{arm:<20} {v:9.2f} {v / base if base else float('nan'):9.2f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
