"""kerasdet.layers.decomposer: App. B shapes (50x50 / 100x100 exactly), the recurrent
instance decomposer's outputs, Eq. 5 / Eq. 6 scores against hand computations."""
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.layers.decomposer import (
    CategoryDecomposer,
    InstanceBoxRegressor,
    InstanceDecomposer,
    box_raster,
    box_score,
    cxcywh_to_yxyx,
    mask_score,
    mirror_output_paddings,
    stride2_sizes,
)


def test_stride2_sizes_and_mirror_paddings_paper_sizes():
    assert stride2_sizes(100, 4) == [100, 50, 25, 13, 7]
    # decoder 7 -> 13 -> 25 -> 50 -> 100: op = out - 2 * in + 1
    assert mirror_output_paddings([100, 50, 25, 13, 7]) == [0, 0, 1, 1]


@pytest.mark.parametrize("full, side", [(False, 50), (True, 100)])
def test_category_decomposer_transposed_conv_shapes_are_exact(full, side):
    layer = CategoryDecomposer(num_classes=3, full_resolution=full)
    out = layer(np.random.default_rng(0).random((2, 100, 100, 1)).astype("float32"))
    assert tuple(out.shape) == (2, side, side, 3)
    assert float(tf.reduce_min(out)) >= 0.0  # ReLU maps
    # every intermediate deconv output mirrors the encoder: 7 -> 13 -> 25 -> 50 (-> 100)
    x = tf.zeros((1, 100, 100, 1))
    sizes = []
    for l in layer.encoder + layer.decoder:
        x = l(x)
        if "deconv" in l.name:
            sizes.append(int(x.shape[1]))
    assert sizes == ([13, 25, 50, 100] if full else [13, 25, 50])


def test_category_decomposer_parameter_count_matches_app_b():
    layer = CategoryDecomposer(num_classes=3)
    layer.build((None, 100, 100, 1))
    convs = [(1, 32, 5), (32, 32, 5), (32, 64, 3), (64, 64, 3), (64, 64, 3), (64, 64, 3),
             (64, 64, 3), (64, 64, 3), (64, 64, 3)]
    expected = sum(i * o * k * k + 4 * o for i, o, k in convs) + 64 * 3 + 3  # no-bias convs + BN; 1x1 head
    assert layer.count_params() == expected


@pytest.mark.parametrize("cell", ["fc", "conv_gru"])
@pytest.mark.parametrize("side", [50, 100])
def test_instance_decomposer_shapes(cell, side):
    layer = InstanceDecomposer(steps=4, cell=cell, units=32, conv_gru_filters=8, filters=8)
    out = layer(tf.random.uniform((3, side, side, 1)))
    assert tuple(out.shape) == (3, 4, side, side)
    assert layer.grid == (7, 7)  # 50 -> 25 -> 13 -> 7, 100 -> 50 -> 25 -> 13 -> 7
    assert float(tf.reduce_min(out)) >= 0.0


def test_instance_decomposer_steps_differ_and_config_round_trips():
    layer = InstanceDecomposer(steps=3, units=16, filters=8, recurrent_norm="layer", output_activation="sigmoid")
    x = tf.random.uniform((2, 50, 50, 1), seed=1)
    out = layer(x).numpy()
    assert not np.allclose(out[:, 0], out[:, 1])  # the recurrent state changes the output
    clone = InstanceDecomposer.from_config(layer.get_config())
    clone.build((None, 50, 50, 1))
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(clone(x).numpy(), out, atol=1e-5)
    with pytest.raises(ValueError, match="cell"):
        InstanceDecomposer(cell="lstm")


def test_conv_gru_initial_state_from_the_input():
    """initial_state='input': one tanh 3x3 conv per ConvGRU layer (parameters by hand); with
    those convs zeroed it is the zero-state layer exactly; otherwise the first map changes."""
    kw = dict(steps=3, cell="conv_gru", conv_gru_filters=6, filters=8, recurrent_norm="none")
    zero = InstanceDecomposer(**kw)
    learned = InstanceDecomposer(**kw, initial_state="input")
    x = tf.random.uniform((2, 50, 50, 1), seed=3)
    zero(x), learned(x)
    assert learned.count_params() - zero.count_params() == 2 * (9 * 8 * 6 + 6)  # 2 layers, code has 8 ch
    by_name = {v.path: v for v in learned.weights}
    for v in zero.weights:
        by_name[v.path.replace(zero.name, learned.name)].assign(v)
    first = learned(x).numpy()
    for conv in learned.state_init:
        conv.kernel.assign(tf.zeros_like(conv.kernel))
        conv.bias.assign(tf.zeros_like(conv.bias))
    np.testing.assert_allclose(learned(x).numpy(), zero(x).numpy(), atol=1e-6)
    assert not np.allclose(first[:, 0], zero(x).numpy()[:, 0], atol=1e-4)
    assert InstanceDecomposer.from_config(learned.get_config()).initial_state == "input"
    with pytest.raises(ValueError, match="conv_gru"):
        InstanceDecomposer(cell="fc", initial_state="input")


def test_box_regressor_outputs_unit_boxes():
    reg = InstanceBoxRegressor(hidden=16)
    out = reg(tf.random.uniform((5, 50, 50))).numpy()
    assert out.shape == (5, 4) and (out > 0).all() and (out < 1).all()


def test_box_raster_score_and_mask_score_by_hand():
    maps = np.zeros((4, 4), np.float32)
    maps[1:3, 1:3] = [[1.0, 0.5], [0.05, 2.0]]
    box = np.array([0.25, 0.25, 0.75, 0.75], np.float32)  # pixels 1..2 x 1..2
    raster = box_raster(box, 4, 4).numpy()
    assert raster.sum() == 4 and raster[1:3, 1:3].all()
    assert float(box_score(maps, box)) == pytest.approx((1.0 + 0.5 + 0.05 + 2.0) / 4)
    assert float(mask_score(maps, 0.1)) == pytest.approx((1.0 + 0.5 + 2.0) / 3)
    assert float(mask_score(np.zeros((4, 4), np.float32))) == 0.0
    np.testing.assert_allclose(cxcywh_to_yxyx(tf.constant([0.5, 0.4, 0.2, 0.6])).numpy(), [0.1, 0.4, 0.7, 0.6])


def test_boxes_from_maps_on_hand_made_maps():
    from kerasdet.layers.decomposer import boxes_from_maps

    maps = np.zeros((3, 10, 20), np.float32)
    maps[0, 2:5, 4:9] = 1.0          # a block: rows 2-4, cols 4-8
    maps[0, 6, 15] = 0.4             # below half the peak: ignored
    maps[1, 1, 1] = 0.2              # one weak pixel
    maps[1, 8, 18] = 0.15            # >= 0.5 * 0.2: counted
    boxes = boxes_from_maps(maps, 0.5).numpy()
    np.testing.assert_allclose(boxes[0], [0.2, 4 / 20, 0.5, 9 / 20], atol=1e-6)
    np.testing.assert_allclose(boxes[1], [0.1, 1 / 20, 0.9, 19 / 20], atol=1e-6)
    np.testing.assert_allclose(boxes[2], [0, 0, 0, 0])  # a black map: empty box
    np.testing.assert_allclose(boxes_from_maps(maps[:1], 0.3).numpy()[0], [0.2, 4 / 20, 0.7, 16 / 20], atol=1e-6)
    assert boxes_from_maps(np.zeros((2, 5, 3, 10, 20), np.float32)).shape == (2, 5, 3, 4)
