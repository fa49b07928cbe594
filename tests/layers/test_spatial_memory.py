"""kerasdet.layers.spatial_memory: crop / reverse-crop paste, prior, write, context net."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.layers.spatial_memory import (
    ContextNet, InputModule, MemoryPrior, MemoryWrite, crop_one_box, paste_one_box,
)


def _linear_map(h, w, d, seed=0):
    """A map that is linear in (row, col) per channel: bilinear resampling is exact on it."""
    rng = np.random.RandomState(seed)
    a, b, c = rng.normal(size=(3, d))
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return (a * i[..., None] + b * j[..., None] + c).astype("float32")[None]


@pytest.mark.parametrize("box", [(16.0, 32.0, 96.0, 80.0), (0.0, 0.0, 160.0, 176.0), (40.0, 50.0, 60.0, 58.0)])
def test_paste_of_crop_reproduces_inside_and_is_zero_outside(box):
    stride, h, w = 16, 11, 12
    mem = _linear_map(h, w, 3)
    boxes = tf.constant([box], tf.float32)
    crop = crop_one_box(tf.constant(mem), boxes, stride=stride, crop_size=14)
    assert crop.shape == (1, 14, 14, 3)
    pasted = paste_one_box(crop, boxes, stride=stride, height=h, width=w).numpy()[0]
    y1, x1, y2, x2 = np.array(box) / stride
    cy, cx = (y1 + y2) / 2, (x1 + x2) / 2
    hh, ww = max(y2 - y1, 1.0), max(x2 - x1, 1.0)  # the 1-cell clamp
    y1, y2, x1, x2 = cy - hh / 2, cy + hh / 2, cx - ww / 2, cx + ww / 2
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    inside = (ii >= y1 - 1e-4) & (ii <= y2 + 1e-4) & (jj >= x1 - 1e-4) & (jj <= x2 + 1e-4)
    assert inside.any()
    np.testing.assert_allclose(pasted[inside], mem[0][inside], atol=1e-4)
    assert np.all(pasted[~inside] == 0.0)
    # crop samples: first/last on the box edges (tf-faster-rcnn normalization)
    a = mem[0, 1, 0] - mem[0, 0, 0]
    b = mem[0, 0, 1] - mem[0, 0, 0]
    np.testing.assert_allclose(crop.numpy()[0, 0, 0], mem[0, 0, 0] + a * y1 + b * x1, atol=1e-4)
    np.testing.assert_allclose(crop.numpy()[0, -1, -1], mem[0, 0, 0] + a * y2 + b * x2, atol=1e-4)


def test_write_leaves_cells_outside_the_box_unchanged_and_changes_inside():
    keras.utils.set_random_seed(0)
    stride, h, w, d = 16, 8, 9, 6
    write = MemoryWrite(channels=d, stride=stride, crop_size=7)
    memory = tf.random.uniform((2, h, w, d), -0.5, 0.5)
    feats = tf.random.normal((2, h, w, 5))
    boxes = tf.constant([[16.0, 16.0, 64.0, 48.0], [0.0, 80.0, 40.0, 128.0]])
    scores = tf.nn.softmax(tf.random.normal((2, 4)))
    new = write(memory, feats, boxes, scores).numpy()
    assert new.shape == memory.shape
    old = memory.numpy()
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for b in range(2):
        y1, x1, y2, x2 = boxes.numpy()[b] / stride
        inside = (ii >= y1) & (ii <= y2) & (jj >= x1) & (jj <= x2)
        np.testing.assert_array_equal(new[b][~inside], old[b][~inside])
        assert np.abs(new[b][inside] - old[b][inside]).max() > 1e-3
    # the GRU on the crop: inside cells at crop sample points equal the GRU's new state
    x = write.input_module(crop_one_box(feats, boxes, stride=stride, crop_size=7), scores)
    s = crop_one_box(memory, boxes, stride=stride, crop_size=7)
    s_new = write.gru(x, s).numpy()
    # box 0 spans cells 1..4 x 1..3 -> crop samples at cell centres hit integer cells at 0 and 6
    np.testing.assert_allclose(new[0, 1, 1], s_new[0, 0, 0], atol=1e-5)
    np.testing.assert_allclose(new[0, 4, 3], s_new[0, 6, 6], atol=1e-5)
    config = write.get_config()
    assert MemoryWrite.from_config(config).get_config() == config


def test_prior_is_resized_per_image_size_and_trainable():
    prior = MemoryPrior(channels=4, prior_size=20)
    a = prior(tf.zeros((2, 8, 10, 3)))
    b = prior(tf.zeros((1, 38, 63, 3)))
    assert a.shape == (2, 8, 10, 4) and b.shape == (1, 38, 63, 4)
    assert prior.prior.shape == (20, 20, 4) and prior.trainable_weights
    prior.prior.assign(tf.fill((20, 20, 4), 0.3))
    np.testing.assert_allclose(prior(tf.zeros((1, 5, 7, 1))).numpy(), 0.3, atol=1e-6)


def test_input_module_tiles_scores_and_context_net_residual_structure():
    im = InputModule(channels=4)
    crop = tf.random.normal((2, 3, 3, 5))
    scores = tf.constant([[0.1, 0.9], [0.7, 0.3]])
    out = im(crop, scores)
    assert out.shape == (2, 3, 3, 4)
    k1 = im.conv1.kernel.numpy()[0, 0]
    pre = np.concatenate([crop.numpy(), np.broadcast_to(scores.numpy()[:, None, None], (2, 3, 3, 2))], -1) @ k1
    h1 = np.maximum(pre + im.conv1.bias.numpy(), 0)
    np.testing.assert_allclose(out.numpy(), np.maximum(h1 @ im.conv2.kernel.numpy()[0, 0] + im.conv2.bias.numpy(), 0),
                               atol=1e-5)

    net = ContextNet(channels=4, num_layers=5)
    x = tf.random.normal((1, 6, 6, 3))
    y = net(x).numpy()
    c = [lambda v, i=i: net.convs[i](v) for i in range(5)]
    c1 = c[0](x)
    c3 = c1 + c[2](tf.nn.relu(c[1](tf.nn.relu(c1))))
    m5 = c3 + c[4](tf.nn.relu(c[3](tf.nn.relu(c3))))
    np.testing.assert_allclose(y, tf.nn.relu(m5).numpy(), atol=1e-5)
    assert y.shape == (1, 6, 6, 4)
    with pytest.raises(ValueError):
        ContextNet(num_layers=4)
