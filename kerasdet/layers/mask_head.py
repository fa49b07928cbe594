"""Mask R-CNN's mask branch: the FCN head, its RoI targets and its loss.

He, Gkioxari, Dollár and Girshick, "Mask R-CNN", ICCV 2017:

* §3, "Mask Representation" and Fig. 4 (right, the FPN head): on 14x14 RoIAligned
  features, four 3x3 convs of 256 channels (+ReLU), a 2x2 stride-2 deconvolution (+ReLU)
  to 28x28 and a 1x1 conv to ``K`` mask logits, one m x m mask per class
  (``class_agnostic=True``: one mask, the paper's §4.2 ablation "class-agnostic masks").
* §3 (the multi-task loss ``L = L_cls + L_box + L_mask``): ``L_mask`` is the average
  binary cross-entropy of per-pixel sigmoids and, for an RoI of ground-truth class k, only
  the k-th mask contributes; §3.1 "Training": it is defined on positive RoIs only.
  :func:`mask_loss` sums it over the positive RoIs and divides by their number summed
  over replicas (:func:`kerasdet.losses.global_normalizer`), so the update is the same on
  1 or N replicas and a batch without positives has zero loss.
* §3.1 "Training": the mask target is the intersection of an RoI and its associated
  ground-truth mask. :func:`mask_targets` resamples the matched instance mask over each
  RoI to m x m (bilinear, pixel-centre sampling of
  :func:`~kerasdet.layers.windows.crop_windows`: the inverse of the inference paste
  :func:`~kerasdet.layers.windows.paste_masks`) and binarizes it at 0.5 (Detectron's
  rule; the paper does not state one).

Graph code batched over images and RoIs (one ``crop_and_resize`` call, no loops).
"""
import keras
import tensorflow as tf

from kerasdet import losses as loss_ops
from kerasdet.layers.windows import crop_windows


@keras.saving.register_keras_serializable(package="kerasdet")
class MaskHead(keras.layers.Layer):
    """Mask R-CNN FPN mask head (Fig. 4 right): ``num_convs`` x (3x3 conv ``channels``,
    ReLU) -> 2x2 stride-2 deconv ``channels`` (ReLU) -> 1x1 conv to ``num_classes`` mask
    logits (1 with ``class_agnostic``).

    Input RoI features ``[N, P, P, C]`` or ``[B, R, P, P, C]`` (P = ``roi_output_size``,
    14 in the paper); output logits ``[N, 2P, 2P, K]`` or ``[B, R, 2P, 2P, K]``.

    Args:
        num_classes: K object classes (no background mask).
        num_convs: 3x3 convs before the deconvolution. Default 4.
        channels: width of the convs and the deconvolution. Default 256.
        class_agnostic: one mask for every class instead of K. Default False.
        roi_output_size: the RoIAlign size the head is run on (the model builds its mask
            RoIAlign with it). Default 14.

    Initialization: He-normal convs and deconvolution (Detectron's MSRAFill), the
    predictor N(0, 0.001) (Detectron's GaussianFill), zero biases.
    """

    def __init__(self, *, num_classes, num_convs=4, channels=256, class_agnostic=False, roi_output_size=14,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.num_convs = int(num_convs)
        self.channels = int(channels)
        self.class_agnostic = bool(class_agnostic)
        self.roi_output_size = int(roi_output_size)
        self.convs = [
            keras.layers.Conv2D(self.channels, 3, padding="same", activation="relu", kernel_initializer="he_normal",
                                dtype=self.dtype_policy, name=f"mask_conv{i + 1}")
            for i in range(self.num_convs)
        ]
        self.deconv = keras.layers.Conv2DTranspose(self.channels, 2, strides=2, activation="relu",
                                                   kernel_initializer="he_normal", dtype=self.dtype_policy,
                                                   name="mask_deconv")
        self.predictor = keras.layers.Conv2D(self.num_masks, 1, kernel_initializer=keras.initializers.RandomNormal(
            stddev=0.001), dtype=self.dtype_policy, name="mask_logits")

    @property
    def num_masks(self):
        """Mask channels: 1 when class-agnostic, else ``num_classes``."""
        return 1 if self.class_agnostic else self.num_classes

    def build(self, input_shape):
        shape = (None, *tuple(input_shape)[-3:])
        for conv in self.convs:
            conv.build(shape)
            shape = (*shape[:3], self.channels)
        self.deconv.build(shape)
        side = None if shape[1] is None else 2 * shape[1]
        self.predictor.build((None, side, side, self.channels))
        self.built = True

    def call(self, roi_features):
        x = roi_features
        rank5 = x.shape.rank == 5
        if rank5:
            outer = tf.shape(x)[:2]
            x = tf.reshape(x, tf.concat([[-1], tf.shape(x)[2:]], 0))
            x.set_shape([None, *roi_features.shape[2:]])
        for conv in self.convs:
            x = conv(x)
        x = self.predictor(self.deconv(x))
        if rank5:
            x = tf.reshape(x, tf.concat([outer, tf.shape(x)[1:]], 0))
        return x

    def get_config(self):
        config = super().get_config()
        config.update({"num_classes": self.num_classes, "num_convs": self.num_convs, "channels": self.channels,
                       "class_agnostic": self.class_agnostic, "roi_output_size": self.roi_output_size})
        return config


def mask_targets(gt_masks, rois, matched, *, size=28, threshold=0.5, backend="crop_and_resize"):
    """Mask targets ``[B, R, size, size]`` (0/1 float32) of Mask R-CNN §3.1 "Training".

    Args:
        gt_masks: ``[B, N, H, W]`` instance masks (0/1, any dtype) on the network input,
            row ``j`` the mask of ground-truth box ``j``.
        rois: ``[B, R, 4]`` yxyx RoIs in input pixels (edges).
        matched: ``[B, R]`` int32 row of ``gt_masks`` each RoI is matched to
            (``sample_rois``' ``"matched"``).
        size: m, the target side (28 in the paper).
        threshold: binarization of the bilinearly resampled mask (``>= threshold``).
            Default 0.5.
        backend: :func:`~kerasdet.layers.windows.crop_windows`' ``backend``
            (``"matmul"`` compiles with XLA). Default ``"crop_and_resize"``.

    Each target pixel samples the matched mask at its centre inside the RoI (bilinear,
    :func:`~kerasdet.layers.windows.crop_windows`, zero outside the image). Targets are
    constants for the gradient.
    """
    shape = tf.shape(gt_masks)
    batch, num = shape[0], shape[1]
    flat_masks = tf.reshape(tf.cast(gt_masks, tf.float32), tf.stack([-1, shape[2], shape[3], 1]))
    matched = tf.clip_by_value(tf.cast(matched, tf.int32), 0, tf.maximum(num - 1, 0))
    box_index = tf.reshape(matched + num * tf.range(batch)[:, None], [-1])
    crops = crop_windows(flat_masks, tf.reshape(tf.cast(rois, tf.float32), [-1, 4]), box_index, int(size),
                         backend=backend)[..., 0]
    out = tf.shape(rois)
    targets = tf.reshape(tf.cast(crops >= threshold, tf.float32), tf.stack([out[0], out[1], size, size]))
    return tf.stop_gradient(targets)


def select_class_masks(logits, classes):
    """The mask channel of each RoI's class: ``logits`` ``[B, R, m, m, K]`` (or ``K = 1``,
    class-agnostic: that channel), ``classes`` ``[B, R]`` int32 0-based (negatives are
    clamped to 0) -> ``[B, R, m, m]``."""
    if logits.shape[-1] == 1:
        return logits[..., 0]
    channels = tf.transpose(logits, [0, 1, 4, 2, 3])  # [B, R, K, m, m]
    index = tf.clip_by_value(tf.cast(classes, tf.int32), 0, tf.shape(logits)[-1] - 1)
    return tf.gather(channels, index, batch_dims=2)


def mask_loss(logits, targets, classes, positive):
    """``L_mask`` (Mask R-CNN §3 and §3.1 "Training"): per-pixel sigmoid cross-entropy of
    the ground-truth class's mask, averaged over the m x m pixels of each positive RoI,
    summed over positive RoIs and divided by their number summed over replicas
    (:func:`kerasdet.losses.global_normalizer`; 0, not NaN, without positives).

    Args:
        logits: ``[B, R, m, m, K]`` mask logits (``K = 1``: class-agnostic).
        targets: ``[B, R, m, m]`` 0/1 (:func:`mask_targets`).
        classes: ``[B, R]`` int32 0-based ground-truth class of each RoI.
        positive: ``[B, R]`` bool foreground RoIs; the others do not contribute.
    """
    own = tf.cast(select_class_masks(logits, classes), tf.float32)
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(targets, tf.float32), logits=own)
    per_roi = tf.reduce_mean(ce, axis=[2, 3])
    weight = tf.cast(positive, tf.float32)
    # where(): a non-finite logit of a negative RoI must not leak into the sum as 0 * inf
    total = tf.reduce_sum(tf.where(weight > 0, per_roi, 0.0))
    return total / loss_ops.global_normalizer(tf.reduce_sum(weight))
