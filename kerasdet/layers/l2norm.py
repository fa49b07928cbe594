"""Channel-wise L2 normalization with a learned per-channel scale (ParseNet; SSD's conv4_3).

SSD normalizes VGG's conv4_3 source, whose activations are far larger than the deeper
sources': ``y = gamma * x / ||x||_2`` over the channels at every position, with ``gamma``
(one per channel) initialised to 20 (Liu et al. 2016 §3.1).
"""
import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="kerasdet")
class L2Normalization(keras.layers.Layer):
    """``gamma * x / max(||x||_2, epsilon)`` over the last axis.

    Args:
        scale: initial value of every ``gamma``. Default 20.0 (SSD).
        epsilon: floor of the norm. Default 1e-10.
    """

    def __init__(self, *, scale=20.0, epsilon=1e-10, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        self.gamma = self.add_weight(
            name="gamma", shape=(input_shape[-1],), initializer=keras.initializers.Constant(self.scale)
        )
        self.built = True

    def call(self, x):
        x32 = tf.cast(x, tf.float32)
        norm = tf.sqrt(tf.maximum(tf.reduce_sum(tf.square(x32), axis=-1, keepdims=True), self.epsilon**2))
        return tf.cast(x32 / norm * tf.cast(self.gamma, tf.float32), x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(scale=self.scale, epsilon=self.epsilon)
        return config
