"""decompNet, the recurrent instance decomposer (seed 001, spec ``001_recurrent_decomposer.md``).

Presets (data: the paper's protocol from the embedded digits generator, §3.1: 100x100
grayscale images, 5-10 digits of classes {3, 6, 9}, scale 0.5-2, tight-box IoU <= 0.2, 30
clutter patches of 8x8 digit pieces (Mnih et al. 2014), train and test digits from
disjoint source pools; instance masks are the digits' ink):

* ``paper``: 30,000 / 10,000 images, the App. B networks (category net, 2 x 2048-unit
  recurrent layers, T = 11 steps, 50x50 maps, box regressor 4096 hidden), the paper's
  three stages by ``model.fit`` with the 0.3 -> 1.0 warm-up of lambda/gamma (and p) after
  the first epoch of stages 1 and 2. The paper gives no optimizer settings: the spec's
  choices (SGD momentum 0.9, lr 1e-2, batch 32, weight decay 5e-4, x0.1 at 2/3 of each
  stage; stage epochs 20 / 30 / 10, the last at lr 1e-3) and a final box stage of 5 epochs.
* ``paper_full``: the same with 100x100 maps ("decomp full").
* ``digits``: a 2-core CPU budget (9.7 min end to end, measured), the configuration measured best there by
  ``benchmarks/decompnet_digits.py``: 1,500 / 300 protocol images, batch 8, the detection
  variant (filled box masks as instance targets, spec §3.1: the paper's detection
  experiment has no segmentation label), the paper's "all convolutional recurrent"
  alternative (``cell="conv_gru"``, one ConvGRU layer of 32 channels on the 7x7 grid; it
  learned faster than the fully connected 2048-unit cell, which at 8.9 s/step is not a
  CPU model), 16-channel instance convolutions, stop rule ``"bright"`` (the ConvGRU puts
  its black maps first, see :mod:`kerasdet.models.decompnet`); Adam (the spec's fallback
  when SGD stalls; the sum-over-pixels loss makes SGD's step size data dependent), stages
  15 / 8 / 1 epochs + 1 box epoch, lambda = gamma = p = 0.3 for the first 6 epochs of
  stages 1-2 (the paper's warm-up is one epoch of 30,000 images, more than this whole
  run sees). ``--set model.cell=fc --set model.recurrent_layers=2`` is the paper's cell,
  ``--set model.target=masks`` the segmentation variant. BatchNormalization uses Torch's
  momentum (the paper's framework), see :mod:`kerasdet.layers.decomposer`.

Run: ``python recipes/decompnet.py --preset digits`` trains the stages, evaluates boxes and
masks with pycocotools, exports a SavedModel (``detection_masks`` included) to
``saved_models/decompnet_<preset>``. ``benchmarks/decompnet_digits.py`` adds the
sliding-window baseline, per-class PR curves and count accuracy.
"""
import argparse
import json
import logging
import os
import sys
import time

_PROTOCOL = {"image_size": (100, 100), "min_digits": 5, "max_digits": 10, "scale_range": (0.5, 2.0),
             "max_iou": 0.2, "num_clutter": 30, "clutter_style": "patches", "classes": (3, 6, 9),
             "grayscale": True, "seed": 0}
_INPUT = {"image_size": (100, 100), "masks": "instances", "max_boxes": 12, "flip": False, "cache_images": True}


def _paper(full):
    return {
        "data": {"kind": "digits", "dir": os.path.join("data", "digits369_paper"),
                 "generate": dict(_PROTOCOL, num_train=30000, num_val=10000)},
        "input": dict(_INPUT, cache_images=False),
        "model": {"full_resolution": full, "steps": 11, "max_instances": 10, "units": 2048,
                  "box_hidden": 4096, "target": "masks", "instance_activation": "relu"},
        "train": {"batch_size": 32, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "clipnorm": 5.0,
                  "stages": [{"stage": "category", "epochs": 20, "lr": 1e-2, "warmup_epochs": 1},
                             {"stage": "instance", "epochs": 30, "lr": 1e-2, "warmup_epochs": 1},
                             {"stage": "joint", "epochs": 10, "lr": 1e-3},
                             {"stage": "box", "epochs": 5, "lr": 1e-3}]},
        "eval": {"batch_size": 50},
    }


PRESETS = {
    "paper": _paper(False),
    "paper_full": _paper(True),
    "digits": {
        "data": {"kind": "digits", "dir": os.path.join("data", "digits369_1500_300"),
                 "generate": dict(_PROTOCOL, num_train=1500, num_val=300)},
        "input": dict(_INPUT),
        "model": {"full_resolution": False, "steps": 11, "max_instances": 10, "cell": "conv_gru",
                  "recurrent_layers": 1, "conv_gru_filters": 32, "units": 512, "instance_filters": 16,
                  "box_hidden": 1024, "target": "boxes", "instance_activation": "relu", "stop": "bright"},
        "train": {"batch_size": 8, "optimizer": "adam", "weight_decay": 1e-5, "clipnorm": 5.0,
                  "stages": [{"stage": "category", "epochs": 15, "lr": 2e-3, "warmup_epochs": 6},
                             {"stage": "instance", "epochs": 8, "lr": 1e-3, "warmup_epochs": 6},
                             {"stage": "joint", "epochs": 1, "lr": 3e-4},
                             {"stage": "box", "epochs": 1, "lr": 1e-3}]},
        "eval": {"batch_size": 50},
    },
}


def build_model(config, num_classes):
    """A :class:`~kerasdet.models.decompnet.DecompNet` for a preset config."""
    from kerasdet.models.decompnet import DecompNet

    model = DecompNet(num_classes=num_classes, image_size=config["input"]["image_size"],
                      weight_decay=config["train"].get("weight_decay", 5e-4), **config["model"])
    model.build((None, *config["input"]["image_size"], 3))
    return model


def _optimizer(train, stage, steps):
    import keras

    lr = keras.optimizers.schedules.PiecewiseConstantDecay(
        [max(1, int(steps * 2 / 3))], [stage["lr"], stage["lr"] * 0.1]) if train["optimizer"] == "sgd" \
        else keras.optimizers.schedules.CosineDecay(stage["lr"], max(1, steps), alpha=0.05)
    clip = train.get("clipnorm")
    if train["optimizer"] == "sgd":
        return keras.optimizers.SGD(lr, momentum=train.get("momentum", 0.9), clipnorm=clip)
    return keras.optimizers.Adam(lr, clipnorm=clip)


def train_stages(model, train_ds, config, *, steps_per_epoch, callbacks=(), verbose=2):
    """Runs the config's stages (``train.stages``) with one ``model.fit`` each: set the
    stage, compile a fresh optimizer, fit; the lambda/gamma/p warm-up
    (:class:`~kerasdet.callbacks.DecompositionWarmup`) runs in stages with
    ``warmup_epochs``, other stages use 1.0. Returns ``[(stage, seconds, history)]``."""
    from kerasdet.callbacks import DecompositionWarmup

    train = config["train"]
    done = []
    for stage in train["stages"]:
        model.set_stage(stage["stage"])
        model.compile(optimizer=_optimizer(train, stage, stage["epochs"] * steps_per_epoch))
        warm = DecompositionWarmup(epochs=stage.get("warmup_epochs", 0))
        t0 = time.time()
        history = model.fit(train_ds, epochs=stage["epochs"], steps_per_epoch=steps_per_epoch,
                            callbacks=[warm, *callbacks], verbose=verbose)
        done.append((stage["stage"], time.time() - t0, history.history))
        logging.getLogger(__name__).info("stage %s: %.1f min", stage["stage"], (time.time() - t0) / 60)
    return done


def main(argv=None):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config entry, e.g. --set train.batch_size=8 (JSON values)")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--export-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import keras

    from kerasdet.cli import get_config, make_datasets, prepare_sources
    from kerasdet.evaluation.callback import evaluate_model
    from kerasdet.evaluation.coco_eval import format_table
    from kerasdet.export import export_saved_model

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    config = get_config(sys.modules[__name__], args.preset, overrides)
    keras.utils.set_random_seed(args.seed)
    work_dir = args.work_dir or os.path.join("runs", f"decompnet_{args.preset}")
    os.makedirs(work_dir, exist_ok=True)
    t0 = time.time()
    train_source, val_source = prepare_sources(config)
    train_ds, val_ds = make_datasets(config, train_source, val_source, seed=args.seed, repeat=True)
    steps = len(train_source) // config["train"]["batch_size"]
    model = build_model(config, train_source.num_classes)
    print(f"DecompNet: {model.count_params():,} parameters")
    stages = train_stages(model, train_ds, config, steps_per_epoch=steps)
    model.save_weights(os.path.join(work_dir, "model.weights.h5"))
    stats = evaluate_model(model, val_ds, val_source.annotation_file, category_ids=val_source.category_ids)
    print(format_table(stats))
    export_dir = args.export_dir or os.path.join("saved_models", f"decompnet_{args.preset}")
    export_saved_model(model, export_dir, image_size=config["input"]["image_size"],
                       category_ids=val_source.category_ids, category_names=val_source.category_names)
    summary = {"stats": stats, "stages": [(s, t) for s, t, _ in stages], "total_seconds": time.time() - t0}
    with open(os.path.join(work_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"AP {stats['AP']:.3f}  AP50 {stats['AP50']:.3f}  total {summary['total_seconds'] / 60:.1f} min; "
          f"SavedModel in {export_dir}")
    return summary


if __name__ == "__main__":
    main()
