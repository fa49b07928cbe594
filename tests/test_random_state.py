"""kerasdet.random_state: SeedGenerator states survive a weights round trip."""
import keras
import numpy as np

from kerasdet.random_state import load_seed_states, save_seed_states, seed_state_variables


def _dropout_model(seed):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((64,))
    return keras.Model(inp, keras.layers.Dropout(0.5)(inp))


def test_seed_states_round_trip_gives_the_same_random_stream(tmp_path):
    model = _dropout_model(0)
    ones = np.ones((2, 64), "float32")
    model(ones, training=True)  # advance the generator
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    assert save_seed_states(model, path) == path + ".seeds.npz"
    expected = [np.asarray(model(ones, training=True)) for _ in range(2)]
    # keras' own weights file does not hold the state: a fresh model draws other masks
    fresh = _dropout_model(1)
    fresh.load_weights(path)
    assert not np.array_equal(np.asarray(fresh(ones, training=True)), expected[0])
    restored = _dropout_model(1)
    restored.load_weights(path)
    assert load_seed_states(restored, path) == len(seed_state_variables(restored)) == 1
    for want in expected:
        np.testing.assert_array_equal(np.asarray(restored(ones, training=True)), want)
    assert load_seed_states(restored, str(tmp_path / "none.weights.h5")) == 0
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert save_seed_states(plain, str(tmp_path / "p.weights.h5")) is None
