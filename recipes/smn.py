"""Spatial Memory Network (seed 000, spec ``000_smn.md``): stage-wise training recipe.

SMN is trained in stages (Sec. 5.4): the base C4 Faster R-CNN first, then the memory with
the base frozen, with the unroll length grown N = 2 -> 5 -> 10 (spec §2.4: de-duplication
is learned in the short rollouts, then longer ones are bootstrapped). The generic CLI
trainer does one ``fit``, so this recipe has its own :func:`train_stages` flow, which
``python recipes/smn.py --preset <name>`` runs:

1. ``stages[0]`` (``kind: "base"``): build and fit the FasterRCNN (``config["base"]``
   arguments on ``config["backbone"]``) with that stage's optimizer/schedule.
2. Each following stage (``kind: "memory"``): ``SMN.configure(num_steps=N)`` and a fresh
   ``fit`` of the memory weights (the base is frozen; a new optimizer per stage, as a new
   30k-iteration run per stage in the paper).
3. Evaluate (pycocotools) and save ``<work-dir>/model.weights.h5`` (the SMN, base
   included), so ``kerasdet evaluate|export --recipe smn --preset ... --weights ...`` work
   (``build_model`` builds the same SMN; with ``model.base_weights`` set, a base trained
   elsewhere is loaded and one CLI ``fit`` trains the memory alone).

Presets:

* ``paper`` (Sec. 5.5, spec §2.5): VGG16 ``conv5_3`` C4 base (tf-faster-rcnn: crop pool
  14 -> 7, fc6/fc7 4096 with dropout 0.5, RPN 512 channels, anchors 128-512 px (scales
  8/16/32 x 16) x 3 ratios, 256 anchors / 256 RoIs at 0.25 foreground, 2000 train / 300
  test proposals at NMS 0.7, test NMS 0.3), shorter side 600 / longer <= 1000, flip,
  SGD momentum 0.9, weight decay 5e-4, 1 image per step; base 70k iterations (VOC07,
  x0.1 at 50k), then each memory stage 30k iterations at lr 1e-3, x0.1 after 20k, N = 2,
  5, 10; inference N1 = 50 base writes + N2 = 10 memory steps, SoftMax, D = 256, 20x20
  prior, 14x14 write crop, 2 x fc2048, gates 256. Needs COCO-format data on disk
  (``--set data.train_annotations=...``; VGG16 ImageNet weights via
  ``--set backbone.weights=...``). Stage lengths are in steps (``fit_stage`` runs one
  ``fit`` of that many steps on the infinite training stream).
* ``digits``: the same model scaled to the embedded 128x128 digits set and a 2-core CPU:
  the small residual backbone's C4 (stride 16, 8x8 map), 9 anchors of 16-48 px, 64
  training / 64 test proposals, crop pool 14 -> 7, 2 x fc256; memory D = 64 (20x20 prior,
  64-channel gates), a 7x7 write crop and a 7x7 memory RoI crop without max-pool (the
  map is only 8x8: the paper's 14x14 would upsample 2x for 4x the cost), context net
  5 x 64, m-fc 2 x 256, fusion 256, 32 RoIs and 64 anchors per image and step; N1 = 5
  base writes (1-4 digits per image) + N2 = 5 memory steps. Adam. Base 2 + 2 epochs (2e-3 then 1e-3, each x0.1 at 75%; the
  C4 model on an 8x8 map learns slower than the FPN preset: AP 0.24 after 2 epochs, 0.52
  after 4); memory
  N = 2 / 5 / 10 for 100 / 75 / 50 steps of 16 images (0.9 epoch in all: an unrolled
  N = 10 step costs ~4-7 s on the loaded 2-core CPU, and tracing the unrolled graph
  minutes). The MLP control (``model.context = "mlp"``) trains one 225-step memory stage
  (the same number of memory-training steps and images).

Measured (``benchmarks/smn_digits.py``, 500 validation images, pycocotools; the base's 4
epochs ran as 2 + 2 from its saved weights, ``--base-continue 2``): base AP 0.523 / AP50
0.777 (0.517 / 0.765 at top-10), SMN N = 10 steps without any NMS 0.509 / 0.762 with 22
same-class duplicates (score >= 0.3) against 3046 for the base's top-10 without NMS
(AP 0.285), SMN final (N1 5 + N2 5) 0.503 / 0.741, MLP control 0.537 / 0.798. Memory
training 4.6 min, MLP 1.5 min, base 20.6 min on the shared, loaded 2-core CPU.

Run: ``python recipes/smn.py --preset digits [--work-dir runs/smn_digits]``.
"""
import argparse
import json
import logging
import os
import sys
import time

logger = logging.getLogger("kerasdet.recipes.smn")

_PAPER = {
    "data": {
        "kind": "coco",
        "train_annotations": "coco/annotations/instances_train2017.json",
        "train_images": "coco/train2017",
        "val_annotations": "coco/annotations/instances_val2017.json",
        "val_images": "coco/val2017",
    },
    "input": {"image_size": (1008, 1008), "min_size": 600, "max_size": 1000, "flip": True},
    "backbone": {"name": "vgg16", "weights": None, "output_layers": ("block5_conv3",)},
    "base": {
        "architecture": "c4", "feature_level": 4, "roi_pooler": "crop_pool", "crop_size": 14, "fc_dim": 4096,
        "num_fc": 2, "dropout": 0.5, "rpn_channels": 512, "anchor_size": 1.0, "scales": (8.0, 16.0, 32.0),
        "rpn_batch_size": 256, "rpn_pre_nms_topk_train": 12000, "rpn_post_nms_topk_train": 2000,
        "rpn_pre_nms_topk_test": 6000, "rpn_post_nms_topk_test": 300, "num_rois": 256,
        "nms_iou_threshold": 0.3, "box_weights": (10.0, 10.0, 5.0, 5.0),
    },
    "model": {  # every SMN default is the paper's
        "num_steps": 10, "num_base_writes": 50, "num_memory_steps": 10, "inference": "final",
        "selection": "softmax",
    },
    # lr / epochs: only for the generic one-fit ``kerasdet train --recipe smn`` (memory with
    # ``model.base_weights``); the stages below carry their own.
    "train": {"batch_size": 1, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "warmup_steps": 0,
              "lr": 1e-3, "epochs": 1},
    "stages": [
        {"kind": "base", "steps": 70000, "lr": 1e-3, "decay_steps": (50000,)},
        {"kind": "memory", "num_steps": 2, "steps": 30000, "lr": 1e-3, "decay_steps": (20000,)},
        {"kind": "memory", "num_steps": 5, "steps": 30000, "lr": 1e-3, "decay_steps": (20000,)},
        {"kind": "memory", "num_steps": 10, "steps": 30000, "lr": 1e-3, "decay_steps": (20000,)},
    ],
    "eval": {"batch_size": 1},
}

_DIGITS = {
    "data": {
        "kind": "digits",
        "dir": os.path.join("data", "digits"),
        "generate": {"num_train": 4000, "num_val": 500, "image_size": (128, 128), "seed": 0},
    },
    "input": {"image_size": (128, 128), "flip": False, "cache_images": True, "max_boxes": 8},
    "backbone": {"name": "small", "widths": (32, 64, 96, 128), "blocks": (1, 1, 2, 1), "levels": ("C4",)},
    "base": {
        "architecture": "c4", "feature_level": 4, "roi_pooler": "crop_pool", "crop_size": 14, "fc_dim": 256,
        "rpn_channels": 64, "anchor_size": 1.0, "scales": (1.0, 2.0, 3.0), "rpn_batch_size": 128,
        "rpn_pre_nms_topk_train": 1000, "rpn_post_nms_topk_train": 64, "rpn_pre_nms_topk_test": 1000,
        "rpn_post_nms_topk_test": 64, "rpn_min_size": 2.0, "num_rois": 64, "score_threshold": 0.01,
    },
    "model": {
        "num_steps": 10, "num_base_writes": 5, "num_memory_steps": 5, "inference": "final", "selection": "softmax",
        "memory_channels": 64, "crop_size": 7, "memory_roi_crop": 7, "memory_roi_pool": 1,
        "memory_rpn_channels": 64, "memory_fc_dim": 256, "fusion_dim": 256, "num_rois": 32, "rpn_batch_size": 64,
        "score_threshold": 0.01,
    },
    "train": {"batch_size": 16, "optimizer": "adam", "weight_decay": 1e-5, "warmup_steps": 100, "lr": 1e-3,
              "epochs": 1},
    "stages": [
        {"kind": "base", "epochs": 2, "lr": 2e-3, "decay_at": (0.75,)},
        {"kind": "base", "epochs": 2, "lr": 1e-3, "decay_at": (0.75,), "warmup_steps": 0},
        {"kind": "memory", "num_steps": 2, "steps": 100, "lr": 1e-3, "decay_at": (), "warmup_steps": 20},
        {"kind": "memory", "num_steps": 5, "steps": 75, "lr": 1e-3, "decay_at": (), "warmup_steps": 0},
        {"kind": "memory", "num_steps": 10, "steps": 50, "lr": 1e-3, "decay_at": (0.7,), "warmup_steps": 0},
    ],
    "mlp_stages": [
        {"kind": "memory", "num_steps": 1, "steps": 225, "lr": 1e-3, "decay_at": (0.9,), "warmup_steps": 20},
    ],
    "eval": {"every_n_epochs": 100, "batch_size": 50},
}

PRESETS = {"paper": _PAPER, "digits": _DIGITS}


def build_base(config, num_classes):
    """The C4 FasterRCNN of ``config["base"]`` on ``config["backbone"]``."""
    from kerasdet.backbones import get_backbone
    from kerasdet.models.faster_rcnn import FasterRCNN

    backbone_args = dict(config["backbone"])
    name = backbone_args.pop("name")
    return FasterRCNN(backbone=get_backbone(name, **backbone_args), num_classes=num_classes,
                      weight_decay=config["train"].get("weight_decay", 5e-4), **config["base"])


def build_model(config, num_classes):
    """SMN (or its MLP control, ``model.context = "mlp"``) on a C4 base. With
    ``model.base_weights`` the base loads those trained weights first."""
    from kerasdet.models.smn import SMN

    model_args = dict(config["model"])
    base_weights = model_args.pop("base_weights", None)
    base = build_base(config, num_classes)
    size = config["input"]["image_size"]
    base.build((None, size[0], size[1], 3))
    if base_weights:
        base.load_weights(base_weights)
    return SMN(base=base, weight_decay=config["train"].get("weight_decay", 5e-4), **model_args)


def stage_steps(stage, steps_per_epoch, scale=1.0):
    """Training steps of a stage: ``steps``, or ``epochs`` (may be fractional) x the epoch."""
    steps = stage["steps"] if "steps" in stage else stage["epochs"] * steps_per_epoch
    return max(1, int(round(steps * scale)))


def stage_optimizer(config, stage, total_steps):
    """The optimizer of one stage (the house ``make_optimizer`` on the stage's schedule:
    ``decay_steps`` absolute, or ``decay_at`` fractions of ``total_steps``)."""
    from kerasdet.cli import make_optimizer

    train = dict(config["train"], lr=stage["lr"], epochs=1)
    if "warmup_steps" in stage:
        train["warmup_steps"] = stage["warmup_steps"]
    if "decay_steps" in stage:
        train["decay_steps"] = stage["decay_steps"]
    else:
        train["decay_at"] = stage.get("decay_at", ())
    return make_optimizer({"train": train}, total_steps)


def fit_stage(model, config, stage, train_ds, steps_per_epoch, verbose=2, scale=1.0):
    """One stage: a fresh optimizer and one ``fit`` over the stage's steps (an infinite
    ``train_ds``); memory stages first set the unroll length ``num_steps``. Returns
    ``(history, seconds)``."""
    total = stage_steps(stage, steps_per_epoch, scale)
    if stage["kind"] == "memory" and hasattr(model, "configure"):
        model.configure(num_steps=stage.get("num_steps", model.num_steps))
    model.compile(optimizer=stage_optimizer(config, stage, total))
    t = time.time()
    history = model.fit(train_ds, epochs=1, steps_per_epoch=total, verbose=verbose).history
    return history, time.time() - t


def train_stages(config, num_classes, train_ds, steps_per_epoch, *, base=None, stages=None, verbose=2):
    """Stage-wise training: the base stage (skipped when a trained ``base`` is given), then
    the memory stages on the frozen base. Returns ``(smn, base, log)``."""
    from kerasdet.models.smn import SMN

    stages = config["stages"] if stages is None else stages
    log = []
    size = config["input"]["image_size"]
    if base is None:
        base = build_base(config, num_classes)
        base.build((None, size[0], size[1], 3))
        for stage in stages:
            if stage["kind"] == "base":
                history, seconds = fit_stage(base, config, stage, train_ds, steps_per_epoch, verbose)
                log.append({"stage": stage, "seconds": seconds, "loss": history.get("loss")})
    model_args = {k: v for k, v in config["model"].items() if k != "base_weights"}
    smn = SMN(base=base, weight_decay=config["train"].get("weight_decay", 5e-4), **model_args)
    smn.build((None, size[0], size[1], 3))
    for stage in stages:
        if stage["kind"] == "memory":
            history, seconds = fit_stage(smn, config, stage, train_ds, steps_per_epoch, verbose)
            log.append({"stage": stage, "seconds": seconds, "loss": history.get("loss")})
    return smn, base, log


def main(argv=None):
    from kerasdet.cli import _export, get_config, load_recipe, make_datasets, prepare_sources

    parser = argparse.ArgumentParser(description="SMN stage-wise training (base, then memory N = 2 -> 5 -> 10)")
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON")
    parser.add_argument("--verbose", type=int, default=2)
    parser.add_argument("--no-export", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import keras

    from kerasdet.evaluation.callback import evaluate_model
    from kerasdet.evaluation.coco_eval import format_table

    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = json.loads(value)
    config = get_config(load_recipe(os.path.abspath(__file__)), args.preset, overrides)
    keras.utils.set_random_seed(args.seed)
    work_dir = args.work_dir or os.path.join("runs", f"smn_{args.preset}")
    os.makedirs(work_dir, exist_ok=True)
    train_source, val_source = prepare_sources(config, args.data_dir)
    train_ds, val_ds = make_datasets(config, train_source, val_source, seed=args.seed, repeat=True)
    steps_per_epoch = len(train_source) // config["train"]["batch_size"]
    t0 = time.time()
    smn, _, log = train_stages(config, train_source.num_classes, train_ds, steps_per_epoch, verbose=args.verbose)
    smn.save_weights(os.path.join(work_dir, "model.weights.h5"))
    stats = evaluate_model(smn, val_ds, val_source.annotation_file, category_ids=val_source.category_ids,
                           results_file=os.path.join(work_dir, "val_results.json"))
    print(format_table(stats))
    if not args.no_export:
        _export(smn, config, val_source, os.path.join(work_dir, "saved_model"))
    with open(os.path.join(work_dir, "summary.json"), "w") as f:
        json.dump({"stats": stats, "stages": log, "total_seconds": time.time() - t0}, f, indent=2, default=str)
    return stats


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
