"""kerasdet.recipes.decompnet: the presets follow the paper's protocol and App. B sizes; the
stage hook sets the stage and its lambda/gamma/p warm-up."""
from kerasdet.callbacks import DecompositionWarmup
from kerasdet.engine.builders import build_optimizer
from kerasdet.engine.recipes import load_recipe


def test_presets_follow_the_paper_protocol_and_sizes():
    recipe = load_recipe("decompnet")
    paper = recipe.config("paper")
    gen = paper.data.generate
    assert (gen["num_train"], gen["num_val"]) == (30000, 10000)
    assert tuple(gen["classes"]) == (3, 6, 9) and tuple(gen["image_size"]) == (100, 100) and gen["num_clutter"] == 30
    assert (gen["min_digits"], gen["max_digits"], tuple(gen["scale_range"]), gen["max_iou"]) == (5, 10, (0.5, 2.0), 0.2)
    assert [s.kind for s in paper.train.stages] == ["category", "instance", "joint", "box"]
    model = recipe.build_model(paper, 3)
    model.build((None, 100, 100, 3))
    assert model.map_size == (50, 50) and model.steps == 11
    assert 19.0e6 < model.decomposer.count_params() < 19.5e6  # App. B: a 2048-unit recurrent net of ~19M
    assert recipe.build_model(recipe.config("paper_full"), 3).map_size == (100, 100)
    digits_config = recipe.config("digits")
    digits = recipe.build_model(digits_config, 3)  # the CPU run: same protocol, ConvGRU cell
    assert tuple(digits_config.data.generate["classes"]) == (3, 6, 9)
    assert digits.map_size == (50, 50) and digits.decomposer.cell == "conv_gru" and digits.stop == "bright"


def test_stage_hook_and_schedules():
    recipe = load_recipe("decompnet")
    config = recipe.config("digits", {"model.steps": 3, "model.max_instances": 2, "model.conv_gru_filters": 4,
                                      "model.instance_filters": 4, "model.category_widths": [4] * 6,
                                      "model.box_hidden": 8})
    model = recipe.build_model(config, 3)
    stages = config.train.resolved_stages()
    for stage in stages:
        trained, callbacks = recipe.stage_model(model, stage, config)
        assert trained is model and model.stage == stage.kind
        (warm,) = callbacks
        assert isinstance(warm, DecompositionWarmup) and warm.epochs == stage.params["warmup_epochs"]
        assert model.category_net.trainable == (stage.kind in ("category", "joint"))
    # Adam with cosine decay to 0.05 x lr over each stage (the preset's schedule)
    category = stages[0]
    opt = build_optimizer(category, 100, train=config.train)
    schedule = opt._learning_rate
    assert abs(float(schedule(0)) - 2e-3) < 1e-9 and abs(float(schedule(100)) - 1e-4) < 1e-9
    assert opt.clipnorm == 5.0
    sgd = build_optimizer(recipe.config("paper").train.resolved_stages()[0], 90, train=recipe.config("paper").train)
    assert abs(float(sgd._learning_rate(59)) - 1e-2) < 1e-9 and abs(float(sgd._learning_rate(61)) - 1e-3) < 1e-9
