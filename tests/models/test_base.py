"""kerasdet.models.base.Detector's ``bounding_box_format``: labels read and ``predict`` boxes
written in any Keras format at the public edges, ``yxyx`` pixels inside (shown on a tiny
RetinaNet on a non-square 64x96 canvas, so a height/width mix-up of the ``rel_*`` formats
shows)."""
import keras
import numpy as np
import pytest

from kerasdet.backbones import small_backbone
from kerasdet.boxes import BOX_FORMATS
from kerasdet.models.retinanet import RetinaNet
from model_testutils import tiny_batch

H, W = 64, 96


def np_from_yxyx(boxes, fmt, height, width):
    """Hand conversion of ``[..., 4]`` yxyx pixel boxes to Keras format ``fmt`` (numpy)."""
    y0, x0, y1, x1 = np.moveaxis(np.asarray(boxes, np.float64), -1, 0)
    forms = {
        "yxyx": ([y0, x0, y1, x1], [height, width, height, width]),
        "xyxy": ([x0, y0, x1, y1], [width, height, width, height]),
        "xywh": ([x0, y0, x1 - x0, y1 - y0], [width, height, width, height]),
        "center_xywh": ([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], [width, height, width, height]),
        "center_yxhw": ([(y0 + y1) / 2, (x0 + x1) / 2, y1 - y0, x1 - x0], [height, width, height, width]),
    }
    relative = fmt.startswith("rel_")
    coords, scale = forms[fmt[4:] if relative else fmt]
    out = np.stack(coords, axis=-1)
    return (out / np.array(scale, np.float64) if relative else out).astype(np.float32)


def wide_batch():
    """``tiny_batch`` images padded on the right to 64x96 (boxes unchanged)."""
    images, labels = tiny_batch(batch=2)
    return np.pad(images, [[0, 0], [0, 0], [0, W - H], [0, 0]]), labels


def tiny_model(**kwargs):
    args = dict(backbone=small_backbone(widths=(8, 16, 16, 16), blocks=(0, 0, 0, 0)), num_classes=3, min_level=3,
                max_level=5, fpn_channels=16, head_convs=1, head_channels=16, anchor_size=2.0, aspect_ratios=(1.0,),
                scales=(1.0, 1.5), prior_probability=0.2, max_detections=20)
    args.update(kwargs)
    model = RetinaNet(**args)
    model.build((None, H, W, 3))
    return model


@pytest.fixture(scope="module")
def reference():
    keras.utils.set_random_seed(0)
    return tiny_model()


def with_format(reference, fmt):
    model = tiny_model(bounding_box_format=fmt)
    model.set_weights(reference.get_weights())
    return model


def test_hand_conversion_matches_the_documented_layouts():
    box = np.array([[10.0, 20.0, 30.0, 60.0]])  # ymin, xmin, ymax, xmax on 64 x 96
    np.testing.assert_allclose(np_from_yxyx(box, "xywh", H, W), [[20, 10, 40, 20]])
    np.testing.assert_allclose(np_from_yxyx(box, "center_xywh", H, W), [[40, 20, 40, 20]])
    np.testing.assert_allclose(np_from_yxyx(box, "rel_xyxy", H, W), [[20 / 96, 10 / 64, 60 / 96, 30 / 64]], rtol=1e-6)


def test_labels_in_every_format_give_the_yxyx_loss(reference):
    images, labels = wide_batch()
    expected = float(reference.compute_loss(images, labels, training=False))
    assert expected > 0
    for fmt in BOX_FORMATS:
        model = with_format(reference, fmt)
        given = dict(labels, boxes=np_from_yxyx(labels["boxes"], fmt, H, W))
        loss = float(model.compute_loss(images, given, training=False))
        np.testing.assert_allclose(loss, expected, rtol=1e-5, err_msg=fmt)
        # the same as the yxyx model's loss on the labels converted at the edge
        internal = model.labels_to_internal(images, given)
        np.testing.assert_allclose(internal["boxes"], labels["boxes"], atol=1e-4, err_msg=fmt)
        assert loss == float(reference.compute_loss(images, internal, training=False)), fmt


def test_fit_and_evaluate_read_labels_in_the_models_format(reference):
    images, labels = wide_batch()
    xywh = dict(labels, boxes=np_from_yxyx(labels["boxes"], "xywh", H, W))
    runs = []
    for fmt, given in (("yxyx", labels), ("xywh", xywh)):
        model = with_format(reference, fmt)
        model.compile(optimizer=keras.optimizers.SGD(1e-2))
        history = model.fit(images, given, batch_size=2, epochs=2, verbose=0).history
        logs = model.evaluate(images, given, batch_size=2, verbose=0, return_dict=True)
        runs.append((history["loss"], logs["loss"], model.get_weights()))
    np.testing.assert_allclose(runs[1][0], runs[0][0], rtol=1e-5)
    np.testing.assert_allclose(runs[1][1], runs[0][1], rtol=1e-5)
    for a, b in zip(runs[0][2], runs[1][2]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_predict_writes_boxes_in_every_format(reference):
    images, _ = wide_batch()
    ref = reference.predict(images, verbose=0)
    assert ref["num_detections"].min() > 0
    for fmt in BOX_FORMATS:
        model = with_format(reference, fmt)
        out = model.predict(images, verbose=0)
        scale = 1.0 if fmt.startswith("rel_") else W
        np.testing.assert_allclose(out["boxes"], np_from_yxyx(ref["boxes"], fmt, H, W), rtol=0, atol=1e-5 * scale,
                                   err_msg=fmt)
        for key in ("scores", "classes", "num_detections"):
            np.testing.assert_array_equal(out[key], ref[key], err_msg=fmt)
        # inside, boxes stay yxyx pixels
        np.testing.assert_array_equal(model.detect(images)["boxes"].numpy(), reference.detect(images)["boxes"].numpy())


def test_format_is_validated_and_serialized(tmp_path):
    with pytest.raises(ValueError, match="bounding_box_format must be one of"):
        tiny_model(bounding_box_format="cxcywh")
    model = tiny_model(bounding_box_format="rel_center_xywh")
    config = model.get_config()
    assert config["bounding_box_format"] == "rel_center_xywh"
    assert RetinaNet.from_config(config).bounding_box_format == "rel_center_xywh"
    assert tiny_model().get_config()["bounding_box_format"] == "yxyx"  # the default
    model.save(str(tmp_path / "m.keras"))
    assert keras.models.load_model(str(tmp_path / "m.keras")).bounding_box_format == "rel_center_xywh"
