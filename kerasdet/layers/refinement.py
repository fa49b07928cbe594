"""SharpMask's top-down refinement module R^i (T.-Y. Lin, "Detecting Common Objects in
Context", Cornell 2017 thesis, ch. 3 "SharpMask", §3.3.2,
Fig. 3.1d; channel schedules and the two-conv skip path of §3.5.2).

``M^{i+1} = R^i(M^i, F^i)``: the mask encoding ``M^i`` (``k_m^i`` channels) and the trunk's
features ``F^i`` at the same resolution ("the last convolutional layer prior to
pooling") give a mask encoding of twice the resolution:

* skip path ``S^i``: two 3x3 convs + ReLU, ``F^i -> 64 -> k_s^i`` (§3.5.2: "a sequence of
  two 3x3 convolutions ... reducing F^i to 64 channels first followed by a further
  reduction to k_s^i channels"; a single conv "encounters learning difficulties");
* ``concat(M^i, S^i)`` (``k_m^i + k_s^i`` channels) -> 3x3 conv + ReLU -> ``k_m^{i+1}``
  channels (§3.3.2; Fig. 3.7b's refactoring into two convs and an addition is the same
  function and is not used here);
* x2 upsampling: ``"bilinear"`` (default; §3.3.2 "bilinear upsampling by a factor of 2")
  or ``"nearest"`` (what the released SharpMask code does).

Every 3x3 conv is padded by :class:`~kerasdet.layers.padding.MirrorPadding2D` (§3.5's
reflective padding; ``padding="zeros"`` gives ordinary "same" convs).

Parameters of one module (``k_f`` = channels of ``F^i``): ``9 k_f 64 + 64`` + ``9 * 64 k_s
+ k_s`` + ``9 (k_m + k_s) k_m' + k_m'``.
"""
import keras

from kerasdet.layers.padding import MirrorPadding2D

UPSAMPLING = ("bilinear", "nearest")


def refinement_schedule(k=32, num_modules=4, *, schedule="halving"):
    """``[(k_m^i, k_s^i, k_m^{i+1}) for i = 1..num_modules]`` of a channel schedule (§3.5.2).

    ``"halving"`` is schedule (b), ``k_m^i = k_s^i = k / 2^{i-1}`` (the thesis' choice
    with ``k = 32``: 32, 16, 8, 4 and a 2-channel ``M^5``); ``"constant"`` is schedule
    (a), ``k_m^i = k_s^i = k``.
    """
    if schedule == "halving":
        if k % 2 ** num_modules:
            raise ValueError(f"schedule (b) needs k divisible by 2^{num_modules}, got k={k}")
        widths = [k // 2 ** i for i in range(num_modules + 1)]
    elif schedule == "constant":
        widths = [k] * (num_modules + 1)
    else:
        raise ValueError(f"schedule must be 'halving' or 'constant', got {schedule!r}")
    return [(widths[i], widths[i], widths[i + 1]) for i in range(num_modules)]


@keras.saving.register_keras_serializable(package="kerasdet")
class RefinementModule(keras.layers.Layer):
    """One refinement module ``R^i``: ``call([mask, features])`` -> ``[B, 2H, 2W, mask_channels]``.

    Args:
        mask_channels: ``k_m^{i+1}``, channels of the output encoding.
        skip_channels: ``k_s^i``, channels of the skip features ``S^i``.
        skip_hidden: channels of the skip path's first conv (default 64, §3.5.2).
        upsampling: ``"bilinear"`` (default, thesis) or ``"nearest"`` (released code).
        padding: ``"symmetric"`` (default), ``"reflect"`` or ``"zeros"``, see
            :mod:`kerasdet.layers.padding`.
        kernel_initializer: of the three convs (default ``"he_uniform"``; the thesis
            initializes new layers "randomly from a uniform distribution", §3.3.3).
    """

    def __init__(self, *, mask_channels, skip_channels, skip_hidden=64, upsampling="bilinear", padding="symmetric",
                 kernel_initializer="he_uniform", **kwargs):
        super().__init__(**kwargs)
        if upsampling not in UPSAMPLING:
            raise ValueError(f"upsampling must be one of {UPSAMPLING}, got {upsampling!r}")
        self.mask_channels = int(mask_channels)
        self.skip_channels = int(skip_channels)
        self.skip_hidden = int(skip_hidden)
        self.upsampling = upsampling
        self.padding = padding
        self.kernel_initializer = kernel_initializer
        self.pad = MirrorPadding2D(padding=1, mode=padding, name="pad")

        def conv(filters, name):
            return keras.layers.Conv2D(filters, 3, padding="valid", activation="relu",
                                       kernel_initializer=kernel_initializer, name=name)

        self.skip_conv1 = conv(self.skip_hidden, "skip_conv1")
        self.skip_conv2 = conv(self.skip_channels, "skip_conv2")
        self.merge_conv = conv(self.mask_channels, "merge_conv")
        self.upsample = keras.layers.UpSampling2D(2, interpolation=upsampling, name="upsample")

    def build(self, input_shape):
        mask_shape, feature_shape = input_shape
        self.skip_conv1.build((None, None, None, feature_shape[-1]))
        self.skip_conv2.build((None, None, None, self.skip_hidden))
        self.merge_conv.build((None, None, None, mask_shape[-1] + self.skip_channels))
        self.built = True

    def skip_features(self, features):
        """``S^i``: the skip path alone (shared by all windows in full-image inference)."""
        return self.skip_conv2(self.pad(self.skip_conv1(self.pad(features))))

    def merge(self, mask, skip):
        """The window-dependent part: concat, 3x3 conv + ReLU, x2 upsampling."""
        x = keras.ops.concatenate([mask, keras.ops.cast(skip, mask.dtype)], axis=-1)
        return self.upsample(self.merge_conv(self.pad(x)))

    def call(self, inputs):
        mask, features = inputs
        return self.merge(mask, self.skip_features(features))

    def compute_output_shape(self, input_shape):
        mask_shape = input_shape[0]
        double = lambda n: None if n is None else 2 * n  # noqa: E731
        return (mask_shape[0], double(mask_shape[1]), double(mask_shape[2]), self.mask_channels)

    def get_config(self):
        config = super().get_config()
        config.update(mask_channels=self.mask_channels, skip_channels=self.skip_channels,
                      skip_hidden=self.skip_hidden, upsampling=self.upsampling, padding=self.padding,
                      kernel_initializer=self.kernel_initializer)
        return config
