"""R-FCN, CoupleNet and Attention CoupleNet (the Attention CoupleNet paper, Zhu et al., and the CoupleNet it extends).

Launcher of the recipe :mod:`kerasdet.recipes.couplenet` (presets and model builder live there):
``python recipes/couplenet.py --preset <preset> [--set key=value ...]`` is
``kerasdet train --recipe couplenet --preset <preset> ...``.
"""
from kerasdet.recipes.couplenet import PRESETS, build_model  # noqa: F401  (the recipe, for importers)

if __name__ == "__main__":
    from kerasdet.cli import recipe_main

    raise SystemExit(recipe_main("couplenet"))
