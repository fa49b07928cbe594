"""DeepMask (head C) and SharpMask segment proposals (T.-Y. Lin, "Detecting Common Objects in
Context", Cornell 2017 thesis, ch. 3 "SharpMask";
Pinheiro et al. 2015 "Learning to Segment Object Candidates" for the data and loss).

Training reads the ordinary detection stream with instance masks
(``input.masks="instances"``) and turns each batch into DeepMask patches
(:class:`~kerasdet.data.patches.PatchSampler`, the ``patches`` section;
``patch_size`` / ``context`` come from the ``model`` section) through the recipe's
``train_dataset`` hook. Stages (thesis §3.3.3): ``kind: deepmask`` trains trunk + head C
on mask + score; ``kind: refine`` freezes them and trains the refinement alone (stage
``params.positive_fraction``: the patches' positive share, 1.0 for the refinement, which
the released code trains on positives only). Evaluation: ``proposals_segm`` (box and
segment AR at 10 / 100 / 1000) of the full-image inference
(:meth:`~kerasdet.models.sharpmask.SharpMask.detect`).

Presets:

* ``deepmask`` / ``sharpmask`` (COCO 2017, ``--set data.train_annotations=...`` etc.,
  ``--set backbone.weights=resnet50_notop.h5`` for the ImageNet trunk the thesis starts
  from): DeepMask-ours (W160-P4-D39-F128 + head C, §3.5.1) and SharpMask on it (k = 32,
  schedule (b), §3.5.2). SGD momentum 0.9, weight decay 5e-4, 32 patches a step (4 images
  x 8) and lr 1e-3 as the released code; its DeepMask schedule is 1e-3 for 200k steps
  then 5e-4 (its first two regimes of 4,000-step epochs: 50 at 1e-3, 70 at 5e-4); the
  refinement stage's lr is the thesis' 1e-3, its length (200k steps) our choice (the
  thesis: "about 2 days" on a K40). Images at their COCO size (shorter side 480, longer
  at most 640; patches rescale to the objects anyway); the released code crops from the
  original files. The trunk trains from conv1 with frozen BN (released code).
* ``deepmask_digits`` / ``sharpmask_digits``: the same architectures on the embedded
  digits for a 2-core CPU: the small backbone to C4, W = 48 (+32 px context), F = 32, a
  128-d vector, 24x24 DeepMask masks, the thesis' k = 32 (k = 16, whose M^5 has one
  channel, learned far slower: mean mask loss 0.47 vs 0.057 over steps 100-200 of the
  refinement stage from the same DeepMask weights, measured), 100 proposals per image;
  Adam 1e-3, 600 + 400 steps of 8 images x 8 patches.
"""
import copy

from kerasdet.data.patches import PatchSampler, patch_dataset
from kerasdet.engine.builders import build_backbone
from kerasdet.errors import ConfigError
from kerasdet.models.sharpmask import RESNET_TRUNK_LAYERS, STAGES, SharpMask, small_trunk_layers, truncated_backbone
from kerasdet.recipes.datasets import COCO2017, DIGITS

MODEL_CLASS = SharpMask
OPEN_SECTIONS = {"patches": (PatchSampler, None)}
STAGE_PARAMS = {"positive_fraction": float}

_COCO = {
    "data": dict(COCO2017),
    "input": {"image_size": (640, 640), "min_size": 480, "max_size": 640, "flip": False, "masks": "instances",
              "max_boxes": 32},
    "backbone": {"name": "resnet50", "weights": None, "freeze_at": 0},
    "model": {"refinement": False},  # every other default is the thesis' configuration
    "patches": {"patches_per_image": 8, "positive_fraction": 0.5},
    "train": {"batch_size": 4, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "lr": 1e-3,
              "warmup_steps": 0, "stages": [
                  {"name": "deepmask", "kind": "deepmask", "steps": 480_000, "decay_steps": (200_000,),
                   "decay": 0.5}]},
    "eval": {"metric": "proposals_segm", "every_n_epochs": 1, "batch_size": 1},
}

_DIGITS = {
    "data": dict(DIGITS),
    "input": {"image_size": (128, 128), "flip": False, "masks": "instances", "max_boxes": 8, "cache_images": True},
    "backbone": {"name": "small", "widths": (16, 32, 48, 64), "blocks": (1, 1, 1, 1), "levels": ("C4",)},
    "model": {"refinement": False, "patch_size": 48, "context": 32, "features": 32, "embedding": 128,
              "mask_size": 24, "score_hidden": 128, "skip_hidden": 16, "num_proposals": 100},
    "patches": {"patches_per_image": 8, "positive_fraction": 0.5},
    "train": {"batch_size": 8, "optimizer": "adam", "weight_decay": 1e-5, "lr": 1e-3, "warmup_steps": 50,
              "stages": [{"name": "deepmask", "kind": "deepmask", "steps": 600, "decay_at": (0.8,)}]},
    "eval": {"metric": "proposals_segm", "every_n_epochs": 1000, "batch_size": 50},
}


def _with_refinement(preset, steps, lr, decay_at=()):
    config = copy.deepcopy(preset)
    config["model"]["refinement"] = True
    config["train"]["stages"].append({"name": "refine", "kind": "refine", "steps": steps, "lr": lr,
                                      "decay_at": decay_at, "params": {"positive_fraction": 1.0}})
    return config


PRESETS = {
    "deepmask": _COCO,
    "sharpmask": _with_refinement(_COCO, 200_000, 1e-3),
    "deepmask_digits": _DIGITS,
    "sharpmask_digits": _with_refinement(_DIGITS, 400, 1e-3, decay_at=(0.8,)),
}


def trunk_layers(config):
    """SharpMask's skip features of the configured backbone (ResNet-50 or small)."""
    name = config.backbone["name"]
    if name == "resnet50":
        return dict(RESNET_TRUNK_LAYERS)
    if name == "small":
        return small_trunk_layers(config.backbone.get("blocks", (1, 1, 2, 1)))
    raise ConfigError(f"sharpmask: backbone.name must be resnet50 or small, got {name!r}")


def build_model(config, num_classes):
    """SharpMask on the backbone cut at stride 16 (its skip levels kept), in the last
    stage's ``kind`` unless ``model.stage`` is set; class-agnostic, so ``num_classes``
    (the data's) is not used."""
    del num_classes
    args = dict(config.model)
    args.pop("weights", None)
    args.pop("freeze", None)
    # a model rebuilt from run.json (evaluate, export) is in its last stage; training
    # sets each stage's own with stage_model
    last = config.train.resolved_stages()[-1].kind
    if last in STAGES and (last != "refine" or args.get("refinement", True)):
        args.setdefault("stage", last)
    trunk = truncated_backbone(build_backbone(config), trunk_layers(config))
    return SharpMask(backbone=trunk, weight_decay=config.train.weight_decay, **args)


def sampler(config, stage=None):
    """The stage's :class:`PatchSampler`: the ``patches`` section, the model's patch size
    and context, and the stage's ``params.positive_fraction``."""
    args = dict(config.section("patches"))
    for key in ("patch_size", "context"):
        if key in args:
            raise ConfigError(f"patches.{key}: set model.{key} instead (the sampler takes the model's)")
    model = SharpMask.__init__.__kwdefaults__
    args["patch_size"] = config.model.get("patch_size", model["patch_size"])
    args["context"] = config.model.get("context", model["context"])
    if stage is not None and "positive_fraction" in stage.params:
        args["positive_fraction"] = stage.params["positive_fraction"]
    return PatchSampler(**args)


def train_dataset(dataset, stage, config, *, seed, start_batch):
    """Patch batches of the detection stream (``patch_dataset``, seeded by stream position)."""
    return patch_dataset(dataset, sampler(config, stage), seed=seed, start_batch=start_batch)


def stage_model(model, stage, config):
    """``model.set_stage(stage.kind)``: ``deepmask`` or ``refine`` (thesis §3.3.3)."""
    if stage.kind not in STAGES:
        raise ConfigError(f"sharpmask stage {stage.name!r}: kind must be one of {STAGES}, got {stage.kind!r}")
    model.set_stage(stage.kind)
    return model, []
