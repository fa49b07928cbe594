"""Shared fixtures-as-functions of the model tests."""
import numpy as np


def tiny_batch(batch=4, size=64, seed=0, num_classes=3):
    """Images with 2 painted squares each (class c painted in channel c), the last image empty.

    Returns ``(images float32 [B, size, size, 3], {"boxes" [B, 3, 4], "classes" [B, 3]})``.
    """
    rng = np.random.RandomState(seed)
    images = rng.uniform(0, 40, (batch, size, size, 3)).astype("float32")
    boxes = np.zeros((batch, 3, 4), "float32")
    classes = np.full((batch, 3), -1, "int32")
    for b in range(batch - 1):  # last image: no objects at all
        for j in range(2):
            y, x = rng.randint(0, size - 24, 2)
            s = rng.randint(12, 24)
            boxes[b, j] = [y, x, y + s, x + s]
            classes[b, j] = rng.randint(0, num_classes)
            images[b, y : y + s, x : x + s, classes[b, j] % 3] = 255.0
    return images, {"boxes": boxes, "classes": classes}


def assert_keras_file_round_trip(model, images, tmp_path, *, atol=1e-6):
    """``model.save("m.keras")`` + ``keras.models.load_model`` (no ``custom_objects``) give a
    model of the same class and config whose ``predict`` outputs equal ``model``'s (integer
    outputs exactly, float outputs within ``atol``), and ``from_config(get_config())``
    round-trips the config; every weight (BatchNorm statistics and non-trainable variables
    included) comes back unchanged. Returns ``(loaded, reference predict outputs)``."""
    import keras

    ref = model.predict(images, verbose=0)
    assert int(np.sum(ref["num_detections"])) > 0, "a round trip of no detections proves little"
    config = model.get_config()
    assert type(model).from_config(config).get_config() == config
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(model)
    assert loaded.get_config() == config
    assert len(loaded.weights) == len(model.weights)  # every variable, trainable or not
    for mine, theirs in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(theirs.numpy(), mine.numpy(), err_msg=mine.path)
    out = loaded.predict(images, verbose=0)
    assert sorted(out) == sorted(ref)
    for key, value in ref.items():
        if np.issubdtype(value.dtype, np.integer):
            np.testing.assert_array_equal(out[key], value, err_msg=key)
        else:
            np.testing.assert_allclose(out[key], value, rtol=0, atol=atol, err_msg=key)
    return loaded, ref
