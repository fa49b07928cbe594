import numpy as np
import pytest
import tensorflow as tf

from kerasdet.backbones import small_backbone
from kerasdet.layers.fusion import SemanticFusion, resize_bilinear

#: image pixel of cell i of a stride-s map under each grid convention (module docstring)
CENTRES = {
    "corners": lambda s, i: s * i,
    "half_pixel": lambda s, i: s * i + (s - 1) / 2,
    "same_padding": lambda s, i: s * i + s - 1,
}


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


@pytest.mark.parametrize("size_in,size_out", [(4, 16), (3, 7), (17, 65)])
def test_corners_and_half_pixel_equal_tensorflows_resizes(size_in, size_out):
    x = tf.constant(np.random.RandomState(2).normal(size=(2, size_in, size_in + 1, 3)).astype("float32"))
    out = (size_out, size_out + 2)
    corners = tf.compat.v1.image.resize_bilinear(x, out, align_corners=True, half_pixel_centers=False)
    np.testing.assert_allclose(resize_bilinear(x, out, alignment="corners"), corners, atol=1e-5)
    np.testing.assert_allclose(resize_bilinear(x, out, alignment="half_pixel"), tf.image.resize(x, out), atol=1e-5)


@pytest.mark.parametrize("alignment,sizes,canvas", [
    ("corners", (65, 33, 17), 513),         # 2^k + 1 grids (ASSD513's conv3/4/5)
    ("half_pixel", (16, 8, 4), 128),        # 2^k grids of block-centred cells
    ("same_padding", (16, 8, 4), 128),      # 2^k grids of TF "same" stride-2 convs (the digits)
])
def test_grids_line_up(alignment, sizes, canvas):
    """A coarse map holding each cell's image coordinate, upsampled, holds the fine cells'
    coordinates (inside the coarse grid's extent; beyond it the edge cell is kept)."""
    fine = sizes[0]
    s_fine = canvas // fine if alignment != "corners" else (canvas - 1) // (fine - 1)
    for coarse in sizes[1:]:
        s = s_fine * (fine // coarse if alignment != "corners" else (fine - 1) // (coarse - 1))
        ys = np.array([CENTRES[alignment](s, i) for i in range(coarse)], np.float32)
        grid = np.broadcast_to(ys[None, :, None, None], (1, coarse, coarse, 1))
        up = resize_bilinear(tf.constant(grid), (fine, fine), alignment=alignment).numpy()[0, :, 0, 0]
        want = np.array([CENTRES[alignment](s_fine, j) for j in range(fine)], np.float32)
        inside = (want >= ys[0]) & (want <= ys[-1])
        assert inside.sum() >= fine // 2
        np.testing.assert_allclose(up[inside], want[inside], atol=1e-4)
        np.testing.assert_allclose(up[~inside], np.clip(want[~inside], ys[0], ys[-1]), atol=1e-4)


def test_align_corners_misregisters_the_digits_grids():
    """On the small backbone's 16 / 4 grids (128 px), align_corners=True (the former default)
    reads C5 up to 19.2 px away from the fine cell's image point, half_pixel 12 px (away from the clamped edges);
    same_padding is exact."""
    ys = np.array([CENTRES["same_padding"](32, i) for i in range(4)], np.float32)
    grid = tf.constant(np.broadcast_to(ys[None, :, None, None], (1, 4, 4, 1)))
    want = np.array([CENTRES["same_padding"](8, j) for j in range(16)], np.float32)
    inside = (want >= ys[0]) & (want <= ys[-1])
    err = np.abs(resize_bilinear(grid, (16, 16), alignment="corners").numpy()[0, :, 0, 0] - want)[inside]
    np.testing.assert_allclose(err.max(), 19.2, atol=1e-3)
    err = np.abs(resize_bilinear(grid, (16, 16), alignment="half_pixel").numpy()[0, :, 0, 0] - want)[inside]
    np.testing.assert_allclose(err.max(), 12.0, atol=1e-3)
    assert np.abs(resize_bilinear(grid, (16, 16), alignment="same_padding").numpy()[0, :, 0, 0] - want)[inside].max() < 1e-4


def test_small_backbone_cells_sit_where_same_padding_says():
    """The gradient centroid of a C3 / C4 / C5 cell of the small backbone (its receptive-field
    centre) is at s*i + s - 1, not at half_pixel's s*i + (s-1)/2 or corners' s*i."""
    bb = small_backbone(input_shape=(128, 128, 3), levels=("C3", "C4", "C5"))
    x = tf.random.stateless_uniform((1, 128, 128, 3), seed=(1, 2)) * 255
    for level, s in (("C3", 8), ("C4", 16), ("C5", 32)):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = bb(x)[level]
            i = y.shape[1] // 2
            value = tf.reduce_sum(tf.abs(y[0, i, i]))
        g = tf.reduce_sum(tf.abs(tape.gradient(value, x)[0]), axis=(1, 2)).numpy()  # per image row
        centroid = (g * np.arange(128)).sum() / g.sum()
        assert abs(centroid - CENTRES["same_padding"](s, i)) < 2.5, (level, centroid)
        assert abs(centroid - CENTRES["same_padding"](s, i)) < abs(centroid - CENTRES["half_pixel"](s, i))


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
    layer = SemanticFusion(reduced_channels=3, output_channels=5, alignment="same_padding")
    with tf.GradientTape() as tape:
        tape.watch(feats)
        loss = tf.reduce_sum(layer(feats, training=True))
    grads = tape.gradient(loss, feats)
    assert all(g is not None for g in grads)
    assert SemanticFusion.from_config(layer.get_config()).get_config() == layer.get_config()
    assert layer.get_config()["alignment"] == "same_padding"
    assert SemanticFusion(align_corners=False).alignment == "half_pixel"  # configs saved before `alignment`
    with pytest.raises(ValueError, match="alignment"):
        SemanticFusion(alignment="centre")
    with pytest.raises(ValueError, match="two feature maps"):
        SemanticFusion()([tf.zeros((1, 4, 4, 2))])
