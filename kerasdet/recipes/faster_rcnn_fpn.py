"""Faster R-CNN with FPN (thesis ch. 4, §4.4) — and the digits CPU preset of the same model.

Presets:

* ``paper``: R50-FPN, RPN on P2-P6 (anchors 32²..512², ratios 1:2/1:1/2:1, 256 anchors per
  image at 0.7/0.3, NMS 0.7, 2000 train / 1000 test proposals), Fast R-CNN head on P2-P5
  (RoIAlign 7x7, 2 x fc1024, 512 RoIs per image, 25% foreground at IoU >= 0.5), 800/1333
  input padded to a multiple of 32, SGD lr 0.02 at batch 16 (scaled linearly to the batch
  you run), momentum 0.9, coupled weight decay 1e-4, 90k iterations with x0.1 decays at
  60k and 80k (the thesis trains RPN 30k+10k and Fast R-CNN 60k+20k separately; one joint
  schedule of Detectron's length is used here), 500-iteration warm-up from 1/3
  (Detectron), horizontal flip. Needs COCO on disk (``--set data.train_annotations=...``).
* ``digits``: the same architecture scaled to the embedded 128x128 digits set and a 2-core
  CPU: the small residual backbone (C2-C5), FPN P2-P6 with 64 channels, a 64-channel RPN
  with anchors 4x the stride (16 px on P2 .. 256 px on P6, half the paper's 8x because
  the digits are 15-45 px) and the Eq. 4.1 canonical size halved accordingly (112 px),
  1000 pre-NMS / 300 post-NMS training proposals (200 at test), 64 RoIs per image,
  2 x fc256 head, no flip (a mirrored digit is another glyph), Adam with warm-up and step
  decays.

Measured (``digits``, 500 validation images, pycocotools, 2 CPU cores shared with other
jobs, so wall times vary with their load):

* 5 epochs (the preset): AP 0.779, AP50 0.974, AP75 0.924; 16.8 min of training, 17.3 min
  end to end (epochs 1-3 ran at ~2.4 min each on a quiet machine, 4-5 under load);
* 8 epochs (``--set train.epochs=8``): AP 0.804, AP50 0.977, AP75 0.946; 42.3 min of
  training under heavy load (the process got 0.75 core on average; 33 CPU-minutes).

Run: ``python recipes/faster_rcnn_fpn.py --preset digits`` (same as
``kerasdet train --recipe faster_rcnn_fpn --preset digits``).
"""
from kerasdet.engine.builders import build_detector
from kerasdet.recipes.datasets import COCO2017, DIGITS
from kerasdet.models.faster_rcnn import FasterRCNN

#: The class the ``model`` section is passed to (its keyword parameters are the valid keys).
MODEL_CLASS = FasterRCNN

PRESETS = {
    "paper": {
        "data": dict(COCO2017),
        "input": {"image_size": (1344, 1344), "min_size": 800, "max_size": 1333, "flip": True},
        "backbone": {"name": "resnet50", "weights": None, "freeze_at": 2},
        "model": {},  # every FasterRCNN default is the paper's R50-FPN setting
        "train": {
            "batch_size": 16,
            "reference_batch": 16,
            "lr": 0.02,
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
        "backbone": {"name": "small", "widths": (32, 64, 96, 128), "blocks": (1, 1, 2, 1),
                     "levels": ("C2", "C3", "C4", "C5")},
        "model": {
            "fpn_channels": 64,
            "rpn_channels": 64,
            "anchor_size": 4.0,
            "canonical_size": 112.0,
            "rpn_pre_nms_topk_train": 1000,
            "rpn_post_nms_topk_train": 300,
            "rpn_pre_nms_topk_test": 1000,
            "rpn_post_nms_topk_test": 200,
            "num_rois": 64,
            "fc_dim": 256,
        },
        "train": {
            "batch_size": 16,
            "lr": 2e-3,
            "optimizer": "adam",
            "weight_decay": 1e-5,
            "epochs": 5,
            "decay_at": (0.75, 0.92),
            "warmup_steps": 100,
        },
        "eval": {"every_n_epochs": 4, "batch_size": 50},
    },
}


def build_model(config, num_classes):
    """FasterRCNN for a preset config (the house layout: backbone + model sections)."""
    return build_detector(FasterRCNN, config, num_classes)
