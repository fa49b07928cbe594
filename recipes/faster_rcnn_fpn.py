"""Faster R-CNN with FPN (thesis ch. 4, §4.4) — and the digits CPU preset of the same model.

Launcher of the recipe :mod:`kerasdet.recipes.faster_rcnn_fpn` (presets and model builder live there):
``python recipes/faster_rcnn_fpn.py --preset <preset> [--set key=value ...]`` is
``kerasdet train --recipe faster_rcnn_fpn --preset <preset> ...``.
"""
from kerasdet.recipes.faster_rcnn_fpn import PRESETS, build_model  # noqa: F401  (the recipe, for importers)

if __name__ == "__main__":
    from kerasdet.cli import recipe_main

    raise SystemExit(recipe_main("faster_rcnn_fpn"))
