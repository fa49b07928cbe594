"""The sharpmask recipe: presets load, the paper preset's size through the recipe, the
train_dataset hook turns detection batches into the stage's patches, the stage hook."""
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.engine.recipes import load_recipe
from kerasdet.errors import ConfigError


def _detection_batch(batch=2, size=128):
    images = tf.random.uniform([batch, size, size, 3], 0, 255, seed=0)
    boxes = np.zeros([batch, 8, 4], np.float32)
    classes = -np.ones([batch, 8], np.int32)
    masks = np.zeros([batch, 8, size, size], np.uint8)
    boxes[:, 0] = (30, 40, 60, 64)
    classes[:, 0] = 3
    masks[:, 0, 30:60, 40:64] = 1
    return images, {"boxes": tf.constant(boxes), "classes": tf.constant(classes), "masks": tf.constant(masks),
                    "is_crowd": tf.zeros([batch, 8], tf.bool)}


def test_presets_and_stages():
    recipe = load_recipe("sharpmask")
    assert set(recipe.presets) == {"deepmask", "sharpmask", "deepmask_digits", "sharpmask_digits"}
    for name in recipe.presets:
        config = recipe.config(name)
        kinds = [s.kind for s in config.train.stages]
        assert kinds == (["deepmask", "refine"] if name.startswith("sharpmask") else ["deepmask"])
        assert config.eval.metric == "proposals_segm" and config.input.masks == "instances"
    refine = recipe.config("sharpmask").train.resolved_stages()[1]
    assert refine.lr == 1e-3 and refine.params == {"positive_fraction": 1.0}  # thesis §3.5: lr 1e-3
    with pytest.raises(ConfigError, match="model.patch_size"):
        from kerasdet.recipes.sharpmask import sampler

        sampler(recipe.config("deepmask_digits", {"patches.patch_size": 64}))


def test_paper_preset_builds_the_pinned_size():
    recipe = load_recipe("sharpmask")
    model = recipe.build_model(recipe.config("sharpmask"), 80)
    model.build()
    # DeepMask-ours 17,409,601 + refinement 2,757,821 (tests/models/test_sharpmask.py counts them by hand)
    assert model.count_params() == 17_409_601 + 2_757_821
    assert model.num_classes == 1 and model.window_size == 192


def test_train_dataset_hook_gives_the_stages_patches():
    recipe = load_recipe("sharpmask")
    config = recipe.config("sharpmask_digits")
    deepmask, refine = config.train.resolved_stages()
    ds = tf.data.Dataset.from_tensors(_detection_batch()).repeat(2)
    patches, targets = next(iter(recipe.train_dataset(ds, deepmask, config, seed=0, start_batch=0)))
    assert patches.shape == (16, 80, 80, 3) and targets["masks"].shape == (16, 48, 48)
    assert set(np.unique(targets["score"].numpy())) <= {-1.0, 0.0, 1.0}
    assert (targets["score"].numpy() == 1).sum() == 8
    _, refine_targets = next(iter(recipe.train_dataset(ds, refine, config, seed=0, start_batch=0)))
    assert np.all(refine_targets["score"].numpy() == 1)  # the refinement trains on positives only
    # other recipes train on the detection batches as they are
    assert load_recipe("retinanet").train_dataset(ds, deepmask, config) is ds


def test_stage_hook_sets_the_stage():
    recipe = load_recipe("sharpmask")
    config = recipe.config("sharpmask_digits", {"backbone.widths": [8, 8, 8, 8]})
    model = recipe.build_model(config, 10)
    assert model.stage == "refine"  # rebuilt for evaluation / export in the last stage
    assert recipe.build_model(recipe.config("deepmask_digits"), 10).stage == "deepmask"
    deepmask, refine = config.train.resolved_stages()
    assert recipe.stage_model(model, deepmask, config)[0].stage == "deepmask"
    train_model, callbacks = recipe.stage_model(model, refine, config)
    assert train_model is model and model.stage == "refine" and callbacks == []
    assert not model.backbone.trainable
    with pytest.raises(ConfigError, match="kind"):
        recipe.stage_model(model, type(refine)(name="x", kind="train"), config)
