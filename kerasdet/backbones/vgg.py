"""VGG-16 feature backbone (``keras.applications.VGG16`` layout), for the SSD family.

Outputs a dict keyed by the keras.applications layer names. Strides and channels of the
layers that can be requested (``VGG16_LAYERS``):

=================  ======  ========
layer              stride  channels
=================  ======  ========
``block1_conv2``        1        64
``block2_conv2``        2       128
``block3_conv3``        4       256
``block4_conv3``        8       512   (SSD's conv4_3)
``block5_conv3``       16       512   (SSD puts pool5 3x3/s1 + dilated fc6/fc7 on top)
=================  ======  ========

Default outputs: ``block4_conv3`` and ``block5_conv3``. Layers after the last requested
output are not built (``block5_pool`` never is).

Notes:

* Keras' max-pooling floors odd sizes where Caffe's SSD used ``ceil_mode``: a 300x300
  input gives a 37x37 ``block4_conv3`` (Caffe: 38x38). Use input sizes divisible by 16
  (e.g. 304 or 512) for exact ``size / stride`` maps.
* Preprocessing is inside the model (:class:`~kerasdet.backbones.resnet.CaffePreprocess`,
  RGB->BGR minus the ImageNet mean), identical to ``keras.applications.vgg16.
  preprocess_input``: feed RGB pixels in 0..255.
* VGG has no BatchNormalization; all layers are trainable.
* ``weights`` is ``None`` or a local keras.applications VGG16 file (with or without
  top); ``"imagenet"`` raises: nothing is downloaded.
"""
from __future__ import annotations

import keras

from kerasdet.backbones.resnet import (
    CaffePreprocess,
    _check_input_shape,
    check_weights_path,
    load_local_weights,
)

VGG16_LAYERS = {
    "block1_conv2": (1, 64),
    "block2_conv2": (2, 128),
    "block3_conv3": (4, 256),
    "block4_conv3": (8, 512),
    "block5_conv3": (16, 512),
}
"""Requestable output layer -> (stride, channels)."""


def vgg16_backbone(
    *,
    weights=None,
    input_shape=(None, None, 3),
    output_layers=("block4_conv3", "block5_conv3"),
    name=None,
):
    """Builds a VGG-16 backbone returning ``{layer_name: feature map}``.

    Args:
        weights: ``None`` (random init) or the path of a local keras.applications VGG16
            weight file (``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5``, a with-top
            file, or a Keras 3 ``.weights.h5``).
        input_shape: ``(H, W, 3)``; H, W may be ``None``.
        output_layers: names from ``VGG16_LAYERS`` (default ``block4_conv3``, stride 8 and
            ``block5_conv3``, stride 16).
        name: model name (default ``"vgg16_backbone"``).

    Returns:
        A functional ``keras.Model``: float32 RGB 0..255 images -> dict of feature maps.
    """
    input_shape = _check_input_shape(input_shape, "VGG-16")
    output_layers = tuple(output_layers)
    unknown = [n for n in output_layers if n not in VGG16_LAYERS]
    if unknown or not output_layers:
        raise ValueError(
            f"VGG-16 backbone: output_layers must be a non-empty subset of "
            f"{list(VGG16_LAYERS)}; got {list(output_layers)}"
        )
    path = check_weights_path(
        weights, family="VGG-16",
        imagenet_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    )
    images = keras.Input(shape=input_shape, dtype="float32", name="images")
    x = CaffePreprocess(name="caffe_preprocess")(images)
    base = keras.applications.VGG16(
        include_top=False, weights=None, input_tensor=x, input_shape=input_shape
    )
    outputs = {layer: base.get_layer(layer).output for layer in output_layers}
    model = keras.Model(images, outputs, name=name or "vgg16_backbone")
    if path is not None:
        load_local_weights(
            model,
            path,
            reference_builder=lambda include_top: keras.applications.VGG16(
                include_top=include_top, weights=None,
                input_shape=(224, 224, 3) if include_top else (None, None, 3),
            ),
            family="VGG-16",
        )
    return model
