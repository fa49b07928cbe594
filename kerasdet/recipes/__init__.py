"""The papers' recipes: presets (data) + ``build_model`` (+ a stage hook where a paper
trains in stages). Run any of them with ``kerasdet train --recipe <name> --preset <preset>``
or ``python recipes/<name>.py --preset <preset>``; see :mod:`kerasdet.engine.recipes`."""

#: The built-in recipes (``kerasdet train --recipe <name>``).
RECIPES = ("assd", "couplenet", "decompnet", "faster_rcnn_fpn", "fpn_proposals", "mask_rcnn_fpn", "retinanet",
           "sharpmask", "sliding_window", "smn")
