"""FPN mask proposals (T.-Y. Lin, "Detecting Common Objects in Context", Cornell 2017 thesis,
§4.6, Table 4.6): :class:`~kerasdet.models.fpn_proposals.FPNProposals` trained end to end on
whole images with instance masks (``input.masks="instances"``; no patch sampling, unlike the
DeepMask / SharpMask recipe :mod:`kerasdet.recipes.sharpmask`), scored by ``proposals_segm``
(box and segment AR at 10 / 100 / 1000, AR^S/M/L at 1000).

Presets:

* ``fpn_proposals`` (COCO 2017, ``--set data.train_annotations=...`` etc., ``--set
  backbone.weights=resnet50_notop.h5`` for the ImageNet initialization): the dual-MLP model
  of Table 4.6 (ResNet-50 FPN P2-P6 at d = 128, 5x5 + 7x7 MLPs, 14x14 masks; ``--set
  model.mask_size=28`` is the "+ 2x mask resolution" row). The thesis states no training
  schedule (its appendix is not in the text); ours: shorter side 800 (at most 1333, §4.5.1's
  input), no flip, SGD momentum 0.9, weight decay 1e-4, 16 images a step at lr 0.03 for 80k
  steps with x0.1 after 60k (the FPN RPN's 8-GPU x 2-image batch of §4.4.1), 500-step warm-up
  from 1/3; "+ 2x train schedule" (the last row of Table 4.6) is ``--set train.stages.0.steps=
  160000 --set 'train.stages.0.decay_steps=[120000]'``. At most 64 objects per image.
  Evaluation pastes 1000 canvas-sized masks per image (1000 x 1344 x 1344 float32 = 7.2 GB),
  hence one image an evaluation batch; ``--set model.num_proposals=100`` for a smaller host.
* ``fpn_proposals_digits``: the same architecture on the embedded digits for a 2-core CPU,
  at DeepMask / SharpMask digits' budget (600 steps of 8 images, Adam 1e-3, the ``*_digits``
  presets of :mod:`kerasdet.recipes.sharpmask`): the small backbone C2-C5, FPN P2-P5 at d =
  32, 128-channel MLPs, canonical scales halved (16 px on P2's 5x5 MLP: the digits are 15-45
  px, so P2-P4 carry them), 14x14 masks, 100 proposals per image.
"""
from kerasdet.engine.builders import build_detector
from kerasdet.models.fpn_proposals import FPNProposals
from kerasdet.recipes.datasets import COCO2017, DIGITS

MODEL_CLASS = FPNProposals

PRESETS = {
    "fpn_proposals": {
        "data": dict(COCO2017),
        "input": {"image_size": (1344, 1344), "min_size": 800, "max_size": 1333, "flip": False,
                  "masks": "instances", "max_boxes": 64},
        "backbone": {"name": "resnet50", "weights": None, "freeze_at": 2},
        "model": {},  # every FPNProposals default is the thesis' dual-MLP configuration
        "train": {"batch_size": 16, "reference_batch": 16, "optimizer": "sgd", "momentum": 0.9,
                  "weight_decay": 1e-4, "lr": 0.03, "warmup_steps": 500, "warmup_factor": 1.0 / 3.0,
                  "stages": [{"name": "train", "steps": 80_000, "decay_steps": (60_000,)}]},
        "eval": {"metric": "proposals_segm", "every_n_epochs": 1, "batch_size": 1},
    },
    "fpn_proposals_digits": {
        "data": dict(DIGITS),
        "input": {"image_size": (128, 128), "flip": False, "masks": "instances", "max_boxes": 8,
                  "cache_images": True},
        "backbone": {"name": "small", "widths": (16, 32, 48, 64), "blocks": (1, 1, 1, 1),
                     "levels": ("C2", "C3", "C4", "C5")},
        "model": {"max_level": 5, "fpn_channels": 32, "hidden": 128, "canonical_size": 16.0, "num_proposals": 100},
        "train": {"batch_size": 8, "optimizer": "adam", "weight_decay": 1e-5, "lr": 1e-3, "warmup_steps": 50,
                  "stages": [{"name": "train", "steps": 600, "decay_at": (0.8,)}]},
        "eval": {"metric": "proposals_segm", "every_n_epochs": 1000, "batch_size": 50},
    },
}


def build_model(config, num_classes):
    """FPNProposals on the configured backbone; class-agnostic, so ``num_classes`` (the
    data's) is not used."""
    del num_classes
    return build_detector(FPNProposals, config, 1)
