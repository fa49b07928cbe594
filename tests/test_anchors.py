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


def test_ssd_anchor_counts_match_assd_paper():
    from kerasdet.anchors import SSDAnchorGenerator

    gen = SSDAnchorGenerator()
    maps513 = [(65, 65), (33, 33), (17, 17), (9, 9), (5, 5), (3, 3), (1, 1)]
    assert gen.num_anchors_per_location == [4, 6, 6, 6, 6, 4, 4]
    assert gen.num_anchors(maps513) == 25_844  # ASSD513, paper Table 2
    assert gen(maps513, 513, 513).shape == (25_844, 4)
    maps321 = [(41, 41), (21, 21), (11, 11), (6, 6), (3, 3), (2, 2), (1, 1)]
    assert gen.num_anchors(maps321) == 10_386  # ASSD321 with a stride-2 conv9 (spec ambiguity 5)


def test_ssd_anchor_order_and_values():
    from kerasdet.anchors import SSDAnchorGenerator

    gen = SSDAnchorGenerator(min_sizes=(0.2, 0.5), max_sizes=(0.5, 0.8), aspect_ratios=((2.0,), (2.0, 3.0)))
    boxes = gen([(2, 2), (1, 1)], 100, 100).numpy()
    assert boxes.shape == (2 * 2 * 4 + 6, 4)
    c = 25.0  # first cell centre (0.5 / 2 of 100 px)
    s2 = 100 * (0.1 ** 0.5)
    r = 2 ** 0.5
    expected_first_cell = [
        [c - 10, c - 10, c + 10, c + 10],
        [c - s2 / 2, c - s2 / 2, c + s2 / 2, c + s2 / 2],
        [c - 10 / r, c - 10 * r, c + 10 / r, c + 10 * r],  # h = s / sqrt(2), w = s * sqrt(2)
        [c - 10 * r, c - 10 / r, c + 10 * r, c + 10 / r],  # its transpose
    ]
    np.testing.assert_allclose(boxes[:4], expected_first_cell, rtol=1e-5)
    # row-major cells: the second cell is one step to the right (x + 50 px)
    np.testing.assert_allclose(boxes[4:8], np.array(expected_first_cell) + [0, 50, 0, 50], rtol=1e-5)
    np.testing.assert_allclose(boxes[-6, :], [50 - 25, 50 - 25, 50 + 25, 50 + 25], rtol=1e-5)
    # legacy steps: ceil(513 / 65) = 8 px; the last centre sits past the border (1.006)
    legacy = SSDAnchorGenerator(legacy_steps=True)
    first = legacy.level_anchors(0, 65, 65, 513, 513).numpy()
    cy = (first[-1, 0] + first[-1, 2]) / 2
    np.testing.assert_allclose(cy / 513, 64.5 * 8 / 513, rtol=1e-6)
    assert cy / 513 > 1.0


def test_ssd_anchor_bad_config_and_round_trip():
    import pytest

    from kerasdet.anchors import SSDAnchorGenerator

    with pytest.raises(ValueError, match="one entry per level"):
        SSDAnchorGenerator(min_sizes=(0.1, 0.2), aspect_ratios=((2.0,),))
    with pytest.raises(ValueError, match="ratios > 1"):
        SSDAnchorGenerator(min_sizes=(0.1,), aspect_ratios=((0.5,),))
    gen = SSDAnchorGenerator(legacy_steps=True)
    assert SSDAnchorGenerator.from_config(gen.get_config()).get_config() == gen.get_config()
