"""DeepMask patch sampler: drawn positives / negatives meet the definitions (checked with
numpy, independently of the sampler's own test), crops land where the windows are,
seeding, the dataset transform."""
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.data.patches import PatchSampler, patch_dataset

H = W = 96


def _batch():
    """Two 96x96 images; channel 0 = row, 1 = column (so a crop tells where it came from)."""
    yy, xx = np.meshgrid(np.arange(H, dtype=np.float32), np.arange(W, dtype=np.float32), indexing="ij")
    image = np.stack([yy, xx, np.full_like(yy, 50.0)], axis=-1)
    images = np.stack([image, image])
    boxes = np.zeros([2, 3, 4], np.float32)
    classes = -np.ones([2, 3], np.int32)
    masks = np.zeros([2, 3, H, W], np.uint8)
    objects = {0: [(10, 12, 40, 30), (50, 40, 80, 90)], 1: [(20, 20, 60, 44)]}
    for b, rows in objects.items():
        for n, (y0, x0, y1, x1) in enumerate(rows):
            boxes[b, n] = (y0, x0, y1, x1)
            classes[b, n] = 0
            masks[b, n, y0:y1, x0:x1] = 1
    labels = {"boxes": tf.constant(boxes), "classes": tf.constant(classes), "masks": tf.constant(masks),
              "is_crowd": tf.zeros([2, 3], tf.bool)}
    return tf.constant(images), labels, objects


def _sampler(**kwargs):
    args = dict(patch_size=32, context=8, patches_per_image=24, positive_fraction=0.5, flip=False)
    args.update(kwargs)
    return PatchSampler(**args)


def test_defaults_are_deepmask_definition_scaled_to_patch():
    s = PatchSampler(patch_size=224)
    assert (s.object_size, s.max_shift, s.negative_shift, s.scale_jitter, s.negative_scale) == (128, 16, 32, 0.25, 1)
    assert PatchSampler().window_size == 192  # thesis W = 160 plus 32 px of context
    with pytest.raises(ValueError, match="fully inside"):
        PatchSampler(patch_size=64, object_size=60)


def test_drawn_positives_and_negatives_meet_the_definitions():
    images, labels, objects = _batch()
    s = _sampler()
    _, t = s.sample(images, labels, tf.constant([3, 7]))
    score, windows, index, obj = (t[k].numpy() for k in ("score", "windows", "image_index", "object"))
    assert (score == 1).sum() == 24 and (score == -1).sum() > 16  # 12 positive slots per image
    for m in range(len(score)):
        side = windows[m, 2] - windows[m, 0]
        assert side == pytest.approx(windows[m, 3] - windows[m, 1], rel=1e-5)
        px = 32.0 / side
        cy, cx = (windows[m, 0] + windows[m, 2]) / 2, (windows[m, 1] + windows[m, 3]) / 2
        rows = np.array(objects[index[m]], np.float32)
        off = np.maximum(np.abs((rows[:, 0] + rows[:, 2]) / 2 - cy), np.abs((rows[:, 1] + rows[:, 3]) / 2 - cx)) * px
        scale = np.abs(np.log2(np.maximum(rows[:, 2] - rows[:, 0], rows[:, 3] - rows[:, 1]) * px / s.object_size))
        if score[m] == 1:
            n = obj[m]
            assert off[n] <= 32 * 16 / 224 + 1e-3 and scale[n] <= 0.25 + 1e-4
            # fully inside the central 32 px region
            y0, x0, y1, x1 = rows[n]
            assert windows[m, 0] <= y0 and y1 <= windows[m, 2] and windows[m, 1] <= x0 and x1 <= windows[m, 3]
        elif score[m] == -1:
            assert obj[m] == -1
            assert np.all((off >= 32 * 32 / 224 - 1e-3) | (scale >= 1 - 1e-4))
    # jitter covers the range: not every positive sits exactly at the centre / canonical scale
    pos = score == 1
    assert np.ptp((windows[pos, 2] - windows[pos, 0])) > 0.5


def test_crops_land_on_their_windows_and_masks_are_the_object():
    images, labels, objects = _batch()
    s = _sampler()
    patches, t = s.sample(images, labels, tf.constant([1, 2]))
    patches, windows, masks = patches.numpy(), t["windows"].numpy(), t["masks"].numpy()
    score, index, obj = t["score"].numpy(), t["image_index"].numpy(), t["object"].numpy()
    assert patches.shape == (48, 40, 40, 3) and masks.shape == (48, 32, 32)
    for m in np.flatnonzero(score == 1):
        side = windows[m, 2] - windows[m, 0]
        outer0 = windows[m, :2] - side * 4 / 32  # 4 px of context per side at the 32 px scale
        step = side * 40 / 32 / 40
        centre = outer0 + (np.array([20, 20]) + 0.5) * step - 0.5
        if np.all(centre > 0) and np.all(centre < H - 1):  # interior: bilinear of a linear ramp is exact
            np.testing.assert_allclose(patches[m, 20, 20, :2], centre, atol=1e-2)
        # the mask target is the object's box rasterized on the 32x32 grid over the window
        y0, x0, y1, x1 = objects[index[m]][obj[m]]
        grid = windows[m, 0] + (np.arange(32) + 0.5) * side / 32
        gridx = windows[m, 1] + (np.arange(32) + 0.5) * side / 32
        inside = ((grid >= y0) & (grid < y1))[:, None] & ((gridx >= x0) & (gridx < x1))[None, :]
        assert np.mean(masks[m] == inside) > 0.97
    assert np.all(masks[score != 1] == 0)


def test_seeded_flip_and_images_without_objects():
    images, labels, _ = _batch()
    s = _sampler(flip=True)
    a, ta = s.sample(images, labels, tf.constant([5, 5]))
    b, tb = s.sample(images, labels, tf.constant([5, 5]))
    c, _ = s.sample(images, labels, tf.constant([5, 6]))
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), c.numpy())
    flipped = ta["flipped"].numpy()
    assert 0 < flipped.sum() < len(flipped)
    unflipped, tu = _sampler(flip=False).sample(images, labels, tf.constant([5, 5]))
    np.testing.assert_allclose(a.numpy()[flipped], unflipped.numpy()[flipped][:, :, ::-1], atol=1e-4)
    np.testing.assert_array_equal(ta["masks"].numpy()[flipped], tu["masks"].numpy()[flipped][:, :, ::-1])
    empty = dict(labels, classes=-tf.ones_like(labels["classes"]))
    _, te = s.sample(images, empty, tf.constant([0, 1]))
    assert np.all(te["score"].numpy() <= 0) and np.all(te["masks"].numpy() == 0)


def test_patch_dataset_is_a_seeded_stream():
    images, labels, _ = _batch()
    ds = tf.data.Dataset.from_tensors((images, labels)).repeat(3)
    s = _sampler(patches_per_image=4)
    out = list(patch_dataset(ds, s, seed=1))
    assert len(out) == 3 and out[0][0].shape == (8, 40, 40, 3) and set(out[0][1]) == {"score", "masks"}
    assert not np.array_equal(out[0][0].numpy(), out[1][0].numpy())
    resumed = list(patch_dataset(ds.skip(1), s, seed=1, start_batch=1))
    np.testing.assert_array_equal(resumed[0][0].numpy(), out[1][0].numpy())
