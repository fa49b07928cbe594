"""kerasdet.recipes.couplenet: presets, same digits budget for the three models, the VOC07
protocol of the paper presets."""
import tensorflow as tf

from kerasdet.engine.recipes import load_recipe

DIGITS = ("rfcn_digits", "couplenet_digits", "acouplenet_digits")
PAPER = ("rfcn", "couplenet", "acouplenet")


def _diff(a, b):
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


def test_digits_presets_same_budget_and_build():
    recipe = load_recipe("couplenet")
    rfcn, couple, acouple = (recipe.config(p) for p in DIGITS)
    for config in (couple, acouple):
        assert config.train == rfcn.train and config.data == rfcn.data and config.eval == rfcn.eval
    assert _diff(rfcn.model, couple.model) == {"global_branch"}
    assert _diff(couple.model, acouple.model) == {"attention_target_threshold"}  # only read by the attention loss
    assert _diff(couple.backbone, acouple.backbone) == {"attention_levels", "attention_channels"}
    assert couple.input.masks is None and acouple.input.masks == "union"
    assert rfcn.backbone["dilate_c5"] and rfcn.train.epochs == 4
    counts = []
    for config in (rfcn, couple, acouple):
        model = recipe.build_model(config, 10)
        model.build((None, 128, 128, 3))
        feats = model.backbone(tf.zeros((1, 128, 128, 3)))
        assert feats["C4"].shape[1:3] == (8, 8) and feats["C5"].shape[1:3] == (8, 8)
        out = model(tf.zeros((1, 128, 128, 3)))
        assert out["boxes"].shape == (1, 100, 4)
        counts.append(model.count_params())
    assert counts[0] < counts[1] < counts[2]


def test_paper_presets_follow_the_paper():
    recipe = load_recipe("couplenet")
    for name in PAPER:
        config = recipe.config(name)
        inp, train, model, backbone = config.input, config.train, config.model, config.backbone
        assert (inp.min_size, inp.max_size, inp.flip) == (600, 1000, True)
        assert inp.image_size[0] % 16 == 0 and inp.image_size[0] >= 1000
        assert (train.lr, train.momentum, train.weight_decay, train.optimizer) == (1e-3, 0.9, 5e-4, "sgd")
        assert train.batch_size == 2 and train.decay_steps == (80000,)
        steps = train.epochs * (16551 // train.batch_size)  # VOC07+12 trainval
        assert abs(steps - 110000) < 0.05 * 110000
        assert backbone["name"] == "resnet101_dilated" and backbone["dilate_c5"] and backbone["freeze_at"] == 2
        assert model["group_size"] == 7 and model["conv_new_channels"] == 1024 and model["ohem_rois"] == 128
        assert model["rpn_post_nms_topk_train"] == model["rpn_post_nms_topk_test"] == 300
        assert model["global_branch"] == (name != "rfcn")
        assert (model["coupling_norm"], model["coupling_op"]) == ("conv", "sum")
        assert tuple(backbone.get("attention_levels", ())) == ((2, 3, 4) if name == "acouplenet" else ())
        assert (inp.masks == "union") == (name == "acouplenet")
        # VOC07+12 from a VOCdevkit, scored with the VOC07 11-point mAP (CoupleNet Table 2)
        assert config.data.kind == "voc" and config.data.train_sets == ("2007/trainval", "2012/trainval")
        assert config.data.val_sets == ("2007/test",) and config.eval.metric == "voc07"
