"""ASSD's semantic fusion of conv3 with upsampled conv4 and conv5 (Yi et al. 2019 §3.2, Eq. 3).

Paper: ``x3' = W3 . Concat{x3, up(x4), up(x5)} + b3`` with bilinear upsampling to conv3's
size. The paper reuses ``C'`` ambiguously for the widths; we follow the authors' released code
(``github.com/yijingru/ASSD-Pytorch``):

    f_l   = Conv1x1(reduced_channels, bias)(x_l)           for l = 3, 4, 5
    f_4,5 = bilinear resize to x3's size, align_corners=True (PyTorch's upsample_bilinear)
    out   = ReLU(Conv1x1(output_channels, bias)(BN(concat[f3, f4, f5])))    (BN before the conv)

**Grid alignment** (``alignment``; the paper says only "bilinear"). Upsampling is exact only
when it maps each fine cell's centre to the same image point on the coarse grid, which
depends on how the backbone places its cells. With cell ``i`` of a stride-``s`` map centred
at image pixel ``s*i + o_s``, the fine cell ``j`` (stride ``s/r``) reads the coarse map at
``u = (j + c) / r - c``:

* ``"corners"`` (``c = 0``, cells at ``s*i``: symmetric zero padding, the keras.applications /
  torchvision ResNets; with odd ``2^k + 1`` sizes, 65 / 33 / 17 at 513 px, this is
  ``align_corners=True``, the authors' ``upsample_bilinear``): ``r = (out - 1) / (in - 1)``.
* ``"half_pixel"`` (``c = 1/2``, cells centred on their ``s x s`` block: pooling, TF's
  ``tf.image.resize``): ``r = out / in``.
* ``"same_padding"`` (``c = 1``, cells at ``s*i + s - 1``: a chain of TF ``padding="same"``
  stride-2 3x3 convs on even sizes, which pad only bottom/right, as kerasdet's small
  backbone): ``r = out / in``.

On the digits' 16 / 8 / 4 grids (128 px, small backbone; its cells measured at ``s*i + s - 1``
by their gradient centroid) ``align_corners=True`` read C5 up to 19.2 px (0.6 of a C5 cell)
away from the C3 cell's image point, on 15-45 px digits; ``half_pixel`` there is 12 px off
everywhere (tests/layers/test_fusion.py). ``"corners"`` stays the layer default (the authors' code, exact for
the paper's ResNet sizes); :class:`kerasdet.models.ssd.SSD` picks the backbone's convention.
Values beyond the coarse grid's edge take the edge cell (clamped, as both TF resizes).

The fused map replaces conv3 only as a detection source; the backbone keeps running from
the raw conv3.
"""
import keras
import tensorflow as tf


ALIGNMENTS = ("corners", "half_pixel", "same_padding")
_CENTRE = {"corners": 0.0, "half_pixel": 0.5, "same_padding": 1.0}


def source_coordinates(out_size, in_size, alignment):
    """Where each of ``out_size`` fine cells reads the ``in_size`` coarse axis (float32
    coarse-cell units, before clamping); see the module docstring for ``alignment``."""
    if alignment not in _CENTRE:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}.")
    out_f = tf.cast(out_size, tf.float32)
    in_f = tf.cast(in_size, tf.float32)
    if alignment == "corners":
        step = tf.math.divide_no_nan(in_f - 1.0, out_f - 1.0)  # 1 / r
    else:
        step = in_f / out_f
    c = _CENTRE[alignment]
    return (tf.range(out_f) + c) * step - c


def _linear_axis(x, out_size, axis, alignment):
    in_size = tf.shape(x)[axis]
    u = tf.clip_by_value(source_coordinates(out_size, in_size, alignment), 0.0, tf.cast(in_size - 1, tf.float32))
    lo = tf.floor(u)
    w = u - lo
    lo = tf.cast(lo, tf.int32)
    hi = tf.minimum(lo + 1, in_size - 1)
    shape = [1, 1, 1, 1]
    shape[axis] = -1
    w = tf.reshape(tf.cast(w, x.dtype), shape)
    return tf.gather(x, lo, axis=axis) * (1 - w) + tf.gather(x, hi, axis=axis) * w


def resize_bilinear(x, size, *, alignment="corners"):
    """Bilinear resize of ``[B, h, w, C]`` to ``size`` (``(H, W)``, may be tensors) on the
    grid convention ``alignment`` (``"corners"`` = ``align_corners=True``, ``"half_pixel"``
    = ``tf.image.resize``, ``"same_padding"``; module docstring). Separable: two gathers
    and a lerp per axis."""
    x = _linear_axis(x, size[0], 1, alignment)
    return _linear_axis(x, size[1], 2, alignment)


@keras.saving.register_keras_serializable(package="kerasdet")
class SemanticFusion(keras.layers.Layer):
    """Fuses ``[x3, x4, x5]`` (finest first) into one map at ``x3``'s resolution.

    Args:
        reduced_channels: width of each 1x1 reduction. Default 256 (authors' code).
        output_channels: width of the fused map. Default ``None``: ``x3``'s channels (512
            for ResNet-101 conv3).
        alignment: the grid convention of the upsampling, ``"corners"`` (default, the
            authors' ``align_corners=True``), ``"half_pixel"`` or ``"same_padding"`` (see
            the module docstring). The former ``align_corners=True/False`` is accepted as
            ``"corners"`` / ``"half_pixel"``.
        batchnorm_momentum: of the BN on the concatenation. Default 0.99 (Keras').
    """

    def __init__(self, *, reduced_channels=256, output_channels=None, alignment="corners",
                 batchnorm_momentum=0.99, align_corners=None, **kwargs):
        super().__init__(**kwargs)
        if align_corners is not None:  # configs saved before `alignment`
            alignment = "corners" if align_corners else "half_pixel"
        if alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}.")
        self.alignment = alignment
        self.reduced_channels = int(reduced_channels)
        self.output_channels = None if output_channels is None else int(output_channels)
        self.batchnorm_momentum = float(batchnorm_momentum)

    def build(self, input_shape):
        if len(input_shape) < 2:
            raise ValueError(f"SemanticFusion needs at least two feature maps, got {len(input_shape)}.")
        out = self.output_channels or input_shape[0][-1]
        self.reduce = []
        for i, shape in enumerate(input_shape):
            conv = keras.layers.Conv2D(self.reduced_channels, 1, dtype=self.dtype_policy, name=f"reduce{i}")
            conv.build(shape)
            self.reduce.append(conv)
        concat_shape = (*input_shape[0][:-1], self.reduced_channels * len(input_shape))
        self.norm = keras.layers.BatchNormalization(momentum=self.batchnorm_momentum, dtype=self.dtype_policy, name="norm")
        self.norm.build(concat_shape)
        self.fuse = keras.layers.Conv2D(out, 1, activation="relu", dtype=self.dtype_policy, name="fuse")
        self.fuse.build(concat_shape)
        self.built = True

    def call(self, features, training=False):
        size = tf.shape(features[0])[1:3]
        parts = [self.reduce[0](features[0])]
        for conv, x in zip(self.reduce[1:], features[1:]):
            parts.append(tf.cast(resize_bilinear(conv(x), size, alignment=self.alignment), parts[0].dtype))
        return self.fuse(self.norm(tf.concat(parts, axis=-1), training=training))

    def compute_output_shape(self, input_shape):
        return (*input_shape[0][:-1], self.output_channels or input_shape[0][-1])

    def get_config(self):
        config = super().get_config()
        config.update(
            reduced_channels=self.reduced_channels,
            output_channels=self.output_channels,
            alignment=self.alignment,
            batchnorm_momentum=self.batchnorm_momentum,
        )
        return config
