"""DeepMask / SharpMask segment proposals (T.-Y. Lin, "Detecting Common Objects in Context", thesis ch. 3).

Launcher of the recipe :mod:`kerasdet.recipes.sharpmask` (presets and model builder live there):
``python recipes/sharpmask.py --preset <preset> [--set key=value ...]`` is
``kerasdet train --recipe sharpmask --preset <preset> ...``.
"""
from kerasdet.recipes.sharpmask import PRESETS, build_model  # noqa: F401  (the recipe, for importers)

if __name__ == "__main__":
    from kerasdet.cli import recipe_main

    raise SystemExit(recipe_main("sharpmask"))
