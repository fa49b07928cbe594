"""SSD and ASSD (Yi, Wu & Metaxas 2019, "ASSD: Attentive Single Shot Multibox Detector").

Launcher of the recipe :mod:`kerasdet.recipes.assd` (presets and model builder live there):
``python recipes/assd.py --preset <preset> [--set key=value ...]`` is
``kerasdet train --recipe assd --preset <preset> ...``.
"""
from kerasdet.recipes.assd import PRESETS, build_model  # noqa: F401  (the recipe, for importers)

if __name__ == "__main__":
    from kerasdet.cli import recipe_main

    raise SystemExit(recipe_main("assd"))
