"""DeepMask / SharpMask training patches from instance masks, sampled in ``tf.data``.

The data definition is DeepMask's (Pinheiro, Collobert, Dollar, "Learning to Segment
Object Candidates", NIPS 2015, its joint-learning definition of positives and negatives
with the tolerances of its implementation details), which SharpMask keeps unchanged (T.-Y.
Lin, "Detecting Common Objects in Context", Cornell 2017 thesis, ch. 3 "SharpMask", §3.3.3,
from Pinheiro, Lin, Collobert, Dollar, "Learning to Refine Object Segments", ECCV 2016:
"We train SharpMask with an
identical data definition and loss function as the original DeepMask model"). Each
training sample is a triplet (patch, label ``y``, binary mask for positives):

* **positive** (``y = +1``): an object is *roughly centred* in the patch (its box centre
  within ``max_shift`` of the patch centre: +-16 px at a 224 px patch) and *fully
  contained* in it, at the canonical scale (its largest box side within ``2^+-1/4`` of
  ``object_size``: 128 px at a 224 px patch). The mask target is that object's mask over
  the patch; other objects in the patch are background.
* **negative** (``y = -1``): for *every* object of the image, the patch is off-centre by
  at least ``negative_shift`` (32 px at 224) or off-scale by at least ``2^+-1``
  (``negative_scale``). Patches between the two definitions are never drawn.

Sizes are given at the patch size ``patch_size`` (the region the mask covers; the
thesis' W = 160 in its paper configuration, §3.4.1, Table 3.1); their defaults scale the
224 px definition by ``patch_size / 224`` (the released DeepMask code uses
``objSz = ceil(iSz * 128 / 224)`` the same way, but +-16 px of shift at 160: pass
``max_shift=16`` for that). Distances are the larger of the vertical and horizontal
offsets (``L_inf``; the paper's "+-16 pixels" is read per coordinate, our reading).

**Context** (thesis §3.5: "training deeper model such as ResNet requires adding extra
image content (32 pixels) surrounding the training patches"): each patch is cut with
``context`` extra pixels in total, ``context / 2`` on each side (the released code's
``wSz = iSz + 32``; our reading of "32 pixels"), so patches are ``patch_size + context``
square and the mask covers the central ``patch_size`` region, at ``mask_size``. Image
content outside the image is ``fill_value`` (released code: grey 0.5, i.e. 127.5).

How patches are drawn (our choices where the papers are silent; seeded, all graph ops,
no Python loop per patch or image):

* ``patches_per_image`` patches per image, ``round(positive_fraction * P)`` of them
  positive slots (the released code alternates all-positive mask batches and 50/50 score
  batches; one mixed batch carries both losses here). A positive slot draws a non-crowd
  object uniformly, a scale offset uniformly in ``[-scale_jitter, scale_jitter]`` (log2)
  and a shift uniformly in ``[-max_shift, max_shift]^2``. An image without such an object
  fills its positive slots with negatives.
* A negative slot draws ``negative_candidates`` windows (centre uniform over the image,
  patch side ``patch_size * 2^u`` image px with ``u`` uniform in ``negative_scales``;
  the default ``(-1, 2)`` spans the inference pyramid 2^{-2..1} of thesis §4.6) and keeps
  the first that meets the negative definition against every object (crowd regions
  included); if none does, the slot is labelled 0 (ignored by the loss).
* Each patch is flipped horizontally with probability 0.5 (``flip``; released code).

Outputs of :meth:`PatchSampler.sample` (``M = B * patches_per_image``): patches float32
``[M, S, S, 3]`` (``S = patch_size + context``, 0..255 like the detection pipeline) and
a dict ``"score"`` float32 ``[M]`` (+1 / -1 / 0 ignored), ``"masks"`` float32 ``[M,
mask_size, mask_size]`` (0/1; zeros for non-positives), ``"windows"`` float32 ``[M, 4]``
(yxyx image pixels of the central region), ``"image_index"`` int32 ``[M]``, ``"object"``
int32 ``[M]`` (the positive's row in ``labels["boxes"]``, -1 otherwise), ``"flipped"``
bool ``[M]``.
"""
from __future__ import annotations

import math

import tensorflow as tf

from kerasdet.layers.windows import crop_windows

__all__ = ["PatchSampler", "patch_dataset"]


class PatchSampler:
    """Draws DeepMask training triplets from batches of images with instance masks (module doc).

    Args (sizes in pixels of the patch's central ``patch_size`` region):
        patch_size: side of the region the mask covers, the network's W (default 160,
            the thesis' W160 trunk, §3.4.1).
        context: extra image content in total around it (default 32, thesis §3.5),
            half on each side; patches are ``patch_size + context`` square.
        mask_size: side of the mask target (default ``patch_size``).
        object_size: canonical largest side of a positive (default ``patch_size * 128 /
            224``, DeepMask's 128 px at 224).
        max_shift: largest centre offset of a positive (default ``patch_size * 16 / 224``).
        scale_jitter: largest log2 scale offset of a positive (default 0.25: ``2^+-1/4``).
        negative_shift: smallest centre offset of a negative w.r.t. an object at its
            scale (default ``2 * max_shift``: 32 px at 224).
        negative_scale: smallest absolute log2 scale offset that makes any window a
            negative w.r.t. an object (default 1.0: ``2^+-1``).
        negative_scales: log2 range of a negative's ``patch_size`` side in image pixels
            relative to ``patch_size`` (default ``(-1.0, 2.0)``).
        patches_per_image: patches drawn per image (default 8).
        positive_fraction: fraction of positive slots (default 0.5).
        negative_candidates: windows tried per negative slot (default 16).
        min_object_size: objects whose largest box side is below this (image pixels) are
            never positives (default 0; the released code skips area < 100 px or sides < 5).
        flip: random horizontal flip of patch and mask (default True).
        fill_value: pixel value outside the image (default 127.5).
    """

    def __init__(self, *, patch_size=160, context=32, mask_size=None, object_size=None, max_shift=None,
                 scale_jitter=0.25, negative_shift=None, negative_scale=1.0, negative_scales=(-1.0, 2.0),
                 patches_per_image=8, positive_fraction=0.5, negative_candidates=16, min_object_size=0.0,
                 flip=True, fill_value=127.5):
        self.patch_size = int(patch_size)
        self.context = int(context)
        self.mask_size = int(mask_size or patch_size)
        self.object_size = float(object_size if object_size is not None else patch_size * 128.0 / 224.0)
        self.max_shift = float(max_shift if max_shift is not None else patch_size * 16.0 / 224.0)
        self.scale_jitter = float(scale_jitter)
        self.negative_shift = float(negative_shift if negative_shift is not None else 2.0 * self.max_shift)
        self.negative_scale = float(negative_scale)
        self.negative_scales = tuple(float(v) for v in negative_scales)
        self.patches_per_image = int(patches_per_image)
        self.positive_fraction = float(positive_fraction)
        self.negative_candidates = int(negative_candidates)
        self.min_object_size = float(min_object_size)
        self.flip = bool(flip)
        self.fill_value = float(fill_value)
        if self.patch_size < 1 or self.context < 0 or self.context % 2:
            raise ValueError(f"patch_size must be >= 1 and context an even number >= 0, got {patch_size}, {context}")
        if self.negative_shift <= self.max_shift or self.negative_scale <= self.scale_jitter:
            raise ValueError("negatives must lie outside the positive definition: need negative_shift > max_shift "
                             "and negative_scale > scale_jitter")
        if self.object_size * 2 ** self.scale_jitter / 2 + self.max_shift > self.patch_size / 2:
            raise ValueError(
                f"a positive would not be fully inside the patch: object_size * 2^scale_jitter / 2 + max_shift = "
                f"{self.object_size * 2 ** self.scale_jitter / 2 + self.max_shift:.1f} > patch_size / 2")
        if not 0.0 <= self.positive_fraction <= 1.0 or self.patches_per_image < 1 or self.negative_candidates < 1:
            raise ValueError("need patches_per_image >= 1, negative_candidates >= 1, positive_fraction in [0, 1]")
        if len(self.negative_scales) != 2 or self.negative_scales[0] > self.negative_scales[1]:
            raise ValueError(f"negative_scales must be (low, high), got {negative_scales}")

    @property
    def window_size(self):
        """Side of the patches: ``patch_size + context``."""
        return self.patch_size + self.context

    @property
    def num_positive_slots(self):
        return int(round(self.positive_fraction * self.patches_per_image))

    def classify(self, windows, boxes, valid):
        """Which definition each window meets w.r.t. the objects of its image.

        Args:
            windows: ``[M, 4]`` yxyx image pixels of central regions (square).
            boxes: ``[M, N, 4]`` the objects of each window's image; ``valid`` ``[M, N]``.
        Returns:
            ``(positive [M, N], negative [M])`` bools: window ``m`` is a positive for
            object ``n`` / a negative for all objects.
        """
        side = windows[:, 2] - windows[:, 0]
        px = self.patch_size / tf.maximum(side, 1e-6)  # patch px per image px
        cy = 0.5 * (windows[:, 0] + windows[:, 2])
        cx = 0.5 * (windows[:, 1] + windows[:, 3])
        oy = 0.5 * (boxes[..., 0] + boxes[..., 2])
        ox = 0.5 * (boxes[..., 1] + boxes[..., 3])
        largest = tf.maximum(boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1])
        offset = tf.maximum(tf.abs(oy - cy[:, None]), tf.abs(ox - cx[:, None])) * px[:, None]
        log_scale = tf.math.log(tf.maximum(largest * px[:, None], 1e-6) / self.object_size) / math.log(2.0)
        half = self.patch_size / 2.0
        inside = ((boxes[..., 0] - cy[:, None]) * px[:, None] >= -half) & \
                 ((boxes[..., 2] - cy[:, None]) * px[:, None] <= half) & \
                 ((boxes[..., 1] - cx[:, None]) * px[:, None] >= -half) & \
                 ((boxes[..., 3] - cx[:, None]) * px[:, None] <= half)
        eps = 1e-4
        positive = valid & (offset <= self.max_shift + eps) & (tf.abs(log_scale) <= self.scale_jitter + eps) & inside
        far = (offset >= self.negative_shift - eps) | (tf.abs(log_scale) >= self.negative_scale - eps)
        negative = tf.reduce_all(far | ~valid, axis=1)
        return positive, negative

    def sample(self, images, labels, seed):
        """Patches and targets of one batch (module doc). ``labels`` needs ``"boxes"``
        ``[B, N, 4]``, ``"classes"`` ``[B, N]`` (-1 padding), ``"masks"`` ``[B, N, H, W]``
        and optionally ``"is_crowd"``; ``seed`` is a stateless seed ``[2]`` int."""
        images = tf.cast(images, tf.float32)
        boxes = tf.cast(labels["boxes"], tf.float32)
        classes = labels["classes"]
        is_crowd = tf.cast(labels.get("is_crowd", tf.zeros_like(classes, tf.bool)), tf.bool)
        shape = tf.shape(images)
        batch, height, width = shape[0], tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
        num_boxes = tf.shape(boxes)[1]
        per, ps = self.patches_per_image, float(self.patch_size)
        total = batch * per
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=8)

        present = classes >= 0
        largest = tf.maximum(boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1])
        candidate = present & ~is_crowd & (largest >= tf.maximum(self.min_object_size, 1e-3))
        image_index = tf.repeat(tf.range(batch), per)
        slot = tf.tile(tf.range(per), [batch])

        # Positive slots: a uniformly drawn candidate object, jittered shift and scale.
        logits = tf.where(candidate, 0.0, -1e9)
        pick = tf.random.stateless_categorical(logits, per, seeds[0], dtype=tf.int32)  # [B, per]
        pick = tf.reshape(pick, [-1])
        has_object = tf.gather(tf.reduce_any(candidate, axis=1), image_index)
        pos_slot = (slot < self.num_positive_slots) & has_object
        obj_box = tf.gather_nd(boxes, tf.stack([image_index, pick], axis=1))
        obj_side = tf.gather_nd(largest, tf.stack([image_index, pick], axis=1))
        u = tf.random.stateless_uniform([total], seeds[1], -self.scale_jitter, self.scale_jitter)
        shift = tf.random.stateless_uniform([total, 2], seeds[2], -self.max_shift, self.max_shift)
        side = obj_side * ps / (self.object_size * tf.pow(2.0, u))  # central region, image px
        centre = tf.stack([0.5 * (obj_box[:, 0] + obj_box[:, 2]), 0.5 * (obj_box[:, 1] + obj_box[:, 3])], axis=1)
        centre = centre - shift * (side / ps)[:, None]
        pos_windows = tf.concat([centre - 0.5 * side[:, None], centre + 0.5 * side[:, None]], axis=1)

        # Negative slots: K candidate windows each, the first meeting the definition.
        k = self.negative_candidates
        v = tf.random.stateless_uniform([total, k], seeds[3], *self.negative_scales)
        nside = ps * tf.pow(2.0, v)
        ncy = tf.random.stateless_uniform([total, k], seeds[4]) * height
        ncx = tf.random.stateless_uniform([total, k], seeds[5]) * width
        cand = tf.reshape(tf.stack([ncy - nside / 2, ncx - nside / 2, ncy + nside / 2, ncx + nside / 2], axis=-1),
                          [-1, 4])
        cand_image = tf.repeat(image_index, k)
        _, cand_negative = self.classify(cand, tf.gather(boxes, cand_image), tf.gather(present, cand_image))
        cand_negative = tf.reshape(cand_negative, [total, k])
        first = tf.argmax(tf.cast(cand_negative, tf.int32), axis=1, output_type=tf.int32)
        found = tf.reduce_any(cand_negative, axis=1)
        neg_windows = tf.gather(tf.reshape(cand, [total, k, 4]), first, batch_dims=1)

        windows = tf.where(pos_slot[:, None], pos_windows, neg_windows)
        score = tf.where(pos_slot, 1.0, tf.where(found, -1.0, 0.0))
        obj = tf.where(pos_slot, pick, -1)

        # Crops: the patch with context, and the positive's mask over the central region.
        margin = (windows[:, 2] - windows[:, 0]) * (self.context / 2.0) / ps
        outer = windows + tf.stack([-margin, -margin, margin, margin], axis=1)
        patches = crop_windows(images, outer, image_index, self.window_size, extrapolation_value=self.fill_value)
        masks = tf.cast(labels["masks"], tf.float32)
        mshape = tf.shape(masks)
        flat_masks = tf.reshape(masks, [-1, mshape[2], mshape[3], 1])
        mask_index = image_index * num_boxes + tf.maximum(obj, 0)
        target = crop_windows(flat_masks, windows, mask_index, self.mask_size)[..., 0]
        target = tf.where(pos_slot[:, None, None], tf.cast(target > 0.5, tf.float32), 0.0)

        flipped = tf.zeros([total], tf.bool)
        if self.flip:
            flipped = tf.random.stateless_uniform([total], seeds[6]) < 0.5
            patches = tf.where(flipped[:, None, None, None], tf.reverse(patches, axis=[2]), patches)
            target = tf.where(flipped[:, None, None], tf.reverse(target, axis=[2]), target)
        targets = {"score": score, "masks": target, "windows": windows, "image_index": image_index,
                   "object": obj, "flipped": flipped}
        return patches, targets

    def get_config(self):
        return {"patch_size": self.patch_size, "context": self.context, "mask_size": self.mask_size,
                "object_size": self.object_size, "max_shift": self.max_shift, "scale_jitter": self.scale_jitter,
                "negative_shift": self.negative_shift, "negative_scale": self.negative_scale,
                "negative_scales": list(self.negative_scales), "patches_per_image": self.patches_per_image,
                "positive_fraction": self.positive_fraction, "negative_candidates": self.negative_candidates,
                "min_object_size": self.min_object_size, "flip": self.flip, "fill_value": self.fill_value}


def patch_dataset(dataset, sampler, *, seed=0, start_batch=0, keys=("score", "masks")):
    """A batched detection dataset (``make_dataset(..., masks="instances")``) as patch batches.

    Batch ``i`` of ``dataset`` becomes ``sampler.patches_per_image`` patches per image,
    drawn with the stateless seed ``(seed, start_batch + i)``: the same stream position
    gives the same patches in any process (pass the stream's ``start_batch`` when it
    resumes mid-stream). Yields ``(patches, {key: targets[key] for key in keys})``.
    """
    def to_patches(index, data):
        images, labels = data[0], data[1]
        seed_pair = tf.stack([tf.cast(seed, tf.int64), tf.cast(start_batch, tf.int64) + index])
        patches, targets = sampler.sample(images, labels, seed_pair)
        return patches, {key: targets[key] for key in keys}

    return dataset.enumerate().map(to_patches, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
