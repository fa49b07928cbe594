"""recipes/smn.py: presets (paper and digits), stage schedule, build, stage-wise training."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet import cli


def test_presets_and_stage_schedule():
    recipe = cli.load_recipe("smn")
    paper = cli.get_config(recipe, "paper")
    assert paper["backbone"]["name"] == "vgg16" and paper["backbone"]["output_layers"] == ("block5_conv3",)
    assert paper["base"]["architecture"] == "c4" and paper["base"]["roi_pooler"] == "crop_pool"
    assert paper["base"]["fc_dim"] == 4096 and paper["input"]["min_size"] == 600 and paper["input"]["max_size"] == 1000
    memory = [s for s in paper["stages"] if s["kind"] == "memory"]
    assert [s["num_steps"] for s in memory] == [2, 5, 10]  # the N curriculum
    assert all(s["steps"] == 30000 and s["lr"] == 1e-3 and s["decay_steps"] == (20000,) for s in memory)
    assert paper["model"]["num_base_writes"] == 50 and paper["model"]["num_memory_steps"] == 10
    # the schedule of a paper memory stage: 1e-3, then 1e-4 after 20k steps
    opt = recipe.stage_optimizer(paper, memory[0], recipe.stage_steps(memory[0], 1000))
    schedule = opt._learning_rate
    np.testing.assert_allclose(float(schedule(19999)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(20001)), 1e-4, rtol=1e-6)
    digits = cli.get_config(recipe, "digits")
    assert [s["num_steps"] for s in digits["stages"] if s["kind"] == "memory"] == [2, 5, 10]
    mem_steps = sum(recipe.stage_steps(s, 250) for s in digits["stages"] if s["kind"] == "memory")
    assert mem_steps == sum(recipe.stage_steps(s, 250) for s in digits["mlp_stages"])  # same budget
    assert recipe.stage_steps({"epochs": 0.5}, 250) == 125
    assert sum(recipe.stage_steps(s, 250) for s in digits["stages"] if s["kind"] == "base") == 1000  # 2 + 2 epochs


def _tiny_dataset(batch=2, size=64, seed=0):
    rng = np.random.RandomState(seed)
    images = rng.uniform(0, 40, (batch, size, size, 3)).astype("float32")
    boxes = np.zeros((batch, 2, 4), "float32")
    classes = np.full((batch, 2), -1, "int32")
    for b in range(batch):
        y, x = rng.randint(0, size - 30, 2)
        boxes[b, 0] = [y, x, y + 28, x + 28]
        classes[b, 0] = b % 3
        images[b, y:y + 28, x:x + 28, b % 3] = 255.0
    return tf.data.Dataset.from_tensors((images, {"boxes": boxes, "classes": classes})).repeat()


@pytest.mark.slow  # ~1.5 min quiet, ~5 min on the loaded CPU: tracing the unrolled steps
def test_digits_build_and_stage_wise_training_keeps_the_base_frozen():
    recipe = cli.load_recipe("smn")
    config = cli.get_config(recipe, "digits")
    config["input"]["image_size"] = (64, 64)
    config["backbone"].update(widths=(8, 16, 16, 16), blocks=(0, 0, 0, 0))
    config["base"].update(fc_dim=16, rpn_channels=8, rpn_post_nms_topk_train=16, rpn_post_nms_topk_test=16,
                          num_rois=16)
    config["model"].update(memory_channels=8, memory_fc_dim=16, fusion_dim=16, memory_rpn_channels=8, num_rois=8,
                           rpn_batch_size=16)
    base_stage = [s for s in config["stages"] if s["kind"] == "base"][0]
    mem = [s for s in config["stages"] if s["kind"] == "memory"]
    stages = [dict(base_stage, steps=2, warmup_steps=0), dict(mem[0], steps=2, warmup_steps=0),
              dict(mem[1], steps=1, num_steps=3, warmup_steps=0)]
    keras.utils.set_random_seed(0)
    smn, base, log = recipe.train_stages(config, 3, _tiny_dataset(), 2, stages=stages, verbose=0)
    assert [entry["stage"]["kind"] for entry in log] == ["base", "memory", "memory"]
    assert smn.num_steps == 3 and smn.base is base and not base.trainable
    assert smn.get_config()["memory_channels"] == 8
    before = [w.copy() for w in base.get_weights()]
    smn_before = [v.numpy().copy() for v in smn.trainable_variables]
    recipe.fit_stage(smn, config, dict(stages[1], steps=1), _tiny_dataset(), 1, verbose=0)
    assert smn.num_steps == 2
    for a, b in zip(before, base.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert any(np.abs(a - v.numpy()).max() > 0 for a, v in zip(smn_before, smn.trainable_variables))
    out = smn.predict(_tiny_dataset().take(1), verbose=0)
    assert out["boxes"].shape == (2, 100, 4)
    # build_model builds the same SMN (for kerasdet evaluate/export --recipe smn)
    clone = recipe.build_model(config, 3)
    clone.build((None, 64, 64, 3))
    assert clone.count_params() == smn.count_params()
