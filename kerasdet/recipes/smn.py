"""Spatial Memory Network (Chen & Gupta, "Spatial Memory for Context Reasoning in Object
Detection", ICCV 2017): stage-wise training recipe.

SMN is trained in stages (Sec. 5.4): the base C4 Faster R-CNN first, then the memory with
the base frozen, with the unroll length grown N = 2 -> 5 -> 10 (de-duplication is learned
in the short rollouts, then longer ones are bootstrapped from them). The runner
(:mod:`kerasdet.engine.runner`) trains ``train.stages`` in order through
:func:`stage_model`:

1. ``kind: "base"`` stages fit the FasterRCNN (``base`` section on the ``backbone``
   section) with the stage's optimizer/schedule.
2. ``kind: "memory"`` stages: ``SMN.configure(num_steps=params.num_steps)`` and a fresh
   ``fit`` of the memory weights (the base is frozen; a new optimizer per stage, as a new
   30k-iteration run per stage in the paper).
3. The runner evaluates (pycocotools), saves ``<work-dir>/model.weights.h5`` (the SMN,
   base included) and exports. ``--set base.weights=...`` starts from a trained base
   (then drop its stages with ``--set 'train.stages=[...]'``); the ``digits_mlp`` preset
   is the MLP control.

Presets:

* ``paper`` (Sec. 5.5): VGG16 ``conv5_3`` C4 base (tf-faster-rcnn: crop pool
  14 -> 7, fc6/fc7 4096 with dropout 0.5, RPN 512 channels, anchors 128-512 px (scales
  8/16/32 x 16) x 3 ratios, 256 anchors / 256 RoIs at 0.25 foreground, 2000 train / 300
  test proposals at NMS 0.7, test NMS 0.3), shorter side 600 / longer <= 1000, flip,
  SGD momentum 0.9, weight decay 5e-4, 1 image per step; base 70k iterations (VOC07,
  x0.1 at 50k), then each memory stage 30k iterations at lr 1e-3, x0.1 after 20k, N = 2,
  5, 10; inference N1 = 50 base writes + N2 = 10 memory steps, SoftMax, D = 256, 20x20
  prior, 14x14 write crop, 2 x fc2048, gates 256. Needs COCO-format data on disk
  (``--set data.train_annotations=...``; VGG16 ImageNet weights via
  ``--set backbone.weights=...``). Stage lengths are in steps (``fit_stage`` runs one
  ``fit`` of that many steps on the infinite training stream).
* ``digits``: the same model scaled to the embedded 128x128 digits set and a 2-core CPU:
  the small residual backbone's C4 (stride 16, 8x8 map), 9 anchors of 16-48 px, 64
  training / 64 test proposals, crop pool 14 -> 7, 2 x fc256; memory D = 64 (20x20 prior,
  64-channel gates), a 7x7 write crop and a 7x7 memory RoI crop without max-pool (the
  map is only 8x8: the paper's 14x14 would upsample 2x for 4x the cost), context net
  5 x 64, m-fc 2 x 256, fusion 256, 32 RoIs and 64 anchors per image and step; N1 = 5
  base writes (1-4 digits per image) + N2 = 5 memory steps. Adam. Base 2 + 2 epochs (2e-3 then 1e-3, each x0.1 at 75%; the
  C4 model on an 8x8 map learns slower than the FPN preset: AP 0.24 after 2 epochs, 0.52
  after 4); memory
  N = 2 / 5 / 10 for 100 / 75 / 50 steps of 16 images (0.9 epoch in all: an unrolled
  N = 10 step costs ~4-7 s on the loaded 2-core CPU, and tracing the unrolled graph
  minutes). The MLP control (``model.context = "mlp"``) trains one 225-step memory stage
  (the same number of memory-training steps and images).

Measured (``benchmarks/smn_digits.py``, 500 validation images, pycocotools; the base's 4
epochs ran as 2 + 2 from its saved weights, ``--base-continue 2``): base AP 0.523 / AP50
0.777 (0.517 / 0.765 at top-10), SMN N = 10 steps without any NMS 0.509 / 0.762 with 22
same-class duplicates (score >= 0.3) against 3046 for the base's top-10 without NMS
(AP 0.285), SMN final (N1 5 + N2 5) 0.503 / 0.741, MLP control 0.537 / 0.798. Memory
training 4.6 min, MLP 1.5 min, base 20.6 min on the shared, loaded 2-core CPU.

Run: ``python recipes/smn.py --preset digits`` (= ``kerasdet train --recipe smn --preset digits``).
"""
import os

from kerasdet.engine.builders import build_backbone
from kerasdet.recipes.datasets import COCO2017, DIGITS
from kerasdet.errors import ConfigError, DataFileNotFoundError
from kerasdet.models.faster_rcnn import FasterRCNN
from kerasdet.models.smn import SMN

MODEL_CLASS = SMN
#: ``base``: the C4 Faster R-CNN's keyword arguments, plus ``weights`` (a trained base to
#: start from, e.g. for the MLP control on the same base).
OPEN_SECTIONS = {"base": (FasterRCNN, {"weights": None})}
STAGE_PARAMS = {"num_steps": int, "train_mode": str}

DIGITS_BASE_STAGES = [
    {"name": "base_1", "kind": "base", "epochs": 2, "lr": 2e-3, "decay_at": (0.75,)},
    {"name": "base_2", "kind": "base", "epochs": 2, "lr": 1e-3, "decay_at": (0.75,), "warmup_steps": 0},
]

_PAPER = {
    "data": dict(COCO2017),
    "input": {"image_size": (1008, 1008), "min_size": 600, "max_size": 1000, "flip": True},
    "backbone": {"name": "vgg16", "weights": None, "output_layers": ("block5_conv3",)},
    "base": {
        "architecture": "c4", "feature_level": 4, "roi_pooler": "crop_pool", "crop_size": 14, "fc_dim": 4096,
        "num_fc": 2, "dropout": 0.5, "rpn_channels": 512, "anchor_size": 1.0, "scales": (8.0, 16.0, 32.0),
        "rpn_batch_size": 256, "rpn_pre_nms_topk_train": 12000, "rpn_post_nms_topk_train": 2000,
        "rpn_pre_nms_topk_test": 6000, "rpn_post_nms_topk_test": 300, "num_rois": 256,
        "nms_iou_threshold": 0.3, "box_weights": (10.0, 10.0, 5.0, 5.0),
    },
    "model": {  # every SMN default is the paper's
        "num_steps": 10, "num_base_writes": 50, "num_memory_steps": 10, "inference": "final",
        "selection": "softmax",
    },
    "train": {"batch_size": 1, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "warmup_steps": 0,
              "lr": 1e-3, "stages": [
                  {"name": "base", "kind": "base", "steps": 70000, "decay_steps": (50000,)},
                  {"name": "memory_n2", "kind": "memory", "steps": 30000, "decay_steps": (20000,),
                   "params": {"num_steps": 2}},
                  {"name": "memory_n5", "kind": "memory", "steps": 30000, "decay_steps": (20000,),
                   "params": {"num_steps": 5}},
                  {"name": "memory_n10", "kind": "memory", "steps": 30000, "decay_steps": (20000,),
                   "params": {"num_steps": 10}},
              ]},
    "eval": {"batch_size": 1},
}

_DIGITS = {
    "data": dict(DIGITS),
    "input": {"image_size": (128, 128), "flip": False, "cache_images": True, "max_boxes": 8},
    "backbone": {"name": "small", "widths": (32, 64, 96, 128), "blocks": (1, 1, 2, 1), "levels": ("C4",)},
    "base": {
        "architecture": "c4", "feature_level": 4, "roi_pooler": "crop_pool", "crop_size": 14, "fc_dim": 256,
        "rpn_channels": 64, "anchor_size": 1.0, "scales": (1.0, 2.0, 3.0), "rpn_batch_size": 128,
        "rpn_pre_nms_topk_train": 1000, "rpn_post_nms_topk_train": 64, "rpn_pre_nms_topk_test": 1000,
        "rpn_post_nms_topk_test": 64, "rpn_min_size": 2.0, "num_rois": 64, "score_threshold": 0.01,
    },
    "model": {
        "num_steps": 10, "num_base_writes": 5, "num_memory_steps": 5, "inference": "final", "selection": "softmax",
        "memory_channels": 64, "crop_size": 7, "memory_roi_crop": 7, "memory_roi_pool": 1,
        "memory_rpn_channels": 64, "memory_fc_dim": 256, "fusion_dim": 256, "num_rois": 32, "rpn_batch_size": 64,
        "score_threshold": 0.01,
    },
    "train": {"batch_size": 16, "optimizer": "adam", "weight_decay": 1e-5, "warmup_steps": 100, "lr": 1e-3,
              "stages": DIGITS_BASE_STAGES + [
                  {"name": "memory_n2", "kind": "memory", "steps": 100, "lr": 1e-3, "decay_at": (),
                   "warmup_steps": 20, "params": {"num_steps": 2}},
                  {"name": "memory_n5", "kind": "memory", "steps": 75, "lr": 1e-3, "decay_at": (), "warmup_steps": 0,
                   "params": {"num_steps": 5}},
                  {"name": "memory_n10", "kind": "memory", "steps": 50, "lr": 1e-3, "decay_at": (0.7,),
                   "warmup_steps": 0, "params": {"num_steps": 10}},
              ]},
    "eval": {"every_n_epochs": 100, "batch_size": 50},
}


def _digits_mlp():
    """The MLP control of Table 2 on the digits preset: the same base stages, then one
    225-step memory stage (the memory stages' steps and images) of the context MLP."""
    import copy

    config = copy.deepcopy(_DIGITS)
    config["model"]["context"] = "mlp"
    config["train"]["stages"] = DIGITS_BASE_STAGES + [
        {"name": "mlp", "kind": "memory", "steps": 225, "lr": 1e-3, "decay_at": (0.9,), "warmup_steps": 20,
         "params": {"num_steps": 1}}]
    return config


#: The context digits (``generate_digits(context_pairs=True)``): 1-2 pairs per image whose
#: classes follow ``(c + 5) % 10``, one member of a pair blurred to a blob with probability
#: 0.5, so its class can only be told from its partner (the context SMN is meant to use).
CONTEXT_DATA = {
    "kind": "digits",
    "dir": os.path.join("data", "digits_context"),
    "generate": {"num_train": 2000, "num_val": 500, "image_size": (128, 128), "min_digits": 2, "max_digits": 4,
                 "context_pairs": True, "degrade_probability": 0.5, "seed": 0},
}
#: Extra steps every context arm trains from the same plateaued base: the curriculum's
#: 100 + 75 + 50 memory steps and the 50 of the trained final mode.
CONTEXT_EXTRA_STEPS = 275


def _context(kind):
    """The context-claim presets (``benchmarks/paper_claims.py``: ``smn_context``,
    ``smn_vs_mlp``), all on :data:`CONTEXT_DATA`:

    * ``digits_context_base``: the C4 base alone, one 8-epoch stage (2e-3, x0.1 at 50% and
      80%; validation AP every epoch, the plateau check), scored with its own per-class NMS
      (``model.inference="base"``);
    * ``digits_context_base_more``: that base (``--set base.weights=...``) trained
      :data:`CONTEXT_EXTRA_STEPS` more steps at 1e-4 (the control for the extra head
      training the other arms get);
    * ``digits_context``: SMN on that base: the curriculum N = 2 / 5 / 10 (100 / 75 / 50
      steps), then 50 steps of the final mode trained (``train_mode="final"``, N1 = 5 base
      writes + N2 = 5 memory steps, Sec. 6.1), scored in the final mode;
    * ``digits_context_mlp``: the MLP control on that base, :data:`CONTEXT_EXTRA_STEPS`
      steps (width 77: SMN's inference-time parameter count, ``matched_mlp_channels``).
    """
    import copy

    config = copy.deepcopy(_DIGITS)
    config["data"] = copy.deepcopy(CONTEXT_DATA)
    config["eval"] = {"every_n_epochs": 1, "batch_size": 50}
    if kind == "base":
        config["model"]["inference"] = "base"
        config["train"]["stages"] = [{"name": "base", "kind": "base", "epochs": 8, "lr": 2e-3,
                                      "decay_at": (0.5, 0.8)}]
    elif kind == "base_more":
        config["model"]["inference"] = "base"
        config["train"]["stages"] = [{"name": "base_more", "kind": "base", "steps": CONTEXT_EXTRA_STEPS, "lr": 1e-4,
                                      "decay_at": (), "warmup_steps": 0}]
    elif kind == "memory":
        config["train"]["stages"] = [stage for stage in _DIGITS["train"]["stages"] if stage["kind"] == "memory"] + [
            {"name": "memory_final", "kind": "memory", "steps": 50, "lr": 1e-3, "decay_at": (0.7,),
             "warmup_steps": 0, "params": {"num_steps": 10, "train_mode": "final"}}]
    else:
        config["model"]["context"] = "mlp"
        config["model"]["mlp_channels"] = 77
        config["train"]["stages"] = [
            {"name": "mlp", "kind": "memory", "steps": CONTEXT_EXTRA_STEPS, "lr": 1e-3, "decay_at": (0.9,),
             "warmup_steps": 20, "params": {"num_steps": 1}}]
    return config


PRESETS = {"paper": _PAPER, "digits": _DIGITS, "digits_mlp": _digits_mlp(),
           "digits_context_base": _context("base"), "digits_context_base_more": _context("base_more"),
           "digits_context": _context("memory"), "digits_context_mlp": _context("mlp")}


def build_base(config, num_classes):
    """The C4 :class:`FasterRCNN` of the ``base`` section on the ``backbone`` section (with
    ``base.weights`` loaded when given)."""
    args = dict(config.section("base"))
    weights = args.pop("weights", None)
    base = FasterRCNN(backbone=build_backbone(config), num_classes=num_classes,
                      weight_decay=config.train.weight_decay, **args)
    base.build((None, *config.input.image_size, 3))
    if weights:
        if not os.path.isfile(weights):
            raise DataFileNotFoundError(f"base.weights: {weights} does not exist")
        base.load_weights(weights)
    return base


def build_model(config, num_classes):
    """SMN (or its MLP control, ``model.context = "mlp"``) on a C4 base. A run without a
    ``base`` stage needs ``base.weights`` (its base would stay untrained)."""
    stages = config.train.stages or []
    if stages and not any(stage.kind == "base" for stage in stages) and not config.section("base").get("weights"):
        raise ConfigError("base.weights: this run has no 'base' stage, so it needs a trained base "
                          "(--set base.weights=FILE)")
    return SMN(base=build_base(config, num_classes), weight_decay=config.train.weight_decay, **config.model)


def stage_model(model, stage, config):
    """The per-stage hook (Sec. 5.4's stage-wise training): a ``base`` stage trains the
    C4 Faster R-CNN alone; a ``memory`` stage freezes it and trains the memory with
    ``params.num_steps`` unrolled steps."""
    if stage.kind == "base":
        model.base.trainable = True
        return model.base, []
    if stage.kind != "memory":
        raise ConfigError(f"SMN stage {stage.name!r}: kind must be 'base' or 'memory', got {stage.kind!r}")
    model.base.trainable = False
    model.configure(num_steps=stage.params.get("num_steps", model.num_steps),
                    train_mode=stage.params.get("train_mode", "steps"))
    return model, []
