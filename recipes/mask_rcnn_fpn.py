"""Mask R-CNN with FPN (He et al., "Mask R-CNN", ICCV 2017) — and its digits CPU preset.

Launcher of the recipe :mod:`kerasdet.recipes.mask_rcnn_fpn` (presets and model builder live there):
``python recipes/mask_rcnn_fpn.py --preset <preset> [--set key=value ...]`` is
``kerasdet train --recipe mask_rcnn_fpn --preset <preset> ...``.
"""
from kerasdet.recipes.mask_rcnn_fpn import PRESETS, build_model  # noqa: F401  (the recipe, for importers)

if __name__ == "__main__":
    from kerasdet.cli import recipe_main

    raise SystemExit(recipe_main("mask_rcnn_fpn"))
