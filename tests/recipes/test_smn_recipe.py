"""kerasdet.recipes.smn: presets (paper, digits, the MLP control), stage schedule, the stage
hook (base stages train the base alone; memory stages freeze it)."""
import numpy as np

from kerasdet.engine.builders import build_optimizer, stage_length
from kerasdet.engine.recipes import load_recipe


def test_presets_and_stage_schedule():
    recipe = load_recipe("smn")
    paper = recipe.config("paper")
    assert paper.backbone["name"] == "vgg16" and tuple(paper.backbone["output_layers"]) == ("block5_conv3",)
    base = paper.section("base")
    assert base["architecture"] == "c4" and base["roi_pooler"] == "crop_pool" and base["fc_dim"] == 4096
    assert paper.input.min_size == 600 and paper.input.max_size == 1000
    stages = paper.train.resolved_stages()
    memory = [s for s in stages if s.kind == "memory"]
    assert [s.params["num_steps"] for s in memory] == [2, 5, 10]  # the N curriculum
    assert all(s.steps == 30000 and s.lr == 1e-3 and s.decay_steps == (20000,) for s in memory)
    assert paper.model["num_base_writes"] == 50 and paper.model["num_memory_steps"] == 10
    # the schedule of a paper memory stage: 1e-3, then 1e-4 after 20k steps
    epochs, steps = stage_length(memory[0], 1000)
    assert (epochs, steps) == (1, 30000)
    opt = build_optimizer(memory[0], epochs * steps, train=paper.train)
    schedule = opt._learning_rate
    np.testing.assert_allclose(float(schedule(19999)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(20001)), 1e-4, rtol=1e-6)
    digits = recipe.config("digits").train.resolved_stages()
    assert [s.params["num_steps"] for s in digits if s.kind == "memory"] == [2, 5, 10]
    mem_steps = sum(np.prod(stage_length(s, 250)) for s in digits if s.kind == "memory")
    mlp = recipe.config("digits_mlp")
    assert mlp.model["context"] == "mlp"
    mlp_stages = mlp.train.resolved_stages()
    assert mem_steps == sum(np.prod(stage_length(s, 250)) for s in mlp_stages if s.kind == "memory")  # same budget
    assert [s.name for s in mlp_stages if s.kind == "base"] == [s.name for s in digits if s.kind == "base"]
    assert sum(np.prod(stage_length(s, 250)) for s in digits if s.kind == "base") == 1000  # 2 + 2 epochs


def test_stage_hook_trains_the_base_then_freezes_it():
    recipe = load_recipe("smn")
    config = recipe.config("digits", {"backbone.widths": [8, 16, 16, 16], "backbone.blocks": [0, 0, 0, 0],
                                      "input.image_size": [64, 64], "base.fc_dim": 16, "base.rpn_channels": 8,
                                      "model.memory_channels": 8, "model.memory_fc_dim": 16, "model.fusion_dim": 16,
                                      "model.memory_rpn_channels": 8})
    model = recipe.build_model(config, 3)
    base_stage, _, memory_stage = config.train.resolved_stages()[:3]
    trained, callbacks = recipe.stage_model(model, base_stage, config)
    assert trained is model.base and model.base.trainable and callbacks == []
    trained, _ = recipe.stage_model(model, memory_stage, config)
    assert trained is model and not model.base.trainable and model.num_steps == 2
    assert all(not v.trainable for v in model.base.variables)
