"""decompNet's comparison model: a sliding-window CNN classifier with NMS (Park & Berg,
"Learning to decompose for object detection and instance segmentation", ICLR 2016
workshop, §3: "a sliding window approach with a CNN classifier followed by NMS").

:class:`kerasdet.models.sliding_window.SlidingWindowDetector` (5 square window sizes
14-56 px, step 5 px: 978 windows on 100x100, NMS 0.3) as a recipe, so the baseline trains
through the runner like every detector (``benchmarks/paper_claims.py --claim decompnet``).

Presets:

* ``digits``: the data of the decompNet ``digits`` preset (the paper's 3-6-9 protocol at
  1,500 / 300 images: same folder, same generator settings) and the training the decompNet
  benchmark gave the baseline: batch 16, Adam 2e-3 with cosine decay, 4 epochs
  (``benchmarks/decompnet_digits.py --baseline-epochs 4``).
* ``paper``: the same on the paper's 30,000 / 10,000 images.

Run: ``kerasdet train --recipe sliding_window --preset digits``.
"""
from kerasdet.models.sliding_window import SlidingWindowDetector
from kerasdet.recipes.decompnet import PRESETS as _DECOMPNET

MODEL_CLASS = SlidingWindowDetector


def _preset(decompnet_preset, epochs):
    source = _DECOMPNET[decompnet_preset]
    return {
        "data": dict(source["data"]),
        "input": dict(source["input"], masks=None),
        "model": {},
        "train": {"batch_size": 16, "optimizer": "adam", "lr": 2e-3, "weight_decay": 1e-4, "schedule": "cosine",
                  "warmup_steps": 0, "epochs": epochs},
        "eval": {"batch_size": 50},
    }


PRESETS = {"digits": _preset("digits", 4), "paper": _preset("paper", 4)}


def build_model(config, num_classes):
    """A :class:`SlidingWindowDetector` for a preset config."""
    return SlidingWindowDetector(num_classes=num_classes, image_size=config.input.image_size,
                                 weight_decay=config.train.weight_decay, **config.model)
