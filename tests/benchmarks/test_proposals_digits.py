"""benchmarks/proposals_digits.py: every model's runner overrides are valid config keys and
give the four proposal models one budget, the same data and 1000 proposals per image."""
import argparse
import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
sys.path.insert(0, BENCHMARKS)
import proposals_digits  # noqa: E402

from kerasdet.engine.recipes import load_recipe  # noqa: E402


def _configs(argv):
    values = dict(steps=300, batch_size=8, num_train=100, num_val=20, image_size=128, data_seed=3, eval_batch=4,
                  tiny=False, data_dir="/tmp/x")
    args = argparse.Namespace(**{**values, **argv})
    out = {}
    for name, (recipe, preset, _) in proposals_digits.MODELS.items():
        out[name] = load_recipe(recipe).config(preset, proposals_digits.overrides(name, args))
    return out


def test_one_budget_one_data_set_1000_proposals():
    configs = _configs({})
    for name, config in configs.items():
        stages = config.train.resolved_stages()
        steps = sum(s.steps for s in stages) if config.train.stages else config.train.steps
        assert steps == 300 and config.train.batch_size == 8, name
        assert config.data.generate == configs["rpn"].data.generate and config.data.dir == "/tmp/x"
    assert [s.steps for s in configs["sharpmask"].train.stages] == [180, 120]  # the preset's 600 : 400
    assert all(configs[n].model["num_proposals"] == 1000 for n in ("deepmask", "sharpmask", "fpn_proposals"))
    assert configs["rpn"].model["rpn_post_nms_topk_test"] == 1000
    tiny = _configs({"tiny": True})
    assert tiny["fpn_proposals"].model["fpn_channels"] == 8 and tiny["deepmask"].model["patch_size"] == 32
