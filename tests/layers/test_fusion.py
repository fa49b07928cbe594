import numpy as np
import pytest
import tensorflow as tf

from kerasdet.layers.fusion import SemanticFusion, resize_bilinear


def test_align_corners_resize_hand_values():
    x = tf.constant([[[[0.0], [2.0]], [[4.0], [6.0]]]])  # 2x2
    y = resize_bilinear(x, (3, 3)).numpy()[0, :, :, 0]
    np.testing.assert_allclose(y, [[0, 1, 2], [2, 3, 4], [4, 5, 6]])
    # ASSD513: 33 -> 65 and 17 -> 65 grids line up (output 2i / 4i is input i)
    rng = np.random.RandomState(0)
    c4 = rng.normal(size=(1, 33, 33, 2)).astype("float32")
    c5 = rng.normal(size=(1, 17, 17, 2)).astype("float32")
    np.testing.assert_allclose(resize_bilinear(tf.constant(c4), (65, 65)).numpy()[:, ::2, ::2], c4, atol=1e-5)
    np.testing.assert_allclose(resize_bilinear(tf.constant(c5), (65, 65)).numpy()[:, ::4, ::4], c5, atol=1e-5)


def test_matches_hand_composition():
    rng = np.random.RandomState(1)
    feats = [tf.constant(rng.normal(size=(2, s, s, c)).astype("float32")) for s, c in ((9, 8), (5, 12), (3, 16))]
    layer = SemanticFusion(reduced_channels=4)
    y = layer(feats).numpy()
    assert y.shape == (2, 9, 9, 8)
    parts = [feats[0].numpy() @ layer.reduce[0].kernel.numpy()[0, 0] + layer.reduce[0].bias.numpy()]
    for conv, f in zip(layer.reduce[1:], feats[1:]):
        r = f.numpy() @ conv.kernel.numpy()[0, 0] + conv.bias.numpy()
        parts.append(resize_bilinear(tf.constant(r), (9, 9)).numpy())
    cat = np.concatenate(parts, axis=-1)
    bn = layer.norm
    normed = (cat - bn.moving_mean.numpy()) / np.sqrt(bn.moving_variance.numpy() + bn.epsilon) * bn.gamma.numpy() + bn.beta.numpy()
    ref = np.maximum(normed @ layer.fuse.kernel.numpy()[0, 0] + layer.fuse.bias.numpy(), 0)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_assd513_parameter_count():
    layer = SemanticFusion()
    feats = [tf.zeros((1, s, s, c)) for s, c in ((65, 512), (33, 1024), (17, 2048))]
    assert layer(feats).shape == (1, 65, 65, 512)
    # spec 002 §1.7: fusion 1,313,536 trainable (+1,536 BN moving statistics)
    assert sum(int(np.prod(v.shape)) for v in layer.trainable_variables) == 1_313_536
    assert layer.count_params() == 1_313_536 + 1_536


def test_gradients_and_config_round_trip():
    feats = [tf.random.normal((1, s, s, 4)) for s in (6, 3, 2)]
    layer = SemanticFusion(reduced_channels=3, output_channels=5, align_corners=False)
    with tf.GradientTape() as tape:
        tape.watch(feats)
        loss = tf.reduce_sum(layer(feats, training=True))
    grads = tape.gradient(loss, feats)
    assert all(g is not None for g in grads)
    assert SemanticFusion.from_config(layer.get_config()).get_config() == layer.get_config()
    with pytest.raises(ValueError, match="two feature maps"):
        SemanticFusion()([tf.zeros((1, 4, 4, 2))])
