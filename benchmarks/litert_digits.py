"""LiteRT export of the digits RetinaNet: COCO AP, closeness to ``predict``, size, latency.

In one run, on the validation split of a finished run (default the main job's
``runs/retinanet_digits``, written by ``python recipes/retinanet.py --preset digits``):

* the Keras model's ``predict`` path (combined NMS, the default) and the same model traced
  with the LiteRT backends (padded NMS; :func:`kerasdet.litert.builtin_ops`);
* the float32 and dynamic-range int8 ``.tflite`` files run with the LiteRT interpreter.

For each: pycocotools AP / AP50 / AP75, and against the in-process padded-NMS graph the
largest box difference (network pixels) and score difference over the detections of the
images whose detection count matches, plus the number of images whose detections
(count and classes) match exactly. Then file sizes and batch-1 latency (median and p90
over the validation images, after 5 warm-up calls; the interpreter with ``--threads``
threads, TensorFlow with its default pools).

    PYTHONPATH=$PWD python benchmarks/litert_digits.py [--run runs/retinanet_digits] [--threads 2]

Writes ``benchmarks/results/litert_digits/results.json``.
"""
import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
from machine import cpu_flags_text  # noqa: E402  (benchmarks/, the script's folder, is on the path)

HERE = os.path.dirname(os.path.abspath(__file__))


def _percentiles(times):
    times = np.asarray(times) * 1000.0
    return float(np.median(times)), float(np.percentile(times, 90))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/retinanet_digits")
    p.add_argument("--threads", type=int, default=2, help="LiteRT interpreter threads (default 2)")
    p.add_argument("--output", default=os.path.join(HERE, "results", "litert_digits", "results.json"))
    args = p.parse_args(argv)

    import tensorflow as tf

    from kerasdet.engine import builders
    from kerasdet.engine.runner import load_run, val_source_of_run
    from kerasdet.evaluation.coco_eval import CocoEvaluator
    from kerasdet.export import make_serving_function
    from kerasdet.litert import builtin_ops, export_litert, load_litert

    _, config, model, record = load_run(args.run)
    source = val_source_of_run(config, record)
    dataset = builders.build_dataset(config, source, training=False)
    ids = record["label_map"]["category_ids"]
    height, width = config.input.image_size
    batches = [(images.numpy(), {k: v.numpy() for k, v in labels.items()}) for images, labels in dataset]
    for images, _ in batches:
        if not np.array_equal(images, np.round(images)):
            raise SystemExit("validation canvases are not whole grey levels: this benchmark feeds uint8 images")

    keras_fn = make_serving_function(model, image_size=(height, width), category_ids=ids)
    with builtin_ops(model):
        padded_fn = make_serving_function(model, image_size=(height, width), category_ids=ids)
        padded_fn.get_concrete_function()

    tmp = tempfile.mkdtemp(prefix="litert_digits_")
    files = {q: export_litert(model, os.path.join(tmp, f"retinanet_{q}"), image_size=(height, width),
                              quantization=q, category_ids=ids) for q in ("float32", "dynamic_int8")}
    runners = {q: load_litert(f, num_threads=args.threads) for q, f in files.items()}

    def tf_arm(fn):
        return lambda image: {k: v.numpy() for k, v in fn(tf.constant(image[None])).items()}

    arms = {"keras predict (combined NMS)": tf_arm(keras_fn), "keras, LiteRT backends (padded NMS)": tf_arm(padded_fn),
            "LiteRT float32": lambda image: runners["float32"](image),
            "LiteRT dynamic int8": lambda image: runners["dynamic_int8"](image)}
    index_of = {c: i for i, c in enumerate(ids)}
    outputs = {name: [] for name in arms}
    rows = {}
    for name, fn in arms.items():
        evaluator = CocoEvaluator(source)
        for _ in range(5):
            fn(batches[0][0][0].astype(np.uint8))
        times = []
        for images, labels in batches:
            for i in range(len(images)):
                image = images[i].astype(np.uint8)
                start = time.perf_counter()
                out = fn(image)
                times.append(time.perf_counter() - start)
                outputs[name].append(out)
                n = int(out["num_detections"][0])
                boxes = out["detection_boxes"][0] * np.array([height, width, height, width], np.float32)
                classes = np.array([index_of.get(int(c), -1) for c in out["detection_classes"][0]], np.int32)
                evaluator.update(labels["image_id"][i:i + 1], boxes[None], out["detection_scores"][0][None],
                                 classes[None], np.array([n]), labels["image_scale"][i:i + 1])
        stats = evaluator.evaluate()
        median, p90 = _percentiles(times)
        rows[name] = {"AP": stats["AP"], "AP50": stats["AP50"], "AP75": stats["AP75"], "latency_ms_median": median,
                      "latency_ms_p90": p90, "images": len(times)}

    ref = outputs["keras, LiteRT backends (padded NMS)"]
    for name in arms:
        same, box_diff, score_diff = 0, 0.0, 0.0
        for a, b in zip(outputs[name], ref):
            n = int(b["num_detections"][0])
            if int(a["num_detections"][0]) != n:
                continue
            if np.array_equal(a["detection_classes"][0, :n], b["detection_classes"][0, :n]):
                same += 1
            scale = np.array([height, width, height, width], np.float32)
            box_diff = max(box_diff, float(np.abs((a["detection_boxes"][0, :n] - b["detection_boxes"][0, :n]) * scale).max(initial=0)))
            score_diff = max(score_diff, float(np.abs(a["detection_scores"][0, :n] - b["detection_scores"][0, :n]).max(initial=0)))
        rows[name].update({"images_same_detections": same, "max_box_diff_px": box_diff, "max_score_diff": score_diff})
    for q, f in files.items():
        rows[f"LiteRT {'float32' if q == 'float32' else 'dynamic int8'}"]["file_bytes"] = os.path.getsize(f)

    print(f"RetinaNet digits ({args.run}), {len(ref)} validation images at {height}x{width}, batch 1; "
          f"CPU {platform.processor() or platform.machine()} [{cpu_flags_text()}], {os.cpu_count()} cores; "
          f"LiteRT threads {args.threads}")
    header = f"{'arm':<38} {'AP':>6} {'AP50':>6} {'AP75':>6} {'same':>5} {'box px':>8} {'score':>8} " \
             f"{'ms med':>7} {'ms p90':>7} {'MB':>6}"
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        mb = f"{r['file_bytes'] / 2**20:6.2f}" if "file_bytes" in r else f"{'':>6}"
        print(f"{name:<38} {r['AP']:6.3f} {r['AP50']:6.3f} {r['AP75']:6.3f} {r['images_same_detections']:5d} "
              f"{r['max_box_diff_px']:8.2g} {r['max_score_diff']:8.2g} {r['latency_ms_median']:7.2f} "
              f"{r['latency_ms_p90']:7.2f} {mb}")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"run": args.run, "cpu_flags": cpu_flags_text(), "threads": args.threads, "image_size": [height, width],
                   "arms": rows}, f, indent=2)
    print(f"written {args.output}")
    return rows


if __name__ == "__main__":
    main()
