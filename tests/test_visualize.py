import numpy as np

from kerasdet.visualize import draw_detections


def test_draws_boxes_above_threshold_only():
    image = np.zeros((100, 200, 3), np.uint8)
    out = draw_detections(image, [[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]], [0.9, 0.1], [1, 2])
    assert image.sum() == 0  # input untouched
    assert out[10, 20:100].any()  # top edge of the first box (y=10, x from 20 to 100)
    assert not out[60:90, 120:180].any()  # second box under threshold
    px = draw_detections(image, [[10, 20, 50, 100]], [0.9], [1], normalized=False, class_names={1: "one"})
    assert px[10, 20:100].any()
