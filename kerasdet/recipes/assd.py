"""SSD and ASSD (Yi, Wu & Metaxas 2019, "ASSD: Attentive Single Shot Multibox Detector").

Presets:

* ``assd321`` / ``assd513``: the paper's COCO configurations (Yi et al., "ASSD: Attentive Single Shot
  Multibox Detector", §4-§5):
  ResNet-101 (local ImageNet weights via ``--set backbone.weights=...``), 7 sources
  conv3..conv9, fusion on conv3, one attention unit per source, SGD lr 1e-3 (for the
  paper's batch: 80 at 321, 64 at 513), momentum 0.9, weight decay 5e-4, no warm-up,
  x0.1 at epochs 100/150 of 160 (321) and 80/130 of 140 (513), SSD augmentation
  (photometric, expand, IoU crop, flip). Backbone BN is frozen (our choice; the paper is silent: the
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
from kerasdet.engine.builders import build_detector
from kerasdet.recipes.datasets import COCO2017, DIGITS, VOC0712
from kerasdet.models.ssd import SSD

#: The class the ``model`` section is passed to (its keyword parameters are the valid keys).
MODEL_CLASS = SSD

_DIGITS_DATA = DIGITS
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


_COCO_DATA = COCO2017
#: PASCAL VOC 07+12 -> VOC2007 test: the ASSD paper's Tables 2-3 protocol.
_VOC_DATA = VOC0712


def _paper(size, batch, epochs, decays, dataset="coco"):
    from kerasdet.models.ssd import ASSD321_EXTRAS, ASSD513_EXTRAS

    voc = dataset == "voc"
    return {
        "data": dict(_VOC_DATA if voc else _COCO_DATA),
        "input": {"image_size": (size, size), "flip": True, "ssd_augmentation": True},
        "backbone": {"name": "resnet101", "weights": None, "freeze_at": 0},
        "model": {
            "attention": True,
            "fusion": True,
            "extra_layers": ASSD513_EXTRAS if size == 513 else ASSD321_EXTRAS,
            "attention_block_size": 1024 if size == 513 else None,
            "max_detections": 200 if voc else 100,  # the paper gives no cap: 200 for VOC, 100 for COCO
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
        # VOC2007 test: the 11-point VOC07 mAP at IoU 0.5 (the released evaluation code's
        # use_07=True); COCO: pycocotools.
        "eval": {"every_n_epochs": 10, "batch_size": 8, "metric": "voc07" if voc else "coco"},
    }


PRESETS = {
    "assd321": _paper(321, 80, 160, (100, 150)),
    "assd513": _paper(513, 64, 140, (80, 130)),
    # VOC07 test after 07+12 (paper Table 2): 280 epochs (x0.1 at 200, 250) at 321 px,
    # 180 (120, 170) at 513 px.
    "assd321_voc": _paper(321, 80, 280, (200, 250), dataset="voc"),
    "assd513_voc": _paper(513, 64, 180, (120, 170), dataset="voc"),
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
    """SSD for a preset config (the house layout: backbone + model sections)."""
    return build_detector(SSD, config, num_classes)
