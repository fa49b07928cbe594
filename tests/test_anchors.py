import numpy as np
import pytest

from kerasdet.anchors import AnchorGenerator


def test_retinanet_sizes_per_level():
    gen = AnchorGenerator()
    assert gen.num_anchors_per_location == 9
    for level, smallest in zip(range(3, 8), [32, 64, 128, 256, 512]):
        hw = gen.base_shapes(level).numpy()
        areas = np.sqrt(hw[:, 0] * hw[:, 1])
        np.testing.assert_allclose(sorted(set(np.round(areas, 2))), np.round([smallest, smallest * 2 ** (1 / 3), smallest * 2 ** (2 / 3)], 2), rtol=1e-5)
        # ratio h/w in {0.5, 1, 2}
        np.testing.assert_allclose(sorted(set(np.round(hw[:, 0] / hw[:, 1], 4))), [0.5, 1.0, 2.0])
    # the 32..813 px coverage of §5.4
    np.testing.assert_allclose(512 * 2 ** (2 / 3), 812.7, atol=0.1)


def test_layout_centers_and_order():
    gen = AnchorGenerator(min_level=3, max_level=4, scales=(1.0,), aspect_ratios=(1.0, 2.0))
    anchors = gen(32, 48).numpy()
    # P3: 4x6 positions x 2 anchors, P4: 2x3 x 2
    assert anchors.shape == ((4 * 6 + 2 * 3) * 2, 4)
    first = anchors[0]  # (y=0, x=0, a=0): centre (4, 4), 32x32
    np.testing.assert_allclose(first, [4 - 16, 4 - 16, 4 + 16, 4 + 16])
    second = anchors[1]  # a=1: ratio 2 -> h = 32*sqrt2, w = 32/sqrt2
    np.testing.assert_allclose(second[2] - second[0], 32 * np.sqrt(2), rtol=1e-6)
    third = anchors[2]  # next x position
    np.testing.assert_allclose((third[1] + third[3]) / 2, 12.0)
    row2 = anchors[6 * 2]  # next y row
    np.testing.assert_allclose((row2[0] + row2[2]) / 2, 12.0)
    p4_first = anchors[48]
    np.testing.assert_allclose((p4_first[0] + p4_first[2]) / 2, 8.0)


def test_counts_thesis_scale():
    gen = AnchorGenerator()
    # ~201k anchors at 800x1333 (thesis §5.4 / spec table)
    n = gen.num_anchors(800, 1333)
    assert 190_000 < n < 210_000
    assert gen(800, 1333).shape[0] == n


def test_bad_config():
    with pytest.raises(ValueError):
        AnchorGenerator(min_level=5, max_level=3)
    with pytest.raises(ValueError):
        AnchorGenerator(aspect_ratios=(0.0,))
    gen = AnchorGenerator(min_level=2, max_level=6, anchor_size=8.0, scales=(1.0,))
    assert AnchorGenerator.from_config(gen.get_config()).get_config() == gen.get_config()
