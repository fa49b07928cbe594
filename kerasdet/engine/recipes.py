"""Recipes: presets (data) plus a model builder and, where a paper needs it, a stage hook.

A recipe is a Python module with

* ``PRESETS``: ``{name: config dict}`` (sections of :mod:`kerasdet.engine.config`);
* ``build_model(config, num_classes)``: the recipe's final model (unbuilt);
* optionally ``MODEL_CLASS`` (the class the ``model`` section is passed to; its keyword
  parameters are the valid ``model`` keys), ``OPEN_SECTIONS`` (``{section: callable}``
  of other open sections), ``STAGE_PARAMS`` (``{name: type}`` valid in a stage's
  ``params``), and ``stage_model(model, stage, config) -> (train_model, callbacks)``, the
  per-stage hook: which (sub-)model a stage trains and the stage's extra callbacks
  (default: the whole model, none), and ``train_dataset(dataset, stage, config, *, seed,
  start_batch) -> dataset``, what a stage trains on: the detection batches of the training
  stream turned into something else (DeepMask / SharpMask: patch batches; default: the
  batches as they are). ``start_batch`` is the stream position of the dataset's first
  batch, so a seeded transform resumes exactly.

The recipes of the papers live in :mod:`kerasdet.recipes` (``retinanet``,
``faster_rcnn_fpn``, ``mask_rcnn_fpn``, ``assd``, ``couplenet``, ``smn``, ``decompnet``, ``sharpmask``,
``fpn_proposals``); a user's recipe is a file given by path.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os

from kerasdet.engine.config import Config, load_config, parse_overrides
from kerasdet.errors import ConfigError, UserInputError


def builtin_recipes() -> list:
    """Names of the recipes shipped in :mod:`kerasdet.recipes`."""
    from kerasdet.recipes import RECIPES

    return sorted(RECIPES)


@dataclasses.dataclass
class Recipe:
    """A loaded recipe (see the module doc).

    Attributes:
      name: ``retinanet``, or the file stem of a recipe given by path.
      module: the recipe module.
      source: its file path.
    """

    name: str
    module: object
    source: str

    @property
    def presets(self) -> dict:
        return self.module.PRESETS

    def config(self, preset: str, overrides: dict | None = None) -> Config:
        """The checked :class:`Config` of ``preset`` with dotted ``overrides``."""
        if preset not in self.presets:
            raise ConfigError(f"recipe {self.name!r} has no preset {preset!r}; presets: {', '.join(sorted(self.presets))}")
        return self.config_from_dict(self.presets[preset], overrides)

    def config_from_dict(self, config: dict, overrides: dict | None = None) -> Config:
        """A :class:`Config` of a plain dict (a preset, or ``run.json``'s resolved config)."""
        return load_config(config, overrides, model_class=getattr(self.module, "MODEL_CLASS", None),
                           open_sections=getattr(self.module, "OPEN_SECTIONS", None),
                           stage_params=getattr(self.module, "STAGE_PARAMS", None))

    def build_model(self, config: Config, num_classes: int):
        return self.module.build_model(config, num_classes)

    def train_dataset(self, dataset, stage, config: Config, *, seed: int = 0, start_batch: int = 0):
        """A stage's training data: the recipe's ``train_dataset`` hook applied to the
        detection batches ``dataset`` (whose first batch is ``start_batch`` of the stream),
        or ``dataset`` itself."""
        hook = getattr(self.module, "train_dataset", None)
        if hook is None:
            return dataset
        return hook(dataset, stage, config, seed=seed, start_batch=start_batch)

    def stage_model(self, model, stage, config: Config):
        """``(train_model, callbacks)`` of a stage (the recipe's hook, or the whole model)."""
        hook = getattr(self.module, "stage_model", None)
        if hook is None:
            return model, []
        return hook(model, stage, config)


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe by name (:func:`builtin_recipes`, or ``recipes/<name>.py`` in the working
    directory) or by path to a ``.py`` file.

    Raises:
      UserInputError: no such recipe, or the file lacks ``PRESETS`` / ``build_model``.
    """
    name_or_path = os.fspath(name_or_path)
    if name_or_path.endswith(".py") or os.sep in name_or_path:
        stem = os.path.splitext(os.path.basename(name_or_path))[0]
        if stem in builtin_recipes() and _is_launcher(name_or_path):
            return load_recipe(stem)
        if not os.path.isfile(name_or_path):
            raise UserInputError(f"recipe file {name_or_path} does not exist")
        spec = importlib.util.spec_from_file_location(f"kerasdet_user_recipe_{stem}", name_or_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return _checked(Recipe(stem, module, os.path.abspath(name_or_path)))
    if name_or_path in builtin_recipes():
        module = importlib.import_module(f"kerasdet.recipes.{name_or_path}")
        return _checked(Recipe(name_or_path, module, module.__file__))
    local = os.path.join(os.getcwd(), "recipes", f"{name_or_path}.py")
    if os.path.isfile(local):
        return load_recipe(local)
    raise UserInputError(f"unknown recipe {name_or_path!r}; recipes: {', '.join(builtin_recipes())} "
                         "(or a path to a recipe .py file)")


def _is_launcher(path: str) -> bool:
    """A ``recipes/<name>.py`` launcher of a built-in recipe (it imports it)."""
    if not os.path.isfile(path):
        return False
    stem = os.path.splitext(os.path.basename(path))[0]
    with open(path) as f:
        return f"kerasdet.recipes.{stem}" in f.read()


def _checked(recipe: Recipe) -> Recipe:
    for attr in ("PRESETS", "build_model"):
        if not hasattr(recipe.module, attr):
            raise UserInputError(f"recipe {recipe.source} does not define {attr}")
    return recipe


def resolve_config(recipe: str, preset: str, set_items=(), *, epochs=None, export=True, num_draw=None):
    """``(recipe, config)`` of a command line: ``--set KEY=VALUE`` items plus the shortcut
    flags (``--epochs`` = ``train.epochs``, ``--no-export`` = ``export.enabled=false``,
    ``--num-draw`` = ``export.num_draw``)."""
    overrides = parse_overrides(set_items)
    if epochs:
        overrides["train.epochs"] = epochs
    if not export:
        overrides["export.enabled"] = False
    if num_draw is not None:
        overrides["export.num_draw"] = num_draw
    loaded = load_recipe(recipe)
    return loaded, loaded.config(preset, overrides)
