"""Spatial Memory Network (Chen & Gupta, "Spatial Memory for Context Reasoning in Object Detection", ICCV 2017): stage-wise training recipe.

Launcher of the recipe :mod:`kerasdet.recipes.smn` (presets and model builder live there):
``python recipes/smn.py --preset <preset> [--set key=value ...]`` is
``kerasdet train --recipe smn --preset <preset> ...``.
"""
from kerasdet.recipes.smn import PRESETS, build_model  # noqa: F401  (the recipe, for importers)

if __name__ == "__main__":
    from kerasdet.cli import recipe_main

    raise SystemExit(recipe_main("smn"))
