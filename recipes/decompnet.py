"""decompNet, the recurrent instance decomposer (Park & Berg, "Learning to decompose for object detection and instance segmentation", 2016).

Launcher of the recipe :mod:`kerasdet.recipes.decompnet` (presets and model builder live there):
``python recipes/decompnet.py --preset <preset> [--set key=value ...]`` is
``kerasdet train --recipe decompnet --preset <preset> ...``.
"""
from kerasdet.recipes.decompnet import PRESETS, build_model  # noqa: F401  (the recipe, for importers)

if __name__ == "__main__":
    from kerasdet.cli import recipe_main

    raise SystemExit(recipe_main("decompnet"))
