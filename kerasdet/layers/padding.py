"""Mirror padding of feature maps (SharpMask's "reflective padding").

Lin's thesis (ch. 3 "SharpMask", §3.5) found that deep (ResNet) trunks trained on patches
and run convolutionally over images need "reflective-padding instead of 0-padding at
every convolutional layer". The released DeepMask/SharpMask code implements it as
Matlab's ``padarray(..., 'symmetric')`` (``cba|abcd``, the edge repeated); TensorFlow's
``"REFLECT"`` is ``dcb|abcd``. Both are offered; ``"symmetric"`` is the default here (the
released code's reading of the thesis' word).
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
