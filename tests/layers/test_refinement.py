"""SharpMask refinement module: shapes, the thesis' channel schedule, the two-conv skip
path, upsampling modes, parameter count by hand, config round trip."""
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.layers.refinement import RefinementModule, refinement_schedule


def test_channel_schedules():
    # schedule (b) with k = 32 (thesis §3.5.2): k_m^i = k_s^i = 32 / 2^(i-1)
    assert refinement_schedule(32, 4) == [(32, 32, 16), (16, 16, 8), (8, 8, 4), (4, 4, 2)]
    assert refinement_schedule(8, 2, schedule="constant") == [(8, 8, 8), (8, 8, 8)]
    with pytest.raises(ValueError):
        refinement_schedule(24, 4)


def test_module_shapes_weights_and_parameter_count():
    km, ks, km_next, kf = 8, 8, 4, 12
    layer = RefinementModule(mask_channels=km_next, skip_channels=ks)
    mask = tf.random.normal([2, 5, 6, km])
    features = tf.random.normal([2, 5, 6, kf])
    out = layer([mask, features])
    assert out.shape == (2, 10, 12, km_next)
    assert np.all(out.numpy() >= 0)  # ReLU before the (convex) upsampling
    assert layer.skip_conv1.kernel.shape == (3, 3, kf, 64)
    assert layer.skip_conv2.kernel.shape == (3, 3, 64, ks)
    assert layer.merge_conv.kernel.shape == (3, 3, km + ks, km_next)
    by_hand = (9 * kf * 64 + 64) + (9 * 64 * ks + ks) + (9 * (km + ks) * km_next + km_next)
    assert layer.count_params() == by_hand
    with tf.GradientTape() as tape:
        tape.watch([mask, features])
        loss = tf.reduce_sum(layer([mask, features]))
    g_mask, g_feat = tape.gradient(loss, [mask, features])
    assert float(tf.reduce_sum(tf.abs(g_mask))) > 0 and float(tf.reduce_sum(tf.abs(g_feat))) > 0
    clone = RefinementModule.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_stacked_schedule_restores_resolution_and_upsampling_modes():
    x = tf.random.normal([1, 2, 2, 32])
    feats = [tf.random.normal([1, 2 * 2 ** i, 2 * 2 ** i, c]) for i, c in enumerate((24, 16, 8, 4))]
    for (km, ks, km_next), f in zip(refinement_schedule(32, 4), feats):
        assert x.shape[-1] == km
        x = RefinementModule(mask_channels=km_next, skip_channels=ks, upsampling="nearest")([x, f])
        assert x.shape[1] == 2 * f.shape[1] and x.shape[-1] == km_next
    assert x.shape == (1, 32, 32, 2)
    blocks = x.numpy()[0].reshape(16, 2, 16, 2, 2)
    np.testing.assert_array_equal(blocks, np.broadcast_to(blocks[:, :1, :, :1], blocks.shape))  # nearest: 2x2 copies
    bilinear = RefinementModule(mask_channels=4, skip_channels=4, upsampling="bilinear")
    y = bilinear([tf.random.normal([1, 3, 3, 4]), tf.random.normal([1, 3, 3, 5])]).numpy()[0]
    assert not np.allclose(y[0::2, 0::2], y[1::2, 0::2])
    with pytest.raises(ValueError):
        RefinementModule(mask_channels=2, skip_channels=2, upsampling="deconv")
