"""Mirror padding of feature maps (SharpMask's "reflective padding").

T.-Y. Lin's thesis ("Detecting Common Objects in Context", Cornell 2017, ch. 3 "SharpMask",
§3.5) found that deep (ResNet) trunks trained on patches
and run convolutionally over images need "reflective-padding instead of 0-padding at
every convolutional layer". The released DeepMask/SharpMask code implements it as
Matlab's ``padarray(..., 'symmetric')`` (``cba|abcd``, the edge repeated); TensorFlow's
``"REFLECT"`` is ``dcb|abcd``. Both are offered; ``"symmetric"`` is the default here (the
released code's reading of the thesis' word).

:class:`MirrorConv2D` is a ``Conv2D`` whose ``"same"`` padding is mirror padding (same
output size, weights and names as the ``Conv2D`` it replaces), and :func:`mirror_padded`
rebuilds a functional model (a backbone) with every ``"same"`` convolution larger than 1x1
and every symmetric ``ZeroPadding2D`` mirror-padded, weights and trainable flags kept.
"""
import keras
import tensorflow as tf

PAD_MODES = ("symmetric", "reflect", "zeros")


@keras.saving.register_keras_serializable(package="kerasdet")
class MirrorPadding2D(keras.layers.Layer):
    """Pads ``[B, H, W, C]`` by ``padding`` pixels on every side.

    Args:
        padding: pixels per side (default 1, what a 3x3 convolution needs).
        mode: ``"symmetric"`` (default, ``cba|abcd``), ``"reflect"`` (``dcb|abcd``; needs
            ``H, W > padding``) or ``"zeros"``.
    """

    def __init__(self, *, padding=1, mode="symmetric", **kwargs):
        super().__init__(**kwargs)
        if mode not in PAD_MODES:
            raise ValueError(f"mode must be one of {PAD_MODES}, got {mode!r}")
        self.padding = int(padding)
        self.mode = mode

    def call(self, x):
        p = self.padding
        paddings = [[0, 0], [p, p], [p, p], [0, 0]]
        return tf.pad(x, paddings, mode="CONSTANT" if self.mode == "zeros" else self.mode.upper())

    def compute_output_shape(self, input_shape):
        grow = lambda n: None if n is None else n + 2 * self.padding  # noqa: E731
        return (input_shape[0], grow(input_shape[1]), grow(input_shape[2]), input_shape[3])

    def get_config(self):
        config = super().get_config()
        config.update(padding=self.padding, mode=self.mode)
        return config


def _same_padding(size, kernel, stride, dilation):
    """TensorFlow's ``"same"`` padding ``(before, after)`` of one axis (``size`` a tensor)."""
    extent = (kernel - 1) * dilation + 1
    out = (size + stride - 1) // stride
    total = tf.maximum((out - 1) * stride + extent - size, 0)
    return total // 2, total - total // 2


@keras.saving.register_keras_serializable(package="kerasdet")
class MirrorConv2D(keras.layers.Conv2D):
    """``Conv2D`` with ``padding="same"`` done by mirror padding (``pad_mode``:
    ``"symmetric"`` default, or ``"reflect"``) then a ``"valid"`` convolution; the pad
    amounts are TensorFlow's ``"same"`` ones (asymmetric for even sizes and strides > 1),
    so output shapes equal the zero-padded ``Conv2D``'s. Any other ``padding`` behaves as
    ``Conv2D``. Channels-last only."""

    def __init__(self, *args, pad_mode="symmetric", **kwargs):
        super().__init__(*args, **kwargs)
        if pad_mode not in ("symmetric", "reflect"):
            raise ValueError(f"pad_mode must be 'symmetric' or 'reflect', got {pad_mode!r}")
        self.pad_mode = pad_mode

    def convolution_op(self, inputs, kernel):
        """Mirror padding then the ``"valid"`` convolution (in ``convolution_op``, so code
        that calls it with another kernel, e.g. BN folding, keeps the padding)."""
        if self.padding != "same":
            return super().convolution_op(inputs, kernel)
        shape = tf.shape(inputs)
        pads = [[0, 0]]
        for axis in (0, 1):
            before, after = _same_padding(shape[1 + axis], self.kernel_size[axis], self.strides[axis],
                                          self.dilation_rate[axis])
            pads.append([before, after])
        pads.append([0, 0])
        x = tf.pad(inputs, pads, mode=self.pad_mode.upper())
        return keras.ops.conv(x, kernel, strides=list(self.strides), padding="valid",
                              dilation_rate=self.dilation_rate, data_format=self.data_format)

    def get_config(self):
        config = super().get_config()
        config["pad_mode"] = self.pad_mode
        return config


def mirror_padded(model, *, mode="symmetric"):
    """``model`` (functional) with mirror padding: every ``Conv2D`` with ``padding="same"``
    and a kernel larger than 1x1 becomes a :class:`MirrorConv2D`, every ``ZeroPadding2D``
    with equal padding on all sides a :class:`MirrorPadding2D`; weights, names and
    ``trainable`` flags are kept. Returns ``model`` itself when there is nothing to change
    (e.g. a model already converted)."""

    def convertible(layer):
        if type(layer) is keras.layers.Conv2D:
            return layer.padding == "same" and max(layer.kernel_size) > 1
        if type(layer) is keras.layers.ZeroPadding2D:
            (top, bottom), (left, right) = layer.padding
            return top == bottom == left == right
        return False

    if not any(convertible(layer) for layer in model.layers):
        return model

    def clone(layer):
        config = layer.get_config()
        if convertible(layer) and isinstance(layer, keras.layers.Conv2D):
            return MirrorConv2D(pad_mode=mode, **config)
        if convertible(layer):
            return MirrorPadding2D(padding=layer.padding[0][0], mode=mode, name=layer.name,
                                   trainable=layer.trainable)
        return layer.__class__.from_config(config)

    converted = keras.models.clone_model(model, clone_function=clone)
    for source, target in zip(model.layers, converted.layers):
        if source.weights:
            target.set_weights(source.get_weights())
        target.trainable = source.trainable
    return converted
