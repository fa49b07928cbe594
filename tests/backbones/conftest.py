"""Fixtures for the backbone tests."""
import numpy as np
import pytest


@pytest.fixture
def images_64():
    """One random RGB image, 64x64, pixel values in 0..255."""
    rng = np.random.default_rng(1)
    return rng.uniform(0, 255, size=(1, 64, 64, 3)).astype("float32")
