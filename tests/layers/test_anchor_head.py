import math

import numpy as np
import tensorflow as tf

from kerasdet.layers.anchor_head import AnchorHead


def test_shapes_sharing_and_prior():
    head = AnchorHead(num_classes=5, num_anchors=9, num_convs=2, filters=16)
    rng = np.random.RandomState(0)
    feats = [tf.constant(rng.normal(size=(2, s, s, 8)).astype("float32")) for s in (8, 4, 2)]
    cls, box = head(feats)
    assert [tuple(c.shape) for c in cls] == [(2, 8 * 8 * 9, 5), (2, 4 * 4 * 9, 5), (2, 2 * 2 * 9, 5)]
    assert [tuple(b.shape) for b in box] == [(2, 576, 4), (2, 144, 4), (2, 36, 4)]
    # prior: sigmoid(logits) ~ 0.01 at init (N(0, 0.01) weights are tiny)
    p = tf.sigmoid(tf.concat(cls, axis=1)).numpy()
    np.testing.assert_allclose(p.mean(), 0.01, rtol=0.05)
    np.testing.assert_allclose(head.class_out.bias.numpy(), -math.log(99.0), rtol=1e-6)
    # weights shared across levels: count independent of the number of levels
    n = head.count_params()
    head(feats[:1])
    assert head.count_params() == n
    in_c, f, a, k = 8, 16, 9, 5
    expected = 2 * ((9 * in_c * f + f) + (9 * f * f + f)) + (9 * f * k * a + k * a) + (9 * f * 4 * a + 4 * a)
    assert n == expected


def test_config_round_trip():
    head = AnchorHead(num_classes=3, num_anchors=6, num_convs=1, filters=8, prior_probability=0.02)
    assert AnchorHead.from_config(head.get_config()).get_config() == head.get_config()
