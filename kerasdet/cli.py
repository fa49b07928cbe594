"""``kerasdet train|evaluate|export|predict``: the runner every recipe shares.

A recipe (``recipes/<paper>.py``) is a Python file defining ``PRESETS`` (name -> config
dict, see ``recipes/retinanet.py``) and ``build_model(config, num_classes)``. This module
is where data, models, evaluation and export meet (with the recipes), so each recipe stays
a page of configuration.

Recipes are found by path, or by name in ``./recipes/`` and in the ``recipes/`` folder next
to the installed package (a source checkout).
"""
import argparse
import copy
import importlib.util
import json
import logging
import os
import sys
import time

logger = logging.getLogger("kerasdet")

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- recipes -------------------------------------------------------------------------------
def load_recipe(name_or_path):
    """Imports a recipe module from a path or a name (``retinanet``)."""
    candidates = [name_or_path]
    if not name_or_path.endswith(".py"):
        candidates += [
            os.path.join(os.getcwd(), "recipes", f"{name_or_path}.py"),
            os.path.join(_REPO_ROOT, "recipes", f"{name_or_path}.py"),
        ]
    for path in candidates:
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location(f"kerasdet_recipe_{os.path.basename(path)[:-3]}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            for attr in ("PRESETS", "build_model"):
                if not hasattr(module, attr):
                    raise ValueError(f"Recipe {path} does not define {attr}.")
            return module
    raise FileNotFoundError(f"No recipe {name_or_path!r}; looked at {candidates}.")


def get_config(recipe, preset, overrides=None):
    """A deep copy of ``recipe.PRESETS[preset]`` with dotted ``overrides`` applied."""
    if preset not in recipe.PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; the recipe has {sorted(recipe.PRESETS)}.")
    config = copy.deepcopy(recipe.PRESETS[preset])
    for key, value in (overrides or {}).items():
        node = config
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return config


# --- data ----------------------------------------------------------------------------------
def prepare_sources(config, data_dir=None):
    """Loads ``(train_source, val_source)`` for a config's ``data`` section.

    ``data.kind == "digits"``: generates the embedded digits set (idempotent) under
    ``data_dir`` (default ``data.dir``); ``"coco"``: reads ``train_annotations``,
    ``train_images``, ``val_annotations``, ``val_images`` from the config.
    """
    from kerasdet.data.coco import load_coco

    data = config["data"]
    if data["kind"] == "digits":
        from kerasdet.data.digits import generate_digits

        paths = generate_digits(data_dir or data["dir"], **data.get("generate", {}))
    elif data["kind"] == "coco":
        paths = {k: data[k] for k in ("train_annotations", "train_images", "val_annotations", "val_images")}
    else:
        raise ValueError(f"Unknown data kind {data['kind']!r} (expected 'digits' or 'coco').")
    train = load_coco(paths["train_annotations"], paths["train_images"])
    val = load_coco(paths["val_annotations"], paths["val_images"], category_ids=train.category_ids)
    return train, val


def make_datasets(config, train_source, val_source, *, seed=0, repeat=False, start_batch=0):
    """``(train_ds, val_ds)``; ``repeat=True`` makes the training set the infinite,
    step-addressable stream (``make_dataset(repeat=True, start_batch=...)``) that exact
    resume needs."""
    from kerasdet.data.pipeline import make_dataset

    inp = config["input"]
    common = dict(image_size=inp["image_size"], min_size=inp.get("min_size"), max_size=inp.get("max_size"),
                  max_boxes=inp.get("max_boxes", 100))
    common["masks"] = inp.get("masks")  # None / "union" / "instances" (make_dataset)
    train_ds = make_dataset(
        train_source,
        batch_size=config["train"]["batch_size"],
        training=True,
        flip=inp.get("flip", True),
        scale_jitter=inp.get("scale_jitter"),
        ssd_augmentation=inp.get("ssd_augmentation", False),
        seed=seed,
        cache_images=inp.get("cache_images", False),
        repeat=repeat,
        start_batch=start_batch,
        **common,
    )
    val_ds = make_dataset(
        val_source, batch_size=config["eval"].get("batch_size", 8), training=False, cache_images=inp.get("cache_images", False), **common
    )
    return train_ds, val_ds


# --- model ---------------------------------------------------------------------------------
def make_optimizer(config, steps_per_epoch):
    """SGD with momentum (default) or AdamW, with warm-up and step decays from the config.

    ``train.lr`` is given for ``train.reference_batch`` images per step and scaled linearly
    to the actual global batch (Goyal et al.'s rule, spec §5.1 item 10).
    """
    import keras

    from kerasdet.schedules import WarmupPiecewiseConstant

    train = config["train"]
    lr = train["lr"] * train["batch_size"] / train.get("reference_batch", train["batch_size"])
    total = train["epochs"] * steps_per_epoch
    boundaries = [int(f * total) for f in train.get("decay_at", ())]
    if "decay_steps" in train:
        boundaries = list(train["decay_steps"])
    schedule = WarmupPiecewiseConstant(
        base_lr=lr,
        boundaries=boundaries,
        decay=train.get("decay", 0.1),
        warmup_steps=train.get("warmup_steps", 0),
        warmup_factor=train.get("warmup_factor", 1.0 / 3.0),
    )
    name = train.get("optimizer", "sgd")
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=schedule, momentum=train.get("momentum", 0.9))
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=schedule)
    raise ValueError(f"Unknown optimizer {name!r} (expected 'sgd' or 'adam').")


def build(recipe, config, num_classes, strategy=None):
    """Builds the recipe's model (inside ``strategy.scope()`` if given) and its weights."""
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        model = recipe.build_model(config, num_classes)
        model.build((None, *config["input"]["image_size"], 3))
    return model


# --- commands ------------------------------------------------------------------------------
def train(args):
    import keras
    import tensorflow as tf

    from kerasdet.callbacks import BestModelCheckpoint, CSVLogger, fit_resumable
    from kerasdet.distribute import get_strategy
    from kerasdet.evaluation.callback import CocoEvalCallback, evaluate_model
    from kerasdet.evaluation.coco_eval import STAT_KEYS, format_table

    t0 = time.time()
    recipe = load_recipe(args.recipe)
    config = get_config(recipe, args.preset, _overrides(args))
    keras.utils.set_random_seed(args.seed)
    strategy = get_strategy(args.strategy)
    work_dir = args.work_dir or os.path.join("runs", f"{os.path.basename(args.recipe).replace('.py', '')}_{args.preset}")
    os.makedirs(work_dir, exist_ok=True)

    train_source, val_source = prepare_sources(config, args.data_dir)
    logger.info("train: %d images, val: %d images, %d classes", len(train_source), len(val_source), train_source.num_classes)
    _, val_ds = make_datasets(config, train_source, val_source, seed=args.seed)

    def make_train_data(start_batch):
        return make_datasets(config, train_source, val_source, seed=args.seed, repeat=True, start_batch=start_batch)[0]

    steps_per_epoch = len(train_source) // config["train"]["batch_size"]
    if steps_per_epoch < 1:
        raise ValueError(f"Only {len(train_source)} training images for a batch of {config['train']['batch_size']}.")
    t_data = time.time() - t0

    model = build(recipe, config, train_source.num_classes, strategy)
    model.nan_policy = config["train"].get("nan_policy", "raise")
    with strategy.scope():
        model.compile(optimizer=make_optimizer(config, steps_per_epoch), jit_compile=config["train"].get("jit_compile", False))
    logger.info("%s: %s parameters", type(model).__name__, f"{model.count_params():,}")

    callbacks = [
        CocoEvalCallback(
            val_ds,
            val_source.annotation_file,
            category_ids=val_source.category_ids,
            every_n_epochs=config["eval"].get("every_n_epochs", 1),
            log_dir=os.path.join(work_dir, "logs"),
        ),
        # After CocoEvalCallback, which puts val_AP into the epoch logs.
        BestModelCheckpoint(os.path.join(work_dir, "best.weights.h5"), monitor="val_AP", mode="max"),
        keras.callbacks.TensorBoard(os.path.join(work_dir, "logs"), write_graph=False, profile_batch=0),
        CSVLogger(os.path.join(work_dir, "history.csv"), append=True, keys=["val_" + k for k in STAT_KEYS]),
    ]
    t1 = time.time()
    # Exact resume: a run killed at any step and started again with the same command
    # continues at the last backup step with the batches it would have seen (see
    # kerasdet.callbacks); backups every ``train.backup_every`` steps (default: per epoch).
    _, backup = fit_resumable(
        model, make_train_data, epochs=config["train"]["epochs"], steps_per_epoch=steps_per_epoch,
        backup_dir=os.path.join(work_dir, "backup"), save_freq=config["train"].get("backup_every", "epoch"),
        callbacks=callbacks, verbose=args.verbose,
    )
    if backup.restored_step:
        logger.info("resumed from the backup of step %d", backup.restored_step)
    t_train = time.time() - t1
    weights_path = os.path.join(work_dir, "model.weights.h5")
    model.save_weights(weights_path)

    stats = evaluate_model(
        model, val_ds, val_source.annotation_file, category_ids=val_source.category_ids,
        results_file=os.path.join(work_dir, "val_results.json"),
    )
    print(f"\nCOCO evaluation (pycocotools) on {len(val_source)} validation images:")
    print(format_table(stats))
    summary = {"stats": stats, "train_seconds": t_train, "data_seconds": t_data,
               "resumed_from_step": backup.restored_step, "nonfinite_steps": model.nonfinite_steps}

    if not args.no_export:
        export_dir = args.export_dir or os.path.join("saved_models", f"{os.path.basename(args.recipe).replace('.py', '')}_{args.preset}")
        _export(model, config, val_source, export_dir)
        print(f"SavedModel written to {export_dir}")
        paths = val_source.image_paths[: args.num_draw]
        written = _predict_images(export_dir, paths, os.path.join(work_dir, "predictions"), val_source.category_names, val_source.category_ids)
        print(f"Detections drawn on {len(written)} validation images in {os.path.join(work_dir, 'predictions')}")
    summary["total_seconds"] = time.time() - t0
    with open(os.path.join(work_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(
        f"AP {stats['AP']:.3f}  AP50 {stats['AP50']:.3f}  train {t_train / 60:.1f} min  "
        f"total {summary['total_seconds'] / 60:.1f} min"
    )
    del tf
    return summary


def _export(model, config, source, export_dir):
    from kerasdet.export import export_saved_model

    inp = config["input"]
    return export_saved_model(
        model, export_dir, image_size=inp["image_size"], min_size=inp.get("min_size"), max_size=inp.get("max_size"),
        category_ids=source.category_ids, category_names=source.category_names,
    )


def _load_trained(args):
    recipe = load_recipe(args.recipe)
    config = get_config(recipe, args.preset, _overrides(args))
    train_source, val_source = prepare_sources(config, args.data_dir)
    model = build(recipe, config, train_source.num_classes)
    if not os.path.isfile(args.weights):
        raise FileNotFoundError(f"Weights file {args.weights} does not exist.")
    model.load_weights(args.weights)
    return config, model, train_source, val_source


def evaluate(args):
    from kerasdet.evaluation.callback import evaluate_model
    from kerasdet.evaluation.coco_eval import format_table

    config, model, train_source, val_source = _load_trained(args)
    _, val_ds = make_datasets(config, train_source, val_source)
    stats = evaluate_model(model, val_ds, val_source.annotation_file, category_ids=val_source.category_ids)
    print(format_table(stats))
    return stats


def export(args):
    config, model, _, val_source = _load_trained(args)
    _export(model, config, val_source, args.output)
    print(f"SavedModel written to {args.output}")


def _predict_images(saved_model_dir, image_paths, output_dir, class_names=None, category_ids=None, score_threshold=0.3):
    """Runs an exported SavedModel on image files and writes them with boxes drawn."""
    import numpy as np
    import tensorflow as tf

    from kerasdet.data.coco import read_image
    from kerasdet.visualize import draw_detections, save_image

    names = None
    if class_names is not None and category_ids is not None:
        names = dict(zip(category_ids, class_names))
    fn = tf.saved_model.load(saved_model_dir).signatures["serving_default"]
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for path in image_paths:
        image = read_image(path)
        out = fn(images=tf.constant(image[None]))
        n = int(out["num_detections"][0])
        drawn = draw_detections(
            image, out["detection_boxes"][0, :n].numpy(), out["detection_scores"][0, :n].numpy(),
            out["detection_classes"][0, :n].numpy(), class_names=names, score_threshold=score_threshold,
        )
        target = os.path.join(output_dir, os.path.splitext(os.path.basename(path))[0] + "_det.png")
        # Upscale small images so labels stay legible.
        if drawn.shape[0] < 256:
            import cv2

            f = int(np.ceil(256 / drawn.shape[0]))
            big = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST)
            drawn = draw_detections(
                big, out["detection_boxes"][0, :n].numpy(), out["detection_scores"][0, :n].numpy(),
                out["detection_classes"][0, :n].numpy(), class_names=names, score_threshold=score_threshold,
                thickness=2, font_scale=0.6,
            )
        save_image(target, drawn)
        written.append(target)
    return written


def predict(args):
    meta_path = os.path.join(args.saved_model, "kerasdet_export.json")
    names = ids = None
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        names, ids = meta.get("category_names"), meta.get("category_ids")
    written = _predict_images(args.saved_model, args.images, args.output_dir, names, ids, args.score_threshold)
    for w in written:
        print(w)


def _overrides(args):
    out = {}
    for item in getattr(args, "set", None) or []:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    if getattr(args, "epochs", None):
        out["train.epochs"] = args.epochs
    return out


def build_parser():
    p = argparse.ArgumentParser(prog="kerasdet", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def recipe_args(sp):
        sp.add_argument("--recipe", default="retinanet", help="recipe name or path (default retinanet)")
        sp.add_argument("--preset", default="digits", help="preset of the recipe (default digits)")
        sp.add_argument("--data-dir", default=None, help="where the digits set is generated (default: the preset's)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config entry, e.g. train.epochs=3")

    t = sub.add_parser("train", help="train, evaluate with pycocotools, export, draw detections")
    recipe_args(t)
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--work-dir", default=None, help="checkpoints, logs, history (default runs/<recipe>_<preset>)")
    t.add_argument("--export-dir", default=None, help="default saved_models/<recipe>_<preset>")
    t.add_argument("--no-export", action="store_true")
    t.add_argument("--num-draw", type=int, default=4, help="validation images to draw detections on")
    t.add_argument("--strategy", default="auto", choices=["auto", "default", "mirrored", "multiworker"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--verbose", type=int, default=2)
    t.set_defaults(func=train)

    e = sub.add_parser("evaluate", help="COCO evaluation of trained weights on the validation split")
    recipe_args(e)
    e.add_argument("--weights", required=True)
    e.set_defaults(func=evaluate)

    x = sub.add_parser("export", help="export trained weights as a SavedModel")
    recipe_args(x)
    x.add_argument("--weights", required=True)
    x.add_argument("--output", required=True)
    x.set_defaults(func=export)

    r = sub.add_parser("predict", help="run a SavedModel on images and write them with boxes drawn")
    r.add_argument("--saved-model", required=True)
    r.add_argument("--output-dir", default="predictions")
    r.add_argument("--score-threshold", type=float, default=0.3)
    r.add_argument("images", nargs="+")
    r.set_defaults(func=predict)
    return p


def build_detector(model_cls, config, num_classes, *, default_weight_decay=1e-4):
    """``model_cls(backbone=get_backbone(**config["backbone"]), num_classes, weight_decay,
    **config["model"])``: the ``build_model`` of a recipe whose config follows the house
    layout."""
    from kerasdet.backbones import get_backbone

    backbone_args = dict(config["backbone"])
    name = backbone_args.pop("name")
    return model_cls(
        backbone=get_backbone(name, **backbone_args),
        num_classes=num_classes,
        weight_decay=config["train"].get("weight_decay", default_weight_decay),
        **config["model"],
    )


def recipe_main(recipe_file, argv=None):
    """``python recipes/<name>.py [train|evaluate|export|predict] ...``: without a command,
    ``train --recipe <this file>`` (so ``python recipes/retinanet.py --preset digits`` is
    ``kerasdet train --recipe retinanet --preset digits``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "evaluate", "export", "predict"):
        argv = ["train", "--recipe", os.path.abspath(recipe_file)] + argv
    return main(argv)


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


def console_main():
    """The ``kerasdet`` console script: runs :func:`main` and exits 0 on success (``main``
    returns the command's result, e.g. the training summary, for Python callers)."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(console_main())
