"""SSD and ASSD (seed 002, "ASSD: Attentive Single Shot Multibox Detector").

Presets:

* ``assd321`` / ``assd513``: the paper's COCO configurations (spec ``002_assd.md`` §3):
  ResNet-101 (local ImageNet weights via ``--set backbone.weights=...``), 7 sources
  conv3..conv9, fusion on conv3, one attention unit per source, SGD lr 1e-3 (for the
  paper's batch: 80 at 321, 64 at 513), momentum 0.9, weight decay 5e-4, no warm-up,
  x0.1 at epochs 100/150 of 160 (321) and 80/130 of 140 (513), SSD augmentation
  (photometric, expand, IoU crop, flip). Backbone BN is frozen (spec ambiguity 10: the
  authors train BN at 8-10 images per GPU; with the small per-device batches of most
  machines frozen statistics are the safe default).
* ``ssd_digits`` / ``assd_digits``: the same two architectures scaled to the embedded digits
  set and a 2-core CPU, identical except for ``attention``/``fusion`` so they compare under
  the same budget: the small residual backbone (C3-C5) + 2 extra blocks = 5 sources
  (16/8/4/2/1 cells at 128 px), default boxes 0.1..0.95 of the image (digits are 15-45 px),
  A = 4 per cell, Adam with warm-up and step decays. No flip (a mirrored digit is another
  glyph) and no SSD augmentation: at 12 epochs the expand/crop chain costs more accuracy
  than it buys (the paper trains 140-280 epochs).

Run: ``python recipes/assd.py --preset assd_digits`` (same as
``kerasdet train --recipe assd --preset assd_digits``).
"""
import os
import sys

_DIGITS_DATA = {
    "kind": "digits",
    "dir": os.path.join("data", "digits"),
    "generate": {"num_train": 4000, "num_val": 500, "image_size": (128, 128), "seed": 0},
}
_DIGITS_MODEL = {
    "source_levels": ("C3", "C4", "C5"),
    "extra_layers": ((64, 128, 2, "same"), (64, 128, 2, "same")),
    "min_sizes": (0.1, 0.2, 0.35, 0.55, 0.75),
    "max_sizes": (0.2, 0.35, 0.55, 0.75, 0.95),
    "aspect_ratios": ((2.0,),) * 5,
    "fusion_channels": 64,
    "max_detections": 100,
    "score_threshold": 0.01,
}
_DIGITS_TRAIN = {
    "batch_size": 16,
    "lr": 2e-3,
    "optimizer": "adam",
    "weight_decay": 1e-5,
    "epochs": 12,
    "decay_at": (0.75, 0.92),
    "warmup_steps": 100,
}


def _paper(size, batch, epochs, decays):
    from kerasdet.models.ssd import ASSD321_EXTRAS, ASSD513_EXTRAS

    return {
        "data": {
            "kind": "coco",
            "train_annotations": "coco/annotations/instances_train2017.json",
            "train_images": "coco/train2017",
            "val_annotations": "coco/annotations/instances_val2017.json",
            "val_images": "coco/val2017",
        },
        "input": {"image_size": (size, size), "flip": True, "ssd_augmentation": True},
        "backbone": {"name": "resnet101", "weights": None, "freeze_at": 0},
        "model": {
            "attention": True,
            "fusion": True,
            "extra_layers": ASSD513_EXTRAS if size == 513 else ASSD321_EXTRAS,
            "attention_block_size": 1024 if size == 513 else None,
            "max_detections": 100,  # COCO (200 for VOC; spec ambiguity 11)
        },
        "train": {
            "batch_size": batch,
            "reference_batch": batch,
            "lr": 1e-3,
            "optimizer": "sgd",
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "epochs": epochs,
            "decay_at": tuple(d / epochs for d in decays),
            "warmup_steps": 0,
        },
        "eval": {"every_n_epochs": 10, "batch_size": 8},
    }


PRESETS = {
    "assd321": _paper(321, 80, 160, (100, 150)),
    "assd513": _paper(513, 64, 140, (80, 130)),
    "ssd_digits": {
        "data": _DIGITS_DATA,
        "input": {"image_size": (128, 128), "flip": False, "cache_images": True, "max_boxes": 16},
        "backbone": {"name": "small", "widths": (32, 64, 96, 128), "blocks": (1, 1, 2, 1)},
        "model": dict(_DIGITS_MODEL, attention=False, fusion=False),
        "train": _DIGITS_TRAIN,
        "eval": {"every_n_epochs": 4, "batch_size": 50},
    },
    "assd_digits": {
        "data": _DIGITS_DATA,
        "input": {"image_size": (128, 128), "flip": False, "cache_images": True, "max_boxes": 16},
        "backbone": {"name": "small", "widths": (32, 64, 96, 128), "blocks": (1, 1, 2, 1)},
        "model": dict(_DIGITS_MODEL, attention=True, fusion=True),
        "train": _DIGITS_TRAIN,
        "eval": {"every_n_epochs": 4, "batch_size": 50},
    },
}


def build_model(config, num_classes):
    """SSD/ASSD for a preset config."""
    from kerasdet.cli import build_detector
    from kerasdet.models.ssd import SSD

    return build_detector(SSD, config, num_classes, default_weight_decay=5e-4)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from kerasdet.cli import recipe_main

    recipe_main(__file__)
