"""Saving and restoring the random state of a model's ``keras.random.SeedGenerator`` s.

Keras 3 keeps each ``SeedGenerator``'s state (Dropout's, and every layer's that draws
random numbers through ``keras.random`` with a generator) in a variable, but
``model.save_weights`` leaves those variables out (measured with Keras 3.15: a Dropout
model's ``.weights.h5`` holds no ``seed_generator_state``). A run restored from weights
alone therefore draws different dropout masks and samples than the run it continues.
:func:`save_seed_states` / :func:`load_seed_states` write and read them next to a weights
file (``<weights>.seeds.npz``), so exact resume covers the random streams too.
"""
from __future__ import annotations

import os

import numpy as np

SUFFIX = ".seeds.npz"


def seed_state_variables(model) -> list:
    """Every SeedGenerator state variable reachable from ``model``, in the model's variable
    order (the same for two models built by the same code; the variable *names* are made
    unique per process, ``seed_generator_2/...``, so they cannot be the key)."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def seed_states_path(weights_path: str) -> str:
    """The side file of a weights file: ``<weights_path>.seeds.npz``."""
    return os.fspath(weights_path) + SUFFIX


def save_seed_states(model, weights_path: str) -> str | None:
    """Writes the model's seed states beside ``weights_path`` (nothing when it has none)."""
    states = [np.asarray(v.numpy()) for v in seed_state_variables(model)]
    if not states:
        return None
    target = seed_states_path(weights_path)
    tmp = target + ".tmp.npz"
    np.savez(tmp, **{f"s{i}": value for i, value in enumerate(states)})
    os.replace(tmp, target)
    return target


def load_seed_states(model, weights_path: str) -> int:
    """Restores the seed states saved beside ``weights_path``; returns how many (0 when
    there is no side file).

    Raises:
      ValueError: the file holds another number of generators than the model has (not
        the same architecture).
    """
    path = seed_states_path(weights_path)
    if not os.path.isfile(path):
        return 0
    variables = seed_state_variables(model)
    with np.load(path) as data:
        saved = [data[f"s{i}"] for i in range(len(data.files))]
    if len(saved) != len(variables):
        raise ValueError(f"{path}: {len(saved)} seed generator states for a model with {len(variables)}")
    for variable, value in zip(variables, saved):
        variable.assign(value)
    return len(saved)
