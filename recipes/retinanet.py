"""RetinaNet (thesis ch. 5, "Focal Loss for Dense Object Detection").

Launcher of the recipe :mod:`kerasdet.recipes.retinanet` (presets and model builder live there):
``python recipes/retinanet.py --preset <preset> [--set key=value ...]`` is
``kerasdet train --recipe retinanet --preset <preset> ...``.
"""
from kerasdet.recipes.retinanet import PRESETS, build_model  # noqa: F401  (the recipe, for importers)

if __name__ == "__main__":
    from kerasdet.cli import recipe_main

    raise SystemExit(recipe_main("retinanet"))
