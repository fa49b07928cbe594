import numpy as np

from kerasdet.schedules import WarmupPiecewiseConstant


def test_warmup_and_steps():
    s = WarmupPiecewiseConstant(base_lr=0.01, boundaries=(60000, 80000), decay=0.1, warmup_steps=500)
    np.testing.assert_allclose(float(s(0)), 0.01 / 3, rtol=1e-6)
    np.testing.assert_allclose(float(s(250)), 0.01 * (1 / 3 * 0.5 + 0.5), rtol=1e-6)
    np.testing.assert_allclose(float(s(500)), 0.01, rtol=1e-6)
    np.testing.assert_allclose(float(s(59999)), 0.01, rtol=1e-6)
    np.testing.assert_allclose(float(s(60000)), 0.001, rtol=1e-5)
    np.testing.assert_allclose(float(s(80000)), 0.0001, rtol=1e-5)
    clone = WarmupPiecewiseConstant(**s.get_config())
    assert clone.get_config() == s.get_config()
