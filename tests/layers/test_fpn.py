import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.layers.fpn import FeaturePyramid


def _feats(size=32, batch=1, seed=0):
    rng = np.random.RandomState(seed)
    return {
        f"C{l}": tf.constant(rng.normal(size=(batch, size // 2 ** l, size // 2 ** l, c)).astype("float32"))
        for l, c in zip(range(2, 6), [8, 12, 16, 20])
    }


def test_retinanet_levels_shapes_and_wiring():
    fpn = FeaturePyramid(min_level=3, max_level=7, num_channels=16)
    feats = _feats(256)
    out = fpn(feats)
    assert sorted(out) == ["P3", "P4", "P5", "P6", "P7"]
    for l in range(3, 8):
        assert tuple(out[f"P{l}"].shape) == (1, 256 // 2 ** l, 256 // 2 ** l, 16)
    # P5 = smooth(lateral(C5)); P4 = smooth(lateral(C4) + up2(lateral(C5)))
    lat5 = fpn.lateral["p5"](feats["C5"])
    np.testing.assert_allclose(out["P5"], fpn.smooth["p5"](lat5), atol=1e-5)
    merged4 = fpn.lateral["p4"](feats["C4"]) + tf.repeat(tf.repeat(lat5, 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(out["P4"], fpn.smooth["p4"](merged4), atol=1e-5)
    # RetinaNet P6 = conv on C5, P7 = conv(relu(P6))
    np.testing.assert_allclose(out["P6"], fpn.extra["p6"](feats["C5"]), atol=1e-5)
    np.testing.assert_allclose(out["P7"], fpn.extra["p7"](tf.nn.relu(out["P6"])), atol=1e-5)
    # C2 is unused by a P3..P7 pyramid
    assert "p2" not in fpn.lateral


def test_two_stage_variant_p2_to_p6_subsample():
    fpn = FeaturePyramid(min_level=2, max_level=6, extra_levels="subsample_p5", num_channels=8)
    out = fpn(_feats(128))
    assert sorted(out) == ["P2", "P3", "P4", "P5", "P6"]
    np.testing.assert_array_equal(out["P6"], out["P5"][:, ::2, ::2, :])
    assert not fpn.extra  # no parameters for P6


def test_odd_sizes_crop_top_down():
    rng = np.random.RandomState(0)
    feats = {"C3": tf.constant(rng.normal(size=(2, 13, 9, 4)), tf.float32),
             "C4": tf.constant(rng.normal(size=(2, 7, 5, 4)), tf.float32),
             "C5": tf.constant(rng.normal(size=(2, 4, 3, 4)), tf.float32)}
    out = FeaturePyramid(min_level=3, max_level=5, num_channels=8)(feats)
    assert tuple(out["P3"].shape) == (2, 13, 9, 8)
    assert tuple(out["P4"].shape) == (2, 7, 5, 8)


def test_config_round_trip_and_errors():
    fpn = FeaturePyramid(min_level=2, max_level=6, num_channels=32, extra_levels="conv_p5")
    clone = FeaturePyramid.from_config(fpn.get_config())
    assert clone.get_config() == fpn.get_config()
    with pytest.raises(ValueError, match="extra_levels"):
        FeaturePyramid(extra_levels="bogus")
    with pytest.raises(ValueError, match="C3"):
        FeaturePyramid(min_level=3, max_level=5, num_channels=8)({"C4": tf.zeros((1, 4, 4, 3)), "C5": tf.zeros((1, 2, 2, 3))})


def test_parameter_count_formula():
    fpn = FeaturePyramid(min_level=3, max_level=7, num_channels=256)
    fpn(_feats(256))
    c3, c4, c5 = 12, 16, 20
    d = 256
    expected = (c3 + c4 + c5) * d + 3 * d + 3 * (9 * d * d + d) + (9 * c5 * d + d) + (9 * d * d + d)
    assert fpn.count_params() == expected
