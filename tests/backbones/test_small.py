"""Small CPU backbone: levels, rescaling, synchronized BN under MirroredStrategy, saving."""
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.backbones import backbone_levels, get_backbone, small_backbone
from kerasdet.backbones.small import small_backbone_levels


@pytest.fixture(scope="module")
def small():
    return small_backbone(levels=("C2", "C3", "C4", "C5"))


def test_levels_strides_and_channels(small):
    out = small(np.zeros((2, 128, 128, 3), "float32"))
    expected = {"C2": (4, 32), "C3": (8, 64), "C4": (16, 96), "C5": (32, 128)}
    for level, (stride, channels) in expected.items():
        assert tuple(out[level].shape) == (2, 128 // stride, 128 // stride, channels), level
    assert backbone_levels(small) == expected
    assert small_backbone_levels(levels=("C2", "C3", "C4", "C5")) == expected


def test_default_levels_are_c3_to_c5_and_sizes_are_ceil():
    model = small_backbone(widths=(8, 16, 24, 32), blocks=(1, 1, 1, 1))
    out = model(np.zeros((1, 100, 70, 3), "float32"))
    assert sorted(out) == ["C3", "C4", "C5"]
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {
        "C3": (13, 9, 16), "C4": (7, 5, 24), "C5": (4, 3, 32)
    }


def test_only_needed_stages_are_built():
    model = small_backbone(levels=("C3",))
    assert sorted(model(np.zeros((1, 64, 64, 3), "float32"))) == ["C3"]
    assert not any(layer.name.startswith(("c4_", "c5_")) for layer in model.layers)


def test_rescaling_maps_0_255_to_minus_1_1(small):
    rescale = keras.Model(small.input, small.get_layer("rescale").output)
    x = np.array([[[[0.0, 127.5, 255.0]]]], "float32")
    np.testing.assert_allclose(rescale(x).numpy(), [[[[-1.0, 0.0, 1.0]]]], atol=1e-6)


def test_batchnorm_is_synchronized_and_trainable(small):
    bns = [layer for layer in small.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == 1 + 4 + 2 * 5  # stem, 4 downsampling convs, 5 residual blocks
    assert all(bn.synchronized and bn.trainable for bn in bns)
    assert len(small.trainable_weights) == len(small.weights) - 2 * len(bns)


def test_residual_blocks_start_as_identity():
    model = small_backbone(levels=("C5",))
    gammas = [model.get_layer(f"{s}_block1_2_bn").gamma.numpy() for s in ("c2", "c3", "c4", "c5")]
    assert all(np.all(g == 0) for g in gammas)


def test_training_mode_uses_batch_statistics(small):
    x = np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype("float32")
    train = small(x, training=True)["C5"].numpy()
    infer = small(x, training=False)["C5"].numpy()
    assert np.abs(train - infer).max() > 1e-3


def test_bad_arguments():
    with pytest.raises(ValueError, match="widths"):
        small_backbone(widths=(32, 64, 96))
    with pytest.raises(ValueError, match="blocks"):
        small_backbone(blocks=(1, -1, 1, 1))
    with pytest.raises(ValueError, match="levels"):
        small_backbone(levels=("C6",))
    with pytest.raises(ValueError, match="input_shape"):
        small_backbone(input_shape=(128, 128, 1))


def test_config_and_keras_file_round_trip(small, tmp_path):
    x = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    clone = keras.Model.from_config(small.get_config())
    clone.set_weights(small.get_weights())
    path = tmp_path / "small.keras"
    small.save(path)
    loaded = keras.saving.load_model(path)
    expected = small(x)
    for other in (clone, loaded):
        out = other(x)
        assert sorted(out) == sorted(expected)
        for level in expected:
            np.testing.assert_allclose(out[level], expected[level], rtol=1e-6, atol=1e-6)
    assert loaded.get_layer("c3_down_bn").synchronized


def test_saved_model_export(small, tmp_path):
    archive = keras.export.ExportArchive()
    archive.track(small)
    archive.add_endpoint(
        "serving_default",
        lambda images: small(images, training=False),
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")],
    )
    archive.write_out(str(tmp_path / "sm"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    x = np.random.default_rng(2).uniform(0, 255, (1, 64, 64, 3)).astype("float32")
    out = loaded.signatures["serving_default"](images=tf.constant(x))
    expected = small(x, training=False)
    assert sorted(out) == sorted(expected)
    for level in expected:
        np.testing.assert_allclose(out[level].numpy(), expected[level], rtol=1e-5, atol=1e-5)


def test_registry_builds_small():
    model = get_backbone("small", widths=(8, 16, 24, 32), blocks=(0, 0, 1, 0))
    assert backbone_levels(model) == {"C3": (8, 16), "C4": (16, 24), "C5": (32, 32)}


# Runs in a fresh process: logical devices must be configured before any other TF op.
_MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    from kerasdet.backbones import small_backbone

    GLOBAL_BATCH = 4  # 2 images per replica
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (GLOBAL_BATCH, 64, 64, 3)).astype("float32")
    kwargs = dict(widths=(8, 16, 24, 32), blocks=(1, 1, 1, 1), zero_init_residual=False,
                  levels=("C2", "C3", "C4", "C5"))
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    result = {"replicas": strategy.num_replicas_in_sync}

    for sync in (True, False):
        keras.utils.set_random_seed(1)
        single = small_backbone(synchronized_bn=sync, **kwargs)
        with strategy.scope():
            mirrored = small_backbone(synchronized_bn=sync, **kwargs)
        mirrored.set_weights(single.get_weights())
        reference = {k: v.numpy() for k, v in single(x, training=True).items()}

        def shard(ctx):
            n = GLOBAL_BATCH // ctx.num_replicas_in_sync
            return x[ctx.replica_id_in_sync_group * n:(ctx.replica_id_in_sync_group + 1) * n]

        per_replica = strategy.experimental_distribute_values_from_function(shard)

        @tf.function
        def step(images):
            return strategy.run(lambda t: mirrored(t, training=True), args=(images,))

        out = step(per_replica)
        diffs = {}
        for level, ref in reference.items():
            parts = [p.numpy() for p in strategy.experimental_local_results(out[level])]
            got = np.concatenate(parts, axis=0)
            # error relative to the reference scale (max |ref| is a few units)
            diffs[level] = float(np.max(np.abs(got - ref) / (1.0 + np.abs(ref))))
        # moving statistics after one training-mode call
        bn_single = single.get_layer("c3_down_bn")
        bn_mirrored = mirrored.get_layer("c3_down_bn")
        for name in ("moving_mean", "moving_variance"):
            diffs[name] = float(np.abs(
                getattr(bn_single, name).numpy() - getattr(bn_mirrored, name).numpy()).max())
        result["sync" if sync else "nosync"] = diffs
    print("RESULT" + json.dumps(result))
    """
)


def test_synchronized_bn_mirrored_matches_single_device():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT],
        capture_output=True, text=True, timeout=300, env=env,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT"):])
    assert result["replicas"] == 2
    # Same global batch: outputs (|a - b| <= 1e-5 * (1 + |b|)) and moving statistics match.
    for key, diff in result["sync"].items():
        assert diff <= 1e-5, (key, result)
    # Without synchronization each replica normalizes with its own half-batch statistics.
    assert max(result["nosync"][level] for level in ("C2", "C3", "C4", "C5")) > 1e-3, result


def test_attention_levels_add_blocks_inside_and_logit_outputs():
    from kerasdet.layers.attention import CascadeAttention

    plain = small_backbone(widths=(8, 16, 24, 32), blocks=(1, 1, 1, 1))
    model = small_backbone(widths=(8, 16, 24, 32), blocks=(1, 1, 1, 1), attention_levels=(2, 3, 4),
                           attention_channels=4)
    x = np.random.default_rng(2).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    out = model(x)
    assert sorted(out) == ["A2", "A3", "A4", "C3", "C4", "C5"]
    for level, stride in ((2, 4), (3, 8), (4, 16)):
        assert tuple(out[f"A{level}"].shape) == (2, 64 // stride, 64 // stride, 1)
        block = model.get_layer(f"attention_c{level}")
        assert isinstance(block, CascadeAttention) and block.channels == 4
    # the attended map is the level output and the next stage's input
    assert model.get_layer("c3_down_conv").input is model.get_layer("attention_c2").output[0]
    assert model.output["C4"] is model.get_layer("attention_c4").output[0]
    c3 = keras.Model(model.input, model.get_layer("c3_block1_out").output)(x).numpy()
    np.testing.assert_allclose(out["C3"], c3 / (1.0 + np.exp(-out["A3"].numpy())), rtol=1e-5, atol=1e-6)
    widths = {2: 8, 3: 16, 4: 24}
    extra = sum(9 * widths[k] * 4 + 4 + 9 * 4 + 1 for k in (2, 3, 4))
    assert model.count_params() == plain.count_params() + extra
    assert backbone_levels(model)["A3"] == (8, 1)
    with pytest.raises(ValueError, match="attention_levels"):
        small_backbone(attention_levels=(6,))
    # the ablation options reach the blocks: (1 + A) * f with A starting near sigmoid(3)
    res = small_backbone(widths=(8, 16, 24, 32), blocks=(1, 1, 1, 1), attention_levels=(3,), attention_channels=4,
                         attention_bias_init=3.0, attention_residual=True)
    out = res(x)
    assert res.get_layer("attention_c3").residual and res.get_layer("attention_c3").bias_init == 3.0
    np.testing.assert_allclose(np.mean(1.0 / (1.0 + np.exp(-out["A3"].numpy()))), 1.0 / (1.0 + np.exp(-3.0)), atol=0.02)


def test_attention_level_past_requested_levels_is_built():
    model = small_backbone(widths=(8, 8, 8, 8), blocks=(0, 0, 0, 0), levels=("C3",), attention_levels=(4,))
    assert sorted(model.output) == ["A4", "C3"]
    assert backbone_levels(model) == {"C3": (8, 8), "A4": (16, 1)}


def test_dilate_c5_keeps_stride_16_with_dilation_2():
    model = small_backbone(widths=(8, 16, 24, 32), blocks=(1, 1, 1, 2), dilate_c5=True)
    expected = {"C3": (8, 16), "C4": (16, 24), "C5": (16, 32)}
    assert backbone_levels(model) == expected
    assert small_backbone_levels(widths=(8, 16, 24, 32), dilate_c5=True) == expected
    out = model(np.zeros((1, 96, 80, 3), "float32"))
    assert tuple(out["C5"].shape) == (1, 6, 5, 32)
    for name in ("c5_down_conv", "c5_block1_1_conv", "c5_block2_2_conv"):
        assert model.get_layer(name).dilation_rate == (2, 2), name
    assert model.get_layer("c5_down_conv").strides == (1, 1)
    assert model.get_layer("c4_down_conv").dilation_rate == (1, 1)
    # same weights as the undilated network
    plain = small_backbone(widths=(8, 16, 24, 32), blocks=(1, 1, 1, 2))
    assert [tuple(w.shape) for w in plain.weights] == [tuple(w.shape) for w in model.weights]
