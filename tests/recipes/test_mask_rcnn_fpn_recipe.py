"""The mask_rcnn_fpn recipe: the faster_rcnn_fpn presets plus masks and a mask head; the
paper preset builds the R50-FPN Mask R-CNN size pinned in tests/models/test_mask_rcnn.py."""
from kerasdet.engine.recipes import load_recipe


def test_presets_are_the_faster_rcnn_presets_with_masks():
    recipe = load_recipe("mask_rcnn_fpn")
    base = load_recipe("faster_rcnn_fpn")
    assert set(recipe.presets) == {"paper", "digits"}
    for name in recipe.presets:
        config, faster = recipe.config(name), base.config(name)
        assert config.eval.metric == "coco_segm" and config.input.masks == "instances"
        assert config.model == faster.model and config.backbone == faster.backbone
        assert config.train == faster.train and config.data == faster.data
    paper = recipe.config("paper")
    assert paper.input.min_size == 800 and paper.input.max_size == 1333 and paper.train.batch_size == 16
    assert paper.train.lr == 0.02 and tuple(paper.train.decay_steps) == (60000, 80000)
    assert paper.section("mask_head") == {} and recipe.config("digits").section("mask_head") == {"channels": 64}


def test_paper_preset_builds_the_pinned_size():
    recipe = load_recipe("mask_rcnn_fpn")
    model = recipe.build_model(recipe.config("paper"), 80)
    model.build()
    assert model.count_params() == 44_480_116  # 41,836,836 (Faster R-CNN R50-FPN) + the mask head
    head = model.mask_head
    assert (head.num_convs, head.channels, head.roi_output_size, head.num_masks) == (4, 256, 14, 80)
    assert model.mask_roi_layer.output_size == 14 and model.roi_layer.output_size == 7
    digits = recipe.build_model(recipe.config("digits"), 10)
    assert digits.mask_head.channels == 64 and digits.mask_head.num_classes == 10
