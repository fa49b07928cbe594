"""The one runner: every stage of every recipe through the same machinery.

:func:`run` trains a recipe's stages in order (a single-stage detector has one stage,
``train``; SMN has its base then memory stages; decompNet its category / instance / joint /
box stages). Every stage is one ``fit`` with a fresh optimizer
(:func:`~kerasdet.engine.builders.build_optimizer`) through
:func:`kerasdet.callbacks.fit_resumable` (exact mid-stage resume), with TensorBoard and
CSV logs, the evaluation callback where the stage evaluates, and the best-weights
checkpoint in the last stage. The stages read one step-addressable training stream
one after another (stage ``k`` starts at the stream position where stage ``k - 1``
stopped), so a run killed anywhere and started again with the same command ends with the
weights of an uninterrupted run.

Work-dir layout: ``run.json`` (resolved config, label map, per-stage metrics, paths,
times), ``model.weights.h5`` (final), ``best.weights.h5``, ``stages/<i>_<name>.weights.h5``
+ ``stages/state.json`` (completed stages), ``backup/`` (the running stage's backup;
``backup/<i>_<name>/`` with several stages), ``logs/<name>/`` (TensorBoard), ``history*.csv``, ``val_results.json``,
``predictions/``. Under ``MultiWorkerMirroredStrategy`` only the chief writes.

:func:`load_run` rebuilds a run's model from its ``run.json`` (for ``evaluate``, ``export``,
benchmarks), reading neither the training data nor the digits generator.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time

from kerasdet.engine import builders
from kerasdet.engine.config import Config, to_plain
from kerasdet.distribute import is_chief
from kerasdet.engine.recipes import Recipe, builtin_recipes, load_recipe
from kerasdet.errors import DataFileNotFoundError, UserInputError
from kerasdet.random_state import load_seed_states, save_seed_states

logger = logging.getLogger("kerasdet")

RUN_FILE = "run.json"
STATE_FILE = "state.json"


def default_work_dir(recipe: Recipe, preset: str) -> str:
    """``runs/<recipe>_<preset>``."""
    return os.path.join("runs", f"{recipe.name}_{preset}")


def default_export_dir(recipe: Recipe, preset: str) -> str:
    """``saved_models/<recipe>_<preset>``."""
    return os.path.join("saved_models", f"{recipe.name}_{preset}")


def _write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _label_map(source) -> dict:
    return {"category_ids": [int(c) for c in source.category_ids],
            "category_names": list(source.category_names or [str(c) for c in source.category_ids])}


def _val_paths(config: Config, paths) -> dict:
    """What ``run.json`` needs to find the validation split again without the generator."""
    if config.data.kind == "voc":
        return {"voc_root": os.path.abspath(config.data.voc_root), "val_sets": list(config.data.val_sets)}
    if config.data.kind == "tfrecord":
        return {"val_records": os.path.abspath(paths["val_records"])}
    return {k: os.path.abspath(paths[k]) for k in ("val_annotations", "val_images")}


def run(recipe: Recipe | str, config: Config, *, preset: str = "custom", work_dir: str | None = None,
        data_dir: str | None = None, seed: int = 0, strategy="auto", export_dir: str | None = None,
        verbose: int = 2, callbacks=()) -> dict:
    """Trains, evaluates and exports one recipe configuration; returns the ``run.json`` dict.

    Args:
      recipe: a :class:`~kerasdet.engine.recipes.Recipe` or its name/path.
      config: the checked config (``recipe.config(preset, overrides)``).
      preset: the preset's name (for default paths and the record).
      work_dir: default ``runs/<recipe>_<preset>``. Re-running into a work dir whose run
        was interrupted resumes it exactly; a finished run is trained again from scratch.
      data_dir: digits: where the set is generated (default ``data.dir``).
      seed: weight initialization, data order and augmentation.
      strategy: a ``tf.distribute`` strategy or a name for
        :func:`kerasdet.distribute.get_strategy` (``auto`` reads ``TF_CONFIG``).
      export_dir: default ``export.dir`` or ``saved_models/<recipe>_<preset>``; exports
        only when ``export.enabled``.
      verbose: ``fit`` verbosity.
      callbacks: extra Keras callbacks for every stage's ``fit``.
    """
    import keras

    from kerasdet.distribute import get_strategy

    t0 = time.time()
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    if isinstance(strategy, str):
        strategy = get_strategy(strategy)  # first: a multi-worker strategy must precede other TF ops
    chief = is_chief(strategy)
    keras.utils.set_random_seed(seed)
    work_dir = work_dir or default_work_dir(recipe, preset)
    os.makedirs(os.path.join(work_dir, "stages"), exist_ok=True)

    paths_in = builders.data_paths(config, data_dir) if config.data.kind != "voc" else None
    train_source = builders.build_source(config, "train", paths=paths_in)
    val_source = builders.build_source(config, "val", paths=paths_in, category_ids=train_source.category_ids)
    logger.info("train: %d images, val: %d images, %d classes", len(train_source), len(val_source),
                train_source.num_classes)
    epoch_steps = builders.steps_per_epoch(config, len(train_source))
    val_ds = builders.build_dataset(config, val_source, training=False)
    t_data = time.time() - t0

    with strategy.scope():
        model = recipe.build_model(config, train_source.num_classes)
        model.build((None, *config.input.image_size, 3))
    logger.info("%s: %s parameters", type(model).__name__, f"{model.count_params():,}")

    stages = config.train.resolved_stages()
    state_path = os.path.join(work_dir, "stages", STATE_FILE)
    state = _read_json(state_path) if os.path.isfile(state_path) else {"done": []}
    if state.get("finished"):
        state = {"done": []}  # a finished run in this work dir: train again from scratch
    done = {d["name"]: d for d in state["done"]}
    if done:
        last = state["done"][-1]
        model.load_weights(os.path.join(work_dir, "stages", last["weights"]))
        load_seed_states(model, os.path.join(work_dir, "stages", last["weights"]))
        logger.info("stages %s already done; continuing after %s", list(done), last["name"])

    metric = config.eval.metric
    headline = builders.HEADLINE_METRIC[metric]
    records, offset = [], 0
    for index, stage in enumerate(stages):
        epochs, steps = builders.stage_length(stage, epoch_steps)
        total = epochs * steps
        if stage.name in done:
            records.append(done[stage.name])
            offset += total
            continue
        record = _run_stage(recipe, config, model, stage, index, strategy=strategy, epochs=epochs, steps=steps,
                            offset=offset, seed=seed, train_source=train_source, val_ds=val_ds,
                            val_source=val_source, last=index == len(stages) - 1, work_dir=work_dir,
                            headline=headline, verbose=verbose, callbacks=callbacks)
        weights = f"{index}_{stage.name}.weights.h5"
        if chief:
            model.save_weights(os.path.join(work_dir, "stages", weights))
            save_seed_states(model, os.path.join(work_dir, "stages", weights))
            record["weights"] = weights
            state["done"].append(record)
            _write_json(state_path, state)
        records.append(record)
        offset += total
    t_train = sum(r.get("seconds", 0.0) for r in records)

    weights_path = os.path.join(work_dir, "model.weights.h5")
    if chief:
        model.save_weights(weights_path)
    stats = builders.evaluate(model, val_ds, val_source, metric=metric,
                              results_file=os.path.join(work_dir, "val_results.json") if chief else None)
    print(f"\n{metric} evaluation on {len(val_source)} validation images:")
    print(builders.format_stats(stats))

    paths = {"work_dir": os.path.abspath(work_dir), "weights": os.path.abspath(weights_path),
             "best_weights": os.path.abspath(os.path.join(work_dir, "best.weights.h5")),
             "val": _val_paths(config, paths_in)}
    export_record = None
    if config.export.enabled and chief:
        from kerasdet.engine.predict import choose_export_precision, export_model, predict_images

        export_record = choose_export_precision(
            model, config, lambda variant: builders.evaluate(variant, val_ds, val_source, metric=metric), stats,
            headline)
        print(f"serving precision {export_record['precision']} ({export_record['reason']})")
        export_dir = export_dir or config.export.dir or default_export_dir(recipe, preset)
        version_dir = export_model(model, config, _label_map(train_source), export_dir,
                                   precision=export_record["precision"])
        print(f"SavedModel written to {version_dir}")
        paths["export"] = os.path.abspath(version_dir)
        if config.export.num_draw:
            drawn = predict_images(version_dir, val_source.image_paths[: config.export.num_draw],
                                   os.path.join(work_dir, "predictions"),
                                   score_threshold=config.export.score_threshold)
            print(f"Detections drawn on {len(drawn)} validation images in {os.path.join(work_dir, 'predictions')}")
    summary = {
        "recipe": recipe.name, "recipe_file": recipe.source, "preset": preset, "seed": seed,
        "config": config.to_dict(), "label_map": _label_map(train_source), "num_classes": train_source.num_classes,
        "model_class": type(model).__name__, "parameters": int(model.count_params()),
        "stages": records, "metric": metric, "stats": stats, "paths": paths, "export": export_record,
        "strategy": type(strategy).__name__, "num_replicas": int(strategy.num_replicas_in_sync),
        "times": {"data_seconds": t_data, "train_seconds": t_train, "total_seconds": time.time() - t0},
        "resumed_from_step": next((r.get("restored_step", 0) for r in records if r.get("restored_step")), 0),
        "nonfinite_steps": int(sum(r.get("nonfinite_steps", 0) for r in records)),
        "versions": _versions(),
    }
    if chief:
        state["finished"] = True
        _write_json(state_path, state)
        _write_json(os.path.join(work_dir, RUN_FILE), summary)
    print(f"{headline} {stats.get(headline, float('nan')):.3f}  train {t_train / 60:.1f} min  "
          f"total {summary['times']['total_seconds'] / 60:.1f} min")
    return summary


def _run_stage(recipe, config, model, stage, index, *, strategy, epochs, steps, offset, seed, train_source, val_ds,
               val_source, last, work_dir, headline, verbose, callbacks=()):
    """One stage: the hook's (sub-)model, a fresh optimizer, ``fit_resumable``."""
    import keras

    from kerasdet.callbacks import BestModelCheckpoint, CSVLogger, fit_resumable

    train_model, extra_callbacks = recipe.stage_model(model, stage, config)
    if hasattr(train_model, "nan_policy"):
        train_model.nan_policy = config.train.nan_policy
    with strategy.scope():
        train_model.compile(optimizer=builders.build_optimizer(stage, epochs * steps, train=config.train),
                            jit_compile=config.train.jit_compile)
    multi = len(config.train.stages) > 1
    chief = is_chief(strategy)
    log_dir = os.path.join(work_dir, "logs", stage.name) if multi else os.path.join(work_dir, "logs")
    evaluate_every = stage.evaluate_every or (config.eval.every_n_epochs if last else None)
    callbacks = list(extra_callbacks) + list(callbacks)
    keys = ["val_" + k for k in builders.metric_keys(config.eval.metric)]
    if evaluate_every:
        callbacks.append(builders.eval_callback(config, val_ds, val_source, every_n_epochs=evaluate_every,
                                                log_dir=log_dir if chief else None))
    if last:  # after the evaluation callback, which puts val_<metric> into the epoch logs
        callbacks.append(BestModelCheckpoint(os.path.join(work_dir, "best.weights.h5"), monitor="val_" + headline,
                                             mode="max"))
    if chief:  # one set of event files per run (every worker would write its own copy)
        callbacks.append(keras.callbacks.TensorBoard(log_dir, write_graph=False, profile_batch=0))
    callbacks += [
        CSVLogger(os.path.join(work_dir, f"history_{stage.name}.csv" if multi else "history.csv"), append=True,
                  keys=keys if evaluate_every else ()),
    ]

    def make_train_data(start_batch):
        position = offset + start_batch
        dataset = builders.build_dataset(config, train_source, training=True, seed=seed, start_batch=position)
        return recipe.train_dataset(dataset, stage, config, seed=seed, start_batch=position)

    logger.info("stage %d %r (%s): %d x %d steps", index, stage.name, stage.kind, epochs, steps)
    t0 = time.time()
    history, backup = fit_resumable(
        train_model, make_train_data, epochs=epochs, steps_per_epoch=steps,
        backup_dir=os.path.join(work_dir, "backup", f"{index}_{stage.name}") if multi else os.path.join(work_dir, "backup"),
        save_freq=config.train.backup_every,
        callbacks=callbacks, verbose=verbose)
    seconds = time.time() - t0
    record = {"name": stage.name, "kind": stage.kind, "epochs": epochs, "steps_per_epoch": steps,
              "seconds": seconds, "restored_step": int(backup.restored_step),
              "history": {k: [float(v) if builders.is_finite_number(v) else v for v in vals]
                          for k, vals in history.items()},
              "nonfinite_steps": int(getattr(train_model, "nonfinite_steps", 0) or 0)}
    if history.get("loss"):
        record["final_loss"] = float(history["loss"][-1])
    logger.info("stage %r: %.1f min", stage.name, seconds / 60)
    return record


def _versions() -> dict:
    import keras
    import tensorflow as tf

    from kerasdet import __version__

    return {"kerasdet": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "python": platform.python_version()}


# --- using a finished run --------------------------------------------------------------------
def read_run(work_dir: str) -> dict:
    """The ``run.json`` of a work dir (a clear error if there is none)."""
    path = os.path.join(work_dir, RUN_FILE) if os.path.isdir(work_dir) else work_dir
    if not os.path.isfile(path):
        raise DataFileNotFoundError(f"no {RUN_FILE} in {work_dir} (train first: kerasdet train ... --work-dir {work_dir})")
    try:
        record = _read_json(path)
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}: not a kerasdet run record ({exc})") from None
    for key in ("recipe_file", "config", "label_map", "paths"):
        if key not in record:
            raise UserInputError(f"{path}: not a kerasdet run record (no {key!r})")
    return record


def load_run(work_dir: str, *, weights: str | None = None, overrides: dict | None = None, strategy=None):
    """``(recipe, config, model, record)`` of a finished run: the model rebuilt from
    ``run.json`` with ``weights`` (default the run's final weights) loaded."""
    import tensorflow as tf

    record = read_run(work_dir)
    recipe_file = record.get("recipe_file", "")
    # a built-in recipe by name: also when the run was made by another checkout of kerasdet
    builtin = recipe_file.startswith(_package_recipes_dir()) or (
        not os.path.isfile(recipe_file) and os.path.basename(os.path.dirname(recipe_file)) == "recipes"
        and record["recipe"] in builtin_recipes())
    recipe_ref = record["recipe"] if builtin else recipe_file
    recipe = load_recipe(recipe_ref)
    config = recipe.config_from_dict(record["config"], overrides)
    weights = weights or record["paths"]["weights"]
    if not os.path.isfile(weights):
        raise DataFileNotFoundError(f"weights file {weights} does not exist")
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        model = recipe.build_model(config, len(record["label_map"]["category_ids"]))
        model.build((None, *config.input.image_size, 3))
    model.load_weights(weights)
    return recipe, config, model, record


def _package_recipes_dir() -> str:
    import kerasdet.recipes

    return os.path.dirname(os.path.abspath(kerasdet.recipes.__file__))


def val_source_of_run(config: Config, record: dict):
    """The validation ``DetectionSource`` of a run (its files as recorded; no generator)."""
    label_ids = record["label_map"]["category_ids"]
    val = record["paths"]["val"]
    if config.data.kind == "voc":
        return builders.build_source(config, "val", category_ids=label_ids)
    if config.data.kind == "tfrecord":
        return builders.build_source(config, "val", category_ids=label_ids, paths=val)
    for key in ("val_annotations", "val_images"):
        if not os.path.exists(val[key]):
            raise DataFileNotFoundError(f"{key} of the run: {val[key]} does not exist")
    return builders.build_source(config, "val", category_ids=label_ids, paths=val)


def evaluate_run(work_dir: str, *, weights: str | None = None, metric: str | None = None,
                 results_file: str | None = None) -> dict:
    """Scores a finished run's weights on its validation split (``eval.metric`` unless
    ``metric`` is given); returns the stats."""
    _, config, model, record = load_run(work_dir, weights=weights)
    source = val_source_of_run(config, record)
    dataset = builders.build_dataset(config, source, training=False)
    return builders.evaluate(model, dataset, source, metric=metric or config.eval.metric, results_file=results_file)


def export_run(work_dir: str, output: str, *, weights: str | None = None, version: int | None = None,
               precision: str | None = None) -> str:
    """Exports a finished run's weights as a SavedModel (label map from ``run.json``) to
    TF Serving's layout ``<output>/<version>/`` (default version: one above the highest);
    returns the version folder. ``precision``: ``"float32"`` / ``"bfloat16"`` force the
    serving graph's compute dtype, ``"auto"`` takes bfloat16 on a CPU with native bfloat16;
    default (None) the run's own choice (``run.json`` ``export.precision``, made with its
    validation metric check), else the config's ``export.precision``."""
    from kerasdet.engine.predict import export_model

    _, config, model, record = load_run(work_dir, weights=weights)
    # the run's own choice, made with its metric check, unless the caller forces one
    chosen = precision or (record.get("export") or {}).get("precision")
    return export_model(model, config, record["label_map"], output, version=version, precision=chosen)


def export_run_litert(work_dir: str, output: str, *, weights: str | None = None, quantization: str = "float32",
                      input_size=None) -> str:
    """Exports a finished run's weights as a LiteRT file ``output`` (``.tflite``, with its
    ``.json`` label map; see :mod:`kerasdet.litert`); returns the file written."""
    from kerasdet.engine.predict import export_model_litert

    _, config, model, record = load_run(work_dir, weights=weights)
    return export_model_litert(model, config, record["label_map"], output, quantization=quantization,
                               input_size=input_size)
