"""R-FCN, CoupleNet and Attention CoupleNet (the Attention CoupleNet paper, Zhu et al., and the CoupleNet it
extends).

One model class (:class:`kerasdet.models.rfcn.RFCN`) serves the three detectors: R-FCN is
``global_branch=False``, CoupleNet adds the global branch with the context box and the
1x1-conv + sum coupling, Attention CoupleNet is CoupleNet on a backbone with cascade
attention blocks at conv2/3/4 (supervised by the union of the instance masks,
``input.masks = "union"``).

Presets:

* ``rfcn`` / ``couplenet`` / ``acouplenet``: the VOC07 configurations of the Attention CoupleNet paper's §IV (Experiments):
  ResNet-101 with dilated conv5 (stride 16), frozen BN, conv1 + res2 frozen
  (``freeze_at=2``; local ImageNet weights via ``--set backbone.weights=...``), RPN on C4
  (512 ch, 9 anchors 128-512 px, 300 proposals), ``conv_new_1`` 1024, k = 7 PSRoI pooling,
  OHEM 128 of all 300 proposals + GT, 21 classes (VOC: 20 + background), shorter side 600
  / longer side <= 1000 (canvas 1008, a multiple of the stride 16), horizontal flip. SGD
  lr 0.001 (2 images per step: the paper's 1 GPU x ``iter_size`` 2), momentum 0.9, weight
  decay 5e-4, x0.1 after 80k iterations; 13 epochs of VOC07+12 trainval (16,551 images,
  8,275 steps per epoch) = 107.6k iterations, the nearest whole-epoch length to the
  paper's 110k (the CLI counts whole epochs). ``acouplenet`` takes instance masks for the
  attention targets (the paper's "+S": SBD instance annotations): VOC XML has none, so
  from a VOCdevkit the targets are the filled boxes; for SBD masks use ``data.kind=coco``
  with a COCO JSON carrying the segmentations (``kerasdet convert voc2coco`` writes the
  boxes part). VOC is read from a VOCdevkit folder
  (``--set data.voc_root=/path/VOCdevkit``) and scored with the VOC07 11-point mAP. Other schedules of the papers (VOC12: 60k + 20k
  at 4 images; COCO: 510k + 70k at 4 images, or with attention 150k + 30k at 16) are a
  ``--set train.decay_steps=... --set train.epochs=... --set train.batch_size=...`` away.
* ``rfcn_digits`` / ``couplenet_digits`` / ``acouplenet_digits``: the same three models
  scaled to the embedded 128x128 digits set and a 2-core CPU, identical except for the
  global branch and the attention blocks so they compare under one budget: the small
  residual backbone with a dilated C5 (C4 and C5 at stride 16, 8x8 maps), 9 anchors of
  16-48 px, 64 training (+ GT) / 100 test proposals, OHEM 32 (the paper's ~300 -> 128 ratio
  scaled to 1-4 digits per image), ``conv_new_1`` 128, k = 3 with
  bilinear PSRoI bins (``psroi_method="align"``: at 8x8 cells most digits span 1-3
  cells, where exact integer bins are mostly empty or 1 cell), a 3x3 global pooling with
  128-channel global convs, attention blocks of 32 channels at C2/C3/C4 whose targets count a
  cell as object at 25% ink (``attention_target_threshold``: the digits' 2-4 px strokes reach
  50% of a stride-16 cell for only 34% of the digits). Adam with warm-up
  and step decay, 4 epochs, no flip (a mirrored digit is another glyph). Measured step
  time (batch 16, this 2-core CPU, lightly loaded): R-FCN 0.23 s, CoupleNet 0.36 s, so
  4 epochs of 250 steps take ~4 / ~6 min of training.

Run: ``python recipes/couplenet.py --preset couplenet_digits`` (same as
``kerasdet train --recipe couplenet --preset couplenet_digits``).
"""
from kerasdet.engine.builders import build_detector
from kerasdet.recipes.datasets import DIGITS, VOC0712
from kerasdet.models.rfcn import RFCN

#: The class the ``model`` section is passed to (its keyword parameters are the valid keys).
MODEL_CLASS = RFCN

#: VOC 07+12 -> VOC2007 test (Attention CoupleNet §IV), from a VOCdevkit folder.
_VOC_DATA = VOC0712
_PAPER_MODEL = {  # every RFCN default is the paper's; named here for the reader
    "conv_new_channels": 1024,
    "group_size": 7,
    "psroi_method": "pool",
    "rpn_channels": 512,
    "rpn_post_nms_topk_train": 300,
    "rpn_post_nms_topk_test": 300,
    "ohem_rois": 128,
    "nms_iou_threshold": 0.3,
}
_PAPER_TRAIN = {
    "batch_size": 2,
    "reference_batch": 2,
    "lr": 1e-3,
    "optimizer": "sgd",
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "epochs": 13,
    "decay_steps": (80000,),
    "warmup_steps": 0,
}


def _paper(global_branch, attention):
    backbone = {"name": "resnet101_dilated", "weights": None, "freeze_at": 2, "frozen_batchnorm": True,
                "dilate_c5": True}
    inp = {"image_size": (1008, 1008), "min_size": 600, "max_size": 1000, "flip": True}
    if attention:
        backbone.update(attention_levels=(2, 3, 4), attention_channels=256)
        inp["masks"] = "union"
    return {
        "data": dict(_VOC_DATA),
        "input": inp,
        "backbone": backbone,
        "model": dict(_PAPER_MODEL, global_branch=global_branch, context=True, coupling_norm="conv",
                      coupling_op="sum"),
        "train": dict(_PAPER_TRAIN),
        # VOC2007 test mAP at IoU 0.5 with the 11-point VOC07 AP (py-faster-rcnn's
        # use_07_metric, which both papers' released code evaluates with).
        "eval": {"every_n_epochs": 13, "batch_size": 2, "metric": "voc07"},
    }


_DIGITS_DATA = DIGITS
_DIGITS_MODEL = {
    "conv_new_channels": 128,
    "group_size": 3,
    "psroi_method": "align",
    "global_pool_size": 3,
    "global_channels": 128,
    "rpn_channels": 64,
    "anchor_size": 1.0,
    "scales": (1.0, 2.0, 3.0),
    "rpn_pre_nms_topk_train": 1000,
    "rpn_post_nms_topk_train": 64,
    "rpn_pre_nms_topk_test": 1000,
    "rpn_post_nms_topk_test": 100,
    "rpn_min_size": 2.0,
    "ohem_rois": 32,
    "score_threshold": 0.01,
}
_DIGITS_TRAIN = {
    "batch_size": 16,
    "lr": 2e-3,
    "optimizer": "adam",
    "weight_decay": 1e-5,
    "epochs": 4,
    "decay_at": (0.75,),
    "warmup_steps": 100,
}


def _digits(global_branch, attention):
    backbone = {"name": "small", "widths": (32, 64, 96, 128), "blocks": (1, 1, 2, 1), "levels": ("C4", "C5"),
                "dilate_c5": True}
    inp = {"image_size": (128, 128), "flip": False, "cache_images": True, "max_boxes": 8}
    model = dict(_DIGITS_MODEL, global_branch=global_branch)
    if attention:
        backbone.update(attention_levels=(2, 3, 4), attention_channels=32)
        inp["masks"] = "union"
        # the digits' ink strokes are 2-4 px: at 0.5 only 34% of them get a positive stride-16
        # cell (the C4 block would learn to switch them off); 91% at 0.25
        model["attention_target_threshold"] = 0.25
    return {
        "data": dict(_DIGITS_DATA),
        "input": inp,
        "backbone": backbone,
        "model": model,
        "train": dict(_DIGITS_TRAIN),
        "eval": {"every_n_epochs": 4, "batch_size": 50},
    }


PRESETS = {
    "rfcn": _paper(False, False),
    "couplenet": _paper(True, False),
    "acouplenet": _paper(True, True),
    "rfcn_digits": _digits(False, False),
    "couplenet_digits": _digits(True, False),
    "acouplenet_digits": _digits(True, True),
}


def build_model(config, num_classes):
    """RFCN for a preset config (the house layout: backbone + model sections)."""
    return build_detector(RFCN, config, num_classes)
