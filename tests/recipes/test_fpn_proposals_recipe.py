"""The fpn_proposals recipe: presets load, the paper preset builds the size pinned in
tests/models/test_fpn_proposals.py, the digits preset's model is class-agnostic."""
from kerasdet.engine.recipes import load_recipe


def test_presets():
    recipe = load_recipe("fpn_proposals")
    assert set(recipe.presets) == {"fpn_proposals", "fpn_proposals_digits"}
    for name in recipe.presets:
        config = recipe.config(name)
        assert config.eval.metric == "proposals_segm" and config.input.masks == "instances"
    paper = recipe.config("fpn_proposals")
    assert paper.input.min_size == 800 and paper.train.batch_size == 16
    # the digits preset trains at the DeepMask / SharpMask digits budget: 600 steps of 8 images
    digits = recipe.config("fpn_proposals_digits").train
    deepmask = load_recipe("sharpmask").config("deepmask_digits").train
    assert (digits.stages[0].steps, digits.batch_size) == (deepmask.stages[0].steps, deepmask.batch_size) == (600, 8)


def test_paper_preset_builds_the_pinned_size():
    recipe = load_recipe("fpn_proposals")
    model = recipe.build_model(recipe.config("fpn_proposals"), 80)
    model.build()
    assert model.count_params() == 29_722_890 and model.num_classes == 1
    assert model.window_sizes == (5, 7) and model.mask_size == 14 and model.fpn.num_channels == 128
    digits = recipe.build_model(recipe.config("fpn_proposals_digits"), 10)
    assert digits.num_classes == 1 and digits.levels == (2, 3, 4, 5)
