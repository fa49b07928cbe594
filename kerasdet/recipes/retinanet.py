"""RetinaNet (thesis ch. 5, "Focal Loss for Dense Object Detection").

Presets:

* ``paper``: R50-FPN, P3-P7, 9 anchors, 4x256 subnets, 800/1333 input, SGD 0.01 at batch 16
  (scaled linearly to the batch you run), momentum 0.9, coupled weight decay 1e-4,
  decays x0.1 at 60k and 80k of 90k iterations, 500-iteration linear warm-up from 1/3
  (Detectron), horizontal flip (the ICCV paper's only augmentation). Needs COCO on disk:
  ``--set data.train_annotations=... --set data.train_images=...`` etc.
* ``digits``: the same architecture scaled to the embedded digits set and a 2-core CPU:
  a small residual backbone, FPN P3-P5 with 64 channels, 2x64 subnets, anchors 2x the
  stride (16 px on P3: the digits are 15-45 px), no flip (a mirrored digit is another
  glyph), Adam 1e-3 for 9 epochs with a 200-step linear warm-up. Chosen by measurement
  on the 2-core CPU: at 2e-3 a short run could collapse after the warm-up from round-off
  alone (2 epochs, seeds 0 / 1 / 2: AP 0.072 / 0.000 / 0.455), at 1e-3 none did (0.237 /
  0.473 / 0.382, losses falling) and the 9-epoch AP is the same (0.737 vs 0.736); the 100-step warm-up let the first epoch spike (epoch-1 mean loss
  2.4 instead of 0.8) and cost ~5 AP50 points at the end; C2 has no residual block (its
  64x64/32x32 backward passes cost ~28% of the backbone's step time; C2 is not a pyramid
  input); labels are padded to 16 boxes, not 100 (the generator puts at most 4 digits in
  an image), which makes anchor matching ~6x cheaper.

* ``keras_hub``: the ``paper`` preset with the architecture of keras-hub's
  ``retinanet_resnet50_fpn_coco`` (torchvision's v1.5 ResNet-50 with ImageNet mean/std
  normalization, torchvision's anchor grid), so that ``--set model.weights=PRESET_DIR``
  loads that preset (see :mod:`kerasdet.weights`); fine-tunes to the data's classes.

Run: ``python recipes/retinanet.py --preset digits`` (same as
``kerasdet train --recipe retinanet --preset digits``).
"""
from kerasdet.engine.builders import build_detector
from kerasdet.recipes.datasets import COCO2017, DIGITS
from kerasdet.models.retinanet import RetinaNet

#: The class the ``model`` section is passed to (its keyword parameters are the valid keys).
MODEL_CLASS = RetinaNet

PRESETS = {
    "paper": {
        "data": dict(COCO2017),
        "input": {"image_size": (1408, 1408), "min_size": 800, "max_size": 1333, "flip": True},
        "backbone": {"name": "resnet50", "weights": None, "freeze_at": 2},
        "model": {},  # every RetinaNet default is the paper's
        "train": {
            "batch_size": 16,
            "reference_batch": 16,
            "lr": 0.01,
            "optimizer": "sgd",
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "epochs": 12,  # 90k iterations of 16 images ~ 12.2 COCO epochs
            "decay_steps": (60000, 80000),
            "warmup_steps": 500,
            "warmup_factor": 1.0 / 3.0,
        },
        "eval": {"every_n_epochs": 1, "batch_size": 8},
    },
    "digits": {
        "data": dict(DIGITS),
        "input": {"image_size": (128, 128), "flip": False, "cache_images": True, "max_boxes": 16},
        "backbone": {"name": "small", "widths": (32, 64, 96, 128), "blocks": (0, 1, 2, 1)},
        "model": {
            "min_level": 3,
            "max_level": 5,
            "fpn_channels": 64,
            "head_convs": 2,
            "head_channels": 64,
            "anchor_size": 2.0,
        },
        "train": {
            "batch_size": 16,
            "lr": 1e-3,
            "optimizer": "adam",
            "weight_decay": 1e-5,
            "epochs": 9,
            "decay_at": (0.75, 0.92),
            "warmup_steps": 200,
        },
        "eval": {"every_n_epochs": 3, "batch_size": 50},
    },
}


PRESETS["keras_hub"] = {
    **PRESETS["paper"],
    "backbone": {"name": "resnet50", "weights": None, "freeze_at": 2, "stride_in_3x3": True,
                 "batchnorm_epsilon": 1e-5,
                 "normalization": {"mean": [123.675, 116.28, 103.53],
                                   "scale": [1 / (255 * 0.229), 1 / (255 * 0.224), 1 / (255 * 0.225)],
                                   "reverse_channels": False}},
    "model": {"anchor_center_offset": 0.0, "anchor_round_to_pixels": True, "weights": None, "freeze": "none"},
}


def build_model(config, num_classes):
    """RetinaNet for a preset config (the house layout: backbone + model sections)."""
    return build_detector(RetinaNet, config, num_classes)
