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
