"""RetinaNet's classification and box subnets, shared across pyramid levels (§5.4)."""
import math

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="kerasdet")
class AnchorHead(keras.layers.Layer):
    """Two towers (class, box) of ``num_convs`` x [3x3 conv, ``filters``, ReLU].

    The class tower ends in a 3x3 conv with ``num_classes * num_anchors`` outputs (sigmoid
    logits: K independent binary predictions per anchor, no background class); the box
    tower in ``4 * num_anchors`` linear outputs (class-agnostic regression). Both towers
    are applied to every level with the same weights; they share nothing with each other.

    Initialisation (§5.4.1): every conv ``N(0, 0.01)`` with zero bias, except the final
    class conv's bias ``-log((1 - pi) / pi)`` with ``pi = prior_probability``.

    Called on a list of feature maps (finest first) it returns
    ``(class_logits, box_deltas)``: lists of ``[B, H_l * W_l * A, K]`` and
    ``[B, H_l * W_l * A, 4]`` tensors in the anchor order of
    :class:`kerasdet.anchors.AnchorGenerator`.

    Args:
        num_classes: K. Required.
        num_anchors: A per location. Default 9.
        num_convs: tower depth. Default 4.
        filters: tower width. Default 256.
        prior_probability: pi of the class bias init. Default 0.01.
    """

    def __init__(self, *, num_classes, num_anchors=9, num_convs=4, filters=256, prior_probability=0.01, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.num_anchors = int(num_anchors)
        self.num_convs = int(num_convs)
        self.filters = int(filters)
        self.prior_probability = float(prior_probability)
        init = keras.initializers.RandomNormal(stddev=0.01)

        def conv(filters, name, bias_init="zeros", activation=None):
            return keras.layers.Conv2D(
                filters,
                3,
                padding="same",
                activation=activation,
                kernel_initializer=init,
                bias_initializer=bias_init,
                dtype=self.dtype_policy,
                name=name,
            )

        self.class_tower = [conv(self.filters, f"class_conv{i}", activation="relu") for i in range(self.num_convs)]
        self.box_tower = [conv(self.filters, f"box_conv{i}", activation="relu") for i in range(self.num_convs)]
        prior_bias = -math.log((1.0 - self.prior_probability) / self.prior_probability)
        self.class_out = conv(
            self.num_classes * self.num_anchors, "class_logits", keras.initializers.Constant(prior_bias)
        )
        self.box_out = conv(4 * self.num_anchors, "box_deltas")

    def build(self, input_shape):
        shape = tuple(input_shape[0])
        tower_shape = shape[:-1] + (self.filters,)
        for tower, out in ((self.class_tower, self.class_out), (self.box_tower, self.box_out)):
            in_shape = shape
            for layer in tower:
                layer.build(in_shape)
                in_shape = tower_shape
            out.build(in_shape)
        self.built = True

    def _run(self, x, tower, out, depth):
        for layer in tower:
            x = layer(x)
        x = out(x)
        batch = tf.shape(x)[0]
        return tf.reshape(x, [batch, -1, depth])

    def call(self, features):
        class_logits = [self._run(f, self.class_tower, self.class_out, self.num_classes) for f in features]
        box_deltas = [self._run(f, self.box_tower, self.box_out, 4) for f in features]
        return class_logits, box_deltas

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "num_anchors": self.num_anchors,
                "num_convs": self.num_convs,
                "filters": self.filters,
                "prior_probability": self.prior_probability,
            }
        )
        return config
