"""decompNet, the recurrent instance decomposer (Park & Berg, "Learning to decompose for object detection and instance
segmentation", 2016).

Presets (data: the paper's protocol from the embedded digits generator, §3.1: 100x100
grayscale images, 5-10 digits of classes {3, 6, 9}, scale 0.5-2, tight-box IoU <= 0.2, 30
clutter patches of 8x8 digit pieces (Mnih et al. 2014), train and test digits from
disjoint source pools; instance masks are the digits' ink):

* ``paper``: 30,000 / 10,000 images, the App. B networks (category net, 2 x 2048-unit
  recurrent layers, T = 11 steps, 50x50 maps, box regressor 4096 hidden), the paper's
  three stages by ``model.fit`` with the 0.3 -> 1.0 warm-up of lambda/gamma (and p) after
  the first epoch of stages 1 and 2. The paper gives no optimizer settings: our
  choices (SGD momentum 0.9, lr 1e-2, batch 32, weight decay 5e-4, x0.1 at 2/3 of each
  stage; stage epochs 20 / 30 / 10, the last at lr 1e-3) and a final box stage of 5 epochs.
* ``paper_full``: the same with 100x100 maps ("decomp full").
* ``digits``: a 2-core CPU budget (9.7 min end to end, measured), the configuration measured best there by
  ``benchmarks/decompnet_digits.py``: 1,500 / 300 protocol images, batch 8, the detection
  variant (filled box masks as instance targets, §3.1: the paper's detection
  experiment has no segmentation label), the paper's "all convolutional recurrent"
  alternative (``cell="conv_gru"``, one ConvGRU layer of 32 channels on the 7x7 grid; it
  learned faster than the fully connected 2048-unit cell, which at 8.9 s/step is not a
  CPU model), 16-channel instance convolutions, stop rule ``"bright"`` (the ConvGRU puts
  its black maps first, see :mod:`kerasdet.models.decompnet`); Adam (our fallback
  when SGD stalls; the sum-over-pixels loss makes SGD's step size data dependent), stages
  15 / 8 / 1 epochs + 1 box epoch, lambda = gamma = p = 0.3 for the first 6 epochs of
  stages 1-2 (the paper's warm-up is one epoch of 30,000 images, more than this whole
  run sees). ``--set model.cell=fc --set model.recurrent_layers=2`` is the paper's cell,
  ``--set model.target=masks`` the segmentation variant. BatchNormalization uses Torch's
  momentum (the paper's framework), see :mod:`kerasdet.layers.decomposer`.

Run: ``python recipes/decompnet.py --preset digits`` (= ``kerasdet train --recipe decompnet
--preset digits``) trains the stages through the runner, evaluates with pycocotools,
exports a SavedModel (``detection_masks`` included) to ``saved_models/decompnet_<preset>``. ``benchmarks/decompnet_digits.py`` adds the
sliding-window baseline, per-class PR curves and count accuracy.
"""
import os

from kerasdet.callbacks import DecompositionWarmup
from kerasdet.errors import ConfigError
from kerasdet.models.decompnet import DecompNet

MODEL_CLASS = DecompNet
STAGE_PARAMS = {"warmup_epochs": int}
STAGES = ("category", "instance", "joint", "box")

_PROTOCOL = {"image_size": (100, 100), "min_digits": 5, "max_digits": 10, "scale_range": (0.5, 2.0),
             "max_iou": 0.2, "num_clutter": 30, "clutter_style": "patches", "classes": (3, 6, 9),
             "grayscale": True, "seed": 0}
_INPUT = {"image_size": (100, 100), "masks": "instances", "max_boxes": 12, "flip": False, "cache_images": True}


def _stage(kind, epochs, lr, warmup_epochs=0):
    """A stage of the paper's training order; ``warmup_epochs`` of lambda = gamma = p = 0.3."""
    return {"name": kind, "kind": kind, "epochs": epochs, "lr": lr, "params": {"warmup_epochs": warmup_epochs}}

def _paper(full):
    return {
        "data": {"kind": "digits", "dir": os.path.join("data", "digits369_paper"),
                 "generate": dict(_PROTOCOL, num_train=30000, num_val=10000)},
        "input": dict(_INPUT, cache_images=False),
        "model": {"full_resolution": full, "steps": 11, "max_instances": 10, "units": 2048,
                  "box_hidden": 4096, "target": "masks", "instance_activation": "relu"},
        # SGD: x0.1 at 2/3 of each stage.
        "train": {"batch_size": 32, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "clipnorm": 5.0,
                  "schedule": "step", "decay_at": (2 / 3,),
                  "stages": [_stage("category", 20, 1e-2, warmup_epochs=1),
                             _stage("instance", 30, 1e-2, warmup_epochs=1),
                             _stage("joint", 10, 1e-3),
                             _stage("box", 5, 1e-3)]},
        "eval": {"batch_size": 50},
    }


PRESETS = {
    "paper": _paper(False),
    "paper_full": _paper(True),
    "digits": {
        "data": {"kind": "digits", "dir": os.path.join("data", "digits369_1500_300"),
                 "generate": dict(_PROTOCOL, num_train=1500, num_val=300)},
        "input": dict(_INPUT),
        "model": {"full_resolution": False, "steps": 11, "max_instances": 10, "cell": "conv_gru",
                  "recurrent_layers": 1, "conv_gru_filters": 32, "units": 512, "instance_filters": 16,
                  "box_hidden": 1024, "target": "boxes", "instance_activation": "relu", "stop": "bright"},
        # Adam: cosine decay over each stage to 0.05 x lr.
        "train": {"batch_size": 8, "optimizer": "adam", "weight_decay": 1e-5, "clipnorm": 5.0,
                  "schedule": "cosine", "cosine_alpha": 0.05,
                  "stages": [_stage("category", 15, 2e-3, warmup_epochs=6),
                             _stage("instance", 8, 1e-3, warmup_epochs=6),
                             _stage("joint", 1, 3e-4),
                             _stage("box", 1, 1e-3)]},
        "eval": {"batch_size": 50},
    },
}


def build_model(config, num_classes):
    """A :class:`~kerasdet.models.decompnet.DecompNet` for a preset config."""
    return DecompNet(num_classes=num_classes, image_size=config.input.image_size,
                     weight_decay=config.train.weight_decay, **config.model)


def stage_model(model, stage, config):
    """The per-stage hook: ``model.set_stage(stage.kind)`` (which sub-networks train) and
    the lambda/gamma/p warm-up (:class:`~kerasdet.callbacks.DecompositionWarmup`, 0.3 for
    ``params.warmup_epochs`` epochs, then 1.0)."""
    if stage.kind not in STAGES:
        raise ConfigError(f"decompNet stage {stage.name!r}: kind must be one of {STAGES}, got {stage.kind!r}")
    model.set_stage(stage.kind)
    return model, [DecompositionWarmup(epochs=stage.params.get("warmup_epochs", 0))]
