"""FPN mask proposals (T.-Y. Lin, "Detecting Common Objects in Context", thesis §4.6).

Launcher of the recipe :mod:`kerasdet.recipes.fpn_proposals` (presets and model builder live there):
``python recipes/fpn_proposals.py --preset <preset> [--set key=value ...]`` is
``kerasdet train --recipe fpn_proposals --preset <preset> ...``.
"""
from kerasdet.recipes.fpn_proposals import PRESETS, build_model  # noqa: F401  (the recipe, for importers)

if __name__ == "__main__":
    from kerasdet.cli import recipe_main

    raise SystemExit(recipe_main("fpn_proposals"))
