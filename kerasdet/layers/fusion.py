"""ASSD's semantic fusion of conv3 with upsampled conv4 and conv5 (Yi et al. 2019 §3.2, Eq. 3).

Paper: ``x3' = W3 . Concat{x3, up(x4), up(x5)} + b3`` with bilinear upsampling to conv3's
size. The paper reuses ``C'`` ambiguously for the widths; we follow the authors' released code
(``github.com/yijingru/ASSD-Pytorch``):

    f_l   = Conv1x1(reduced_channels, bias)(x_l)           for l = 3, 4, 5
    f_4,5 = bilinear resize to x3's size, align_corners=True (PyTorch's upsample_bilinear)
    out   = ReLU(Conv1x1(output_channels, bias)(BN(concat[f3, f4, f5])))    (BN before the conv)

With ``align_corners=True`` the 33 -> 65 and 17 -> 65 grids of ASSD513 line up exactly
(output pixel ``2i`` is input pixel ``i``). ``align_corners=False`` gives TF's half-pixel
resize instead. The fused map replaces conv3 only as a detection source; the backbone keeps
running from the raw conv3.
"""
import keras
import tensorflow as tf


def resize_bilinear(x, size, *, align_corners=True):
    """Bilinear resize of ``[B, h, w, C]`` to ``size`` (``(H, W)``, may be tensors)."""
    if align_corners:
        return tf.compat.v1.image.resize_bilinear(x, size, align_corners=True, half_pixel_centers=False)
    return tf.image.resize(x, size, method="bilinear")


@keras.saving.register_keras_serializable(package="kerasdet")
class SemanticFusion(keras.layers.Layer):
    """Fuses ``[x3, x4, x5]`` (finest first) into one map at ``x3``'s resolution.

    Args:
        reduced_channels: width of each 1x1 reduction. Default 256 (authors' code).
        output_channels: width of the fused map. Default ``None``: ``x3``'s channels (512
            for ResNet-101 conv3).
        align_corners: upsampling convention (see the module docstring). Default True.
        batchnorm_momentum: of the BN on the concatenation. Default 0.99 (Keras').
    """

    def __init__(self, *, reduced_channels=256, output_channels=None, align_corners=True,
                 batchnorm_momentum=0.99, **kwargs):
        super().__init__(**kwargs)
        self.reduced_channels = int(reduced_channels)
        self.output_channels = None if output_channels is None else int(output_channels)
        self.align_corners = bool(align_corners)
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
            parts.append(tf.cast(resize_bilinear(conv(x), size, align_corners=self.align_corners), parts[0].dtype))
        return self.fuse(self.norm(tf.concat(parts, axis=-1), training=training))

    def compute_output_shape(self, input_shape):
        return (*input_shape[0][:-1], self.output_channels or input_shape[0][-1])

    def get_config(self):
        config = super().get_config()
        config.update(
            reduced_channels=self.reduced_channels,
            output_channels=self.output_channels,
            align_corners=self.align_corners,
            batchnorm_momentum=self.batchnorm_momentum,
        )
        return config
