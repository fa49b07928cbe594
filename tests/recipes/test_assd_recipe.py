"""kerasdet.recipes.assd: presets build, digits presets differ only in attention/fusion,
the paper presets follow the paper (COCO and VOC07 protocols)."""
import dataclasses

import numpy as np
import tensorflow as tf

from kerasdet.engine.recipes import load_recipe


def test_digits_presets_same_budget_and_build():
    recipe = load_recipe("assd")
    ssd, assd = recipe.config("ssd_digits"), recipe.config("assd_digits")
    assert dataclasses.replace(ssd, model={}) == dataclasses.replace(assd, model={})
    diff = {k for k in set(ssd.model) | set(assd.model) if ssd.model.get(k) != assd.model.get(k)}
    assert diff == {"attention", "fusion"}
    counts = []
    for config in (ssd, assd):
        model = recipe.build_model(config, 10)
        out = model(tf.zeros((1, 128, 128, 3)))
        # 16/8/4/2/1 cells, 4 boxes each
        assert out["class_logits"].shape == (1, 4 * (256 + 64 + 16 + 4 + 1), 11)
        counts.append(model.count_params())
    assert counts[1] > counts[0]


def test_paper_presets_follow_the_paper():
    recipe = load_recipe("assd")
    for name, size, batch, epochs, decays, metric in (
            ("assd321", 321, 80, 160, (100, 150), "coco"), ("assd513", 513, 64, 140, (80, 130), "coco"),
            ("assd321_voc", 321, 80, 280, (200, 250), "voc07"), ("assd513_voc", 513, 64, 180, (120, 170), "voc07")):
        config = recipe.config(name)
        assert config.input.image_size == (size, size) and config.input.ssd_augmentation
        train = config.train
        assert (train.lr, train.momentum, train.weight_decay, train.batch_size) == (1e-3, 0.9, 5e-4, batch)
        assert train.epochs == epochs and train.warmup_steps == 0
        np.testing.assert_allclose(np.array(train.decay_at) * epochs, decays)
        assert config.backbone["name"] == "resnet101"
        assert config.model["attention"] and config.model["fusion"]
        assert config.eval.metric == metric  # VOC2007 test: the 11-point VOC07 mAP (Tables 2-3)
        if metric == "voc07":
            assert config.data.kind == "voc" and config.data.train_sets == ("2007/trainval", "2012/trainval")
            assert config.data.val_sets == ("2007/test",) and config.model["max_detections"] == 200
