"""Helpers shared by the backbone tests (importable as a plain module)."""
import h5py
import numpy as np


def write_legacy_weights_h5(model, path):
    """Writes ``model``'s weights as a weights-only legacy Keras HDF5 file.

    This is the layout of the official keras.applications ``*_weights_tf_dim_ordering_*.h5``
    files (root attrs ``layer_names``; one group per layer with ``weight_names``).
    """
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return path


def randomize_batchnorm_statistics(model, seed=0):
    """Gives every BN layer non-default moving statistics (so weight loading is observable)."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0.0, 0.5, channels).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, channels).astype("float32"))
            layer.beta.assign(rng.normal(0.0, 0.5, channels).astype("float32"))
    return model


def assert_same_weights_by_name(source, target):
    """Every weighted layer of ``target`` equals the same-named layer of ``source``."""
    checked = 0
    for layer in target.layers:
        if not layer.weights:
            continue
        ref = source.get_layer(layer.name)
        for a, b in zip(layer.get_weights(), ref.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=layer.name)
        checked += 1
    assert checked > 0

