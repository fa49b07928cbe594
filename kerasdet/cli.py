"""``kerasdet train|evaluate|export|predict|show-config|convert``: argument parsing only.

The work is done by :mod:`kerasdet.engine` (configs, builders, the runner). A user's
mistake (unknown recipe, preset or config key, bad value, missing or malformed file) ends
the command with one line on stderr and exit status 2; ``--debug`` shows the traceback.
"""
import argparse
import json
import logging
import os
import sys

from kerasdet.errors import UserInputError

COMMANDS = ("train", "evaluate", "export", "predict", "show-config", "convert")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _recipe_config(args):
    from kerasdet.engine.recipes import resolve_config

    return resolve_config(args.recipe, args.preset, args.set, epochs=getattr(args, "epochs", None),
                          export=not getattr(args, "no_export", False), num_draw=getattr(args, "num_draw", None))


def train(args):
    from kerasdet.engine.runner import run

    recipe, config = _recipe_config(args)
    return run(recipe, config, preset=args.preset, work_dir=args.work_dir, data_dir=args.data_dir, seed=args.seed,
               strategy=args.strategy, export_dir=args.export_dir, verbose=args.verbose)


def evaluate(args):
    from kerasdet.engine.builders import format_stats
    from kerasdet.engine.runner import evaluate_run

    stats = evaluate_run(args.run, weights=args.weights, metric=args.metric)
    print(format_stats(stats))
    return stats


def export(args):
    from kerasdet.engine.runner import export_run, export_run_litert

    if args.format == "litert":
        if args.version is not None:
            raise UserInputError("--version is for SavedModel exports (TF Serving's layout); a LiteRT export is "
                                 "one file")
        if args.precision is not None:
            raise UserInputError("--precision is for SavedModel exports; LiteRT takes --quantization")
        written = export_run_litert(args.run, args.output, weights=args.weights, quantization=args.quantization,
                                    input_size=args.input_size)
        print(f"LiteRT model written to {written}")
        return written
    written = export_run(args.run, args.output, weights=args.weights, version=args.version, precision=args.precision)
    print(f"SavedModel written to {written}")
    return args.output


def predict(args):
    from kerasdet.engine.predict import predict_images

    written = predict_images(args.saved_model, args.images, args.output_dir, score_threshold=args.score_threshold)
    print("\n".join(written))
    return written


def show_config(args):
    config = _recipe_config(args)[1]
    print(json.dumps(config.to_dict(), indent=2))
    return config


def convert(args):
    from kerasdet.errors import ConfigError

    def need(*flags):
        missing = [f for f in flags if not getattr(args, f.lstrip("-").replace("-", "_"))]
        if missing:
            raise ConfigError(f"convert {args.kind} needs {', '.join(missing)}")

    if args.kind == "voc2coco":
        from kerasdet.data.convert import voc_to_coco

        need("--voc-root")
        print(f"COCO JSON written to {voc_to_coco(args.voc_root, args.output, sets=args.sets)}")
        return args.output
    if args.num_shards < 1:
        raise ConfigError(f"--num-shards must be >= 1, got {args.num_shards}")
    if args.kind == "coco2tfrecord":
        from kerasdet.data.tfrecord import coco_to_tfrecord

        need("--annotations", "--images")
        files = coco_to_tfrecord(args.annotations, args.images, args.output, num_shards=args.num_shards,
                                 include_masks=args.include_masks)
    else:
        from kerasdet.data.tfrecord import voc_to_tfrecord

        need("--voc-root")
        files = voc_to_tfrecord(args.voc_root, args.output, sets=args.sets, num_shards=args.num_shards)
    print(f"{len(files)} TFRecord shard(s) written: {files[0]} ...")
    return files


def build_parser():
    p = _Parser(prog="kerasdet", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def recipe_args(sp):
        sp.add_argument("--recipe", default="retinanet", help="recipe name or path (default retinanet)")
        sp.add_argument("--preset", default="digits", help="preset of the recipe (default digits)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config entry (JSON value)")

    t = sub.add_parser("train", help="train every stage, evaluate, export, draw detections; writes run.json")
    recipe_args(t)
    for flag, default, text in (("--data-dir", None, "where the digits set is generated (default: data.dir)"),
                                ("--work-dir", None, "default runs/<recipe>_<preset>"),
                                ("--export-dir", None, "default saved_models/<recipe>_<preset>")):
        t.add_argument(flag, default=default, help=text)
    for flag, default, text in (("--epochs", None, "shortcut for --set train.epochs=N"),
                                ("--num-draw", None, "validation images to draw (export.num_draw)"),
                                ("--seed", 0, "initialization, data order, augmentation"),
                                ("--verbose", 2, "fit verbosity")):
        t.add_argument(flag, type=int, default=default, help=text)
    t.add_argument("--no-export", action="store_true")
    t.add_argument("--strategy", default="auto", choices=["auto", "default", "mirrored", "multiworker"])
    t.set_defaults(func=train)

    for name, func, text in (("evaluate", evaluate, "score a run's weights on its validation split"),
                             ("export", export, "export a run's weights as a SavedModel")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("--run", required=True, help="the run's work dir (holds run.json)")
        sp.add_argument("--weights", default=None, help="default the run's model.weights.h5")
        if name == "evaluate":
            sp.add_argument("--metric", default=None,
                            choices=["coco", "coco_segm", "proposals", "proposals_segm", "voc07", "voc12"])
        else:
            sp.add_argument("--output", required=True, help="TF Serving base folder: writes <output>/<version>/ "
                            "(--format litert: the .tflite file)")
            sp.add_argument("--version", type=int, default=None, help="version folder (default: highest + 1)")
            sp.add_argument("--format", default="savedmodel", choices=["savedmodel", "litert"],
                            help="savedmodel (default, TF Serving) or litert (a .tflite file, batch 1, fixed size)")
            sp.add_argument("--quantization", default="float32", choices=["float32", "dynamic_int8"],
                            help="LiteRT weights (default float32)")
            sp.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                            help="LiteRT input size (default the model's canvas)")
            sp.add_argument("--precision", default=None, choices=["float32", "bfloat16", "auto"],
                            help="SavedModel compute dtype: force float32 or bfloat16, or auto (by the CPU alone); "
                                 "default the run's own choice (made with its validation AP check)")
        sp.set_defaults(func=func)

    r = sub.add_parser("predict", help="run a SavedModel on images and write them with boxes drawn")
    r.add_argument("--saved-model", required=True)
    r.add_argument("--output-dir", default="predictions")
    r.add_argument("--score-threshold", type=float, default=0.3)
    r.add_argument("images", nargs="+")
    r.set_defaults(func=predict)

    s = sub.add_parser("show-config", help="print the resolved config of a recipe preset")
    recipe_args(s)
    s.set_defaults(func=show_config)

    c = sub.add_parser("convert", help="convert annotations (voc2coco) or write TFRecord shards")
    c.add_argument("kind", choices=["voc2coco", "coco2tfrecord", "voc2tfrecord"])
    c.add_argument("--voc-root", default=None, help="voc2*: the VOCdevkit folder")
    c.add_argument("--sets", nargs="+", default=["2007/test"], help="voc2*: <year>/<split> entries (default 2007/test)")
    c.add_argument("--annotations", default=None, help="coco2tfrecord: the COCO JSON")
    c.add_argument("--images", default=None, help="coco2tfrecord: the image folder")
    c.add_argument("--num-shards", type=int, default=1, help="*2tfrecord: number of shards (default 1)")
    c.add_argument("--include-masks", action="store_true", help="coco2tfrecord: write image/object/mask PNGs")
    c.add_argument("--output", required=True,
                   help="voc2coco: the COCO JSON to write; *2tfrecord: the shard prefix (PREFIX-00000-of-0000N.tfrecord)")
    c.set_defaults(func=convert)
    return p


def main(argv=None):
    """Parses ``argv`` and runs the command; returns its result (e.g. the run record).
    Errors propagate (see :func:`console_main` for the exit-status behaviour)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


def console_main(argv=None):
    """The ``kerasdet`` console script: exit 0 on success; a :class:`UserInputError`
    prints ``kerasdet: error: <message>`` and exits 2 (``--debug``: the traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # anywhere on the line
    try:
        main([a for a in argv if a != "--debug"])
    except UserInputError as exc:
        if debug:
            raise
        print(f"kerasdet: error: {exc}", file=sys.stderr)
        return 2
    return 0


def recipe_main(recipe, argv=None):
    """``python recipes/<name>.py [command] ...``: without a command, ``train --recipe
    <name>`` (so ``python recipes/retinanet.py --preset digits`` is ``kerasdet train
    --recipe retinanet --preset digits``). Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        argv = ["train", "--recipe", recipe] + argv
    return console_main(argv)


if __name__ == "__main__":
    sys.exit(console_main())
