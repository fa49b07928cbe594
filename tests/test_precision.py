"""kerasdet.precision: serving a float32-trained detector in bfloat16 / float16."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.backbones import small_backbone
from kerasdet.models.retinanet import RetinaNet
from kerasdet.precision import compute_dtype, set_compute_dtype


def _model():
    keras.utils.set_random_seed(3)
    model = RetinaNet(backbone=small_backbone(widths=(8, 16, 16, 16), blocks=(0, 1, 0, 0)), num_classes=3,
                      min_level=3, max_level=5, fpn_channels=16, head_convs=1, head_channels=16,
                      anchor_size=2.0, aspect_ratios=(1.0,), scales=(1.0,), prior_probability=0.3)
    model.build()
    return model


def _images():
    return tf.constant(np.random.RandomState(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32"))


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.05), ("float16", 0.01)])
def test_reduced_precision_outputs_close_to_float32_and_switch_back_is_exact(dtype, tol):
    model = _model()
    images = _images()
    ref = model(images)
    ref_det = model.predict_on_batch(images)
    set_compute_dtype(model, dtype)
    assert compute_dtype(model) == dtype
    assert model.postprocess.compute_dtype == "float32"
    assert all(v.dtype == "float32" for v in model.weights)
    low = model(images)
    assert low["class_logits"].dtype == dtype
    for key in ("class_logits", "box_deltas"):
        ref_v, low_v = ref[key].numpy(), tf.cast(low[key], tf.float32).numpy()
        assert np.abs(low_v - ref_v).max() <= tol * (1.0 + np.abs(ref_v).max())
        assert not np.array_equal(low_v, ref_v)  # really computed in the lower precision
    det = model.predict_on_batch(images)  # Keras' cached predict function was rebuilt
    assert det["scores"].dtype == np.float32 and det["boxes"].dtype == np.float32
    np.testing.assert_allclose(det["scores"][:, 0], ref_det["scores"][:, 0], atol=tol)
    set_compute_dtype(model, "float32")
    back = model(images)
    for key in ("class_logits", "box_deltas"):
        np.testing.assert_array_equal(back[key].numpy(), ref[key].numpy())


def test_rejects_unknown_dtype_and_unbuilt_model():
    with pytest.raises(ValueError, match="dtype"):
        set_compute_dtype(_model(), "int8")
    unbuilt = RetinaNet(backbone=small_backbone(widths=(8, 8, 8, 8), blocks=(0, 0, 0, 0)), num_classes=2,
                        max_level=5, fpn_channels=8, head_convs=1, head_channels=8)
    with pytest.raises(ValueError, match="built"):
        set_compute_dtype(unbuilt, "bfloat16")
