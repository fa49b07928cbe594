"""Window crops and mask pastes: the half-pixel convention, pastes land where the window is."""
import numpy as np
import tensorflow as tf

from kerasdet.layers.windows import crop_windows, paste_masks


def test_crop_windows_half_pixel_convention():
    ramp = tf.reshape(tf.range(16, dtype=tf.float32), [1, 4, 4, 1])
    # the whole image at its own size is the identity
    same = crop_windows(ramp, tf.constant([[0.0, 0.0, 4.0, 4.0]]), tf.constant([0]), 4)
    np.testing.assert_allclose(same.numpy(), ramp.numpy(), atol=1e-5)
    # a 2x2 window at 1x resolution is that sub-block; outside reads the fill value
    sub = crop_windows(ramp, tf.constant([[1.0, 2.0, 3.0, 4.0], [10.0, 10.0, 12.0, 12.0]]), tf.constant([0, 0]), 2,
                       extrapolation_value=-1.0)
    np.testing.assert_allclose(sub[0, ..., 0].numpy(), [[6, 7], [10, 11]], atol=1e-5)
    assert np.all(sub[1].numpy() == -1.0)


def test_pasted_masks_land_on_the_object():
    # a 8x8 mask covering window [10, 20, 26, 36] (2 image px per mask px); its object is
    # mask rows 2..5, columns 4..7 -> image rows 14..22, columns 28..36
    mask = np.zeros((8, 8), np.float32)
    mask[2:6, 4:8] = 1.0
    pasted = paste_masks(tf.constant([mask, mask]), tf.constant([[10.0, 20.0, 26.0, 36.0], [-4.0, -4.0, 12.0, 12.0]]),
                         tf.constant([0, 1]), (40, 48)).numpy()
    assert pasted.shape == (2, 40, 48)
    expected = np.zeros((40, 48), bool)
    expected[14:22, 28:36] = True
    binary = pasted[0] > 0.5
    assert np.array_equal(binary, expected)
    assert np.all(pasted[0][:10] == 0) and np.all(pasted[0][:, 36:] == 0)  # nothing outside the window
    # a constant mask fills exactly its window, edges included
    full = paste_masks(tf.ones([1, 8, 8]), tf.constant([[10.0, 20.0, 26.0, 36.0]]), tf.constant([0]), (40, 48))
    window = np.zeros((40, 48), np.float32)
    window[10:26, 20:36] = 1
    np.testing.assert_allclose(full.numpy()[0], window, atol=1e-6)
    # a window partly outside the image (its top-left at -4, -4): the object lands at rows 0..7, columns 4..11
    expected2 = np.zeros((40, 48), bool)
    expected2[0:8, 4:12] = True
    assert np.array_equal(pasted[1] > 0.5, expected2)
    # crop of the paste gives the mask back (inverse resamplings)
    back = crop_windows(pasted[0][None, :, :, None], tf.constant([[10.0, 20.0, 26.0, 36.0]]), tf.constant([0]), 8)
    np.testing.assert_allclose(back.numpy()[0, ..., 0], tf.image.resize(
        tf.image.resize(mask[None, :, :, None], [16, 16]), [8, 8]).numpy()[0, ..., 0], atol=1e-5)


def test_matmul_backend_equals_crop_and_resize_and_compiles_with_xla():
    """backend="matmul" (XLA-compilable) takes the same samples as crop_and_resize: random
    windows inside, across and outside the image, up- and down-sampling, a fill value, a
    non-square size; the pastes too, also inside an XLA-compiled function."""
    import pytest

    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(size=(3, 20, 24, 2)).astype(np.float32))
    y0 = rng.uniform(-10, 20, size=40)
    x0 = rng.uniform(-10, 24, size=40)
    windows = np.stack([y0, x0, y0 + rng.uniform(0.5, 30, 40), x0 + rng.uniform(0.5, 30, 40)], -1)
    windows[0] = [0, 0, 20, 24]  # the whole image, on the pixel grid
    windows[1] = [30, 30, 40, 40]  # wholly outside
    windows = tf.constant(windows, tf.float32)
    index = tf.constant(rng.integers(0, 3, size=40), tf.int32)
    for size, fill in ((7, 0.0), ((5, 9), -1.5), (1, 0.25)):
        ref = crop_windows(images, windows, index, size, extrapolation_value=fill)
        got = crop_windows(images, windows, index, size, extrapolation_value=fill, backend="matmul")
        np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-5)
    assert np.all(got.numpy()[1] == 0.25)
    masks = tf.constant(rng.uniform(size=(40, 6, 6)).astype(np.float32))
    ref = paste_masks(masks, windows, tf.range(40), (20, 24))
    got = tf.function(lambda m, w: paste_masks(m, w, tf.range(40), (20, 24), backend="matmul"),
                      jit_compile=True)(masks, windows)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        crop_windows(images, windows, index, 4, backend="gather")
    with pytest.raises(ValueError, match="bilinear only"):
        crop_windows(images, windows, index, 4, method="nearest", backend="matmul")
