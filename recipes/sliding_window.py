"""decompNet's sliding-window baseline (Park & Berg, "Learning to decompose for object detection and instance segmentation", 2016, §3).

Launcher of the recipe :mod:`kerasdet.recipes.sliding_window` (presets and model builder live there):
``python recipes/sliding_window.py --preset <preset> [--set key=value ...]`` is
``kerasdet train --recipe sliding_window --preset <preset> ...``.
"""
from kerasdet.recipes.sliding_window import PRESETS, build_model  # noqa: F401  (the recipe, for importers)

if __name__ == "__main__":
    from kerasdet.cli import recipe_main

    raise SystemExit(recipe_main("sliding_window"))
