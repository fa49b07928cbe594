import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.layers.padding import MirrorPadding2D


@pytest.mark.parametrize("mode, row", [("symmetric", [1, 1, 2, 3, 3]), ("reflect", [2, 1, 2, 3, 2]),
                                       ("zeros", [0, 1, 2, 3, 0])])
def test_modes_on_a_row(mode, row):
    x = tf.reshape(tf.constant([1.0, 2.0, 3.0] * 3), [1, 3, 3, 1])
    y = MirrorPadding2D(padding=1, mode=mode)(x).numpy()[0, ..., 0]
    assert y.shape == (5, 5)
    np.testing.assert_array_equal(y[2], row)
    layer = MirrorPadding2D(padding=2, mode=mode)
    assert MirrorPadding2D.from_config(layer.get_config()).get_config() == layer.get_config()
    assert layer.compute_output_shape((None, 4, None, 3)) == (None, 8, None, 3)


def test_mirror_conv_is_a_same_conv_on_the_mirror_padded_input():
    from kerasdet.layers.padding import MirrorConv2D

    x = tf.random.normal([1, 7, 6, 3], seed=0)
    for strides in (1, 2):
        conv = MirrorConv2D(4, 3, strides=strides, padding="same", pad_mode="symmetric")
        y = conv(x)
        plain = keras.layers.Conv2D(4, 3, strides=strides, padding="same")
        assert y.shape == plain(x).shape
        # TF "same": stride 1 pads 1/1; stride 2 on 7 rows pads 1/1, on 6 columns 0/1
        pads = [[0, 0], [1, 1], [1, 1], [0, 0]] if strides == 1 else [[0, 0], [1, 1], [0, 1], [0, 0]]
        ref = tf.nn.conv2d(tf.pad(x, pads, mode="SYMMETRIC"), conv.kernel, strides, "VALID") + conv.bias
        np.testing.assert_allclose(y.numpy(), ref.numpy(), atol=1e-5)
    assert MirrorConv2D.from_config(conv.get_config()).get_config() == conv.get_config()


def test_mirror_padded_backbone_keeps_weights_names_and_flags():
    from kerasdet.backbones import small_backbone
    from kerasdet.layers.padding import MirrorConv2D, mirror_padded

    backbone = small_backbone(widths=(8, 8, 8, 8), blocks=(1, 0, 0, 0), levels=("C3",))
    backbone.get_layer("stem_conv").trainable = False
    converted = mirror_padded(backbone)
    assert converted.count_params() == backbone.count_params()
    assert [layer.name for layer in converted.layers] == [layer.name for layer in backbone.layers]
    assert isinstance(converted.get_layer("c2_down_conv"), MirrorConv2D)
    assert not converted.get_layer("stem_conv").trainable
    for a, b in zip(converted.weights, backbone.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    x = tf.random.uniform([1, 32, 32, 3], 0, 255, seed=1)
    y, z = converted(x)["C3"].numpy(), backbone(x)["C3"].numpy()
    assert y.shape == z.shape and not np.allclose(y, z)  # the border sees mirrored pixels, not zeros
    assert mirror_padded(converted) is converted


def test_mirror_conv_keeps_its_padding_when_batchnorm_is_folded_into_it():
    from kerasdet.layers.padding import mirror_padded
    from kerasdet.precision import fold_batchnorm_calls

    images = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(images)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = mirror_padded(keras.Model(images, x))
    bn = model.get_layer("bn")
    bn.set_weights([np.full(4, 2.0), np.full(4, 0.5), np.full(4, 0.1), np.full(4, 4.0)])
    x = tf.random.normal([1, 5, 5, 3], seed=2)
    ref = model(x, training=False).numpy()
    with fold_batchnorm_calls(model, only_frozen=False) as folded:
        assert folded == 1
        np.testing.assert_allclose(model(x, training=False).numpy(), ref, atol=1e-4)
