"""kerasdet.layers.sync_batch_norm: two-pass moments, Keras BN's variables and inference."""
import keras
import numpy as np
import tensorflow as tf

from kerasdet.layers.sync_batch_norm import SyncBatchNormalization


def _data(mean=1000.0, std=0.01, seed=0):
    rng = np.random.default_rng(seed)
    return (mean + std * rng.standard_normal((8, 4, 4, 3))).astype("float32")


def test_training_moments_are_the_two_pass_ones_where_one_pass_cancels():
    x = _data()
    reference = x.astype(np.float64)
    mean, var = reference.mean(axis=(0, 1, 2)), reference.var(axis=(0, 1, 2))  # float64 truth
    layer = SyncBatchNormalization(momentum=0.0, epsilon=1e-12)
    layer(x, training=True)  # momentum 0: the moving statistics become the batch's
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-3)
    # one pass (E[x^2] - E[x]^2) in float32 on the same batch is far off
    one_pass = (x.astype(np.float32) ** 2).mean(axis=(0, 1, 2)) - x.mean(axis=(0, 1, 2)) ** 2
    assert np.max(np.abs(one_pass - var) / var) > 0.1


def test_same_variables_and_inference_as_keras_batch_norm():
    x = _data(mean=0.5, std=2.0, seed=1)
    ours, theirs = SyncBatchNormalization(), keras.layers.BatchNormalization()
    ours.build(x.shape)
    theirs.build(x.shape)
    assert [v.path.split("/")[-1] for v in ours.weights] == [v.path.split("/")[-1] for v in theirs.weights]
    rng = np.random.default_rng(2)
    values = [rng.uniform(0.5, 1.5, v.shape).astype("float32") for v in theirs.weights]
    theirs.set_weights(values)
    ours.set_weights(values)  # weights of either load into the other
    np.testing.assert_allclose(ours(x, training=False), theirs(x, training=False), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours(x, training=True), theirs(x, training=True), rtol=1e-4, atol=1e-4)
    assert ours.get_config()["synchronized"] is True
    assert SyncBatchNormalization.from_config(ours.get_config()).get_config() == ours.get_config()


_TWO_REPLICAS = r"""
import numpy as np, tensorflow as tf
from kerasdet.distribute import split_cpu
cpus = split_cpu(2)
from kerasdet.layers.sync_batch_norm import SyncBatchNormalization
x = (3.0 + 0.5 * np.random.default_rng(3).standard_normal((8, 4, 4, 3))).astype("float32")
strategy = tf.distribute.MirroredStrategy([c.name for c in cpus])
with strategy.scope():
    layer = SyncBatchNormalization(momentum=0.0)
    layer.build(x.shape)
ds = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(x).batch(8))
strategy.run(lambda b: layer(b, training=True), args=(next(iter(ds)),))
np.testing.assert_allclose(layer.moving_mean.numpy(), x.mean(axis=(0, 1, 2)), rtol=1e-5)
np.testing.assert_allclose(layer.moving_variance.numpy(), x.var(axis=(0, 1, 2)), rtol=1e-4)
print("OK")
"""


def test_two_replicas_give_the_global_batch_moments():
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _TWO_REPLICAS], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
