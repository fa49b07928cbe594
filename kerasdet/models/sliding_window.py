"""Sliding-window CNN classifier + NMS: the baseline of the recurrent decomposer (Park & Berg 2016).

Park & Berg ("decompNet", "Learning to decompose for object detection and instance
segmentation", ICLR 2016 workshop track, §3.1 and Fig. 4) compare their
recurrent decomposer on multi-digit MNIST (digits 3, 6, 9 on 100x100 images) against an
R-CNN-style sliding-window detector. :class:`SlidingWindowDetector` rebuilds it as a
kerasdet :class:`~kerasdet.models.base.Detector` (``model.fit`` on ``make_dataset`` batches,
``predict`` / ``detect``, ``export_saved_model``).

Paper facts [P §3.1]:

* the CNN is "the same as the one we used for category decomposition": the category
  network's conv trunk ``conv(1,32,5,2)-conv(32,32,5,2)-conv(32,64,3,2)-conv(64,64,3,1)-
  conv(64,64,3,2)-conv(64,64,3,1)``, batch normalization and ReLU after every layer
  [P App. B], on 1-channel images, with 4 classes (3, 6, 9, background);
* positives are "random image patches with >= 0.5 IoU overlap with ground truth boxes";
* square sliding windows of 5 sizes between the known minimum and maximum object sizes,
  "99% recall with step size 5"; about 1000 windows at step 5 and 3000 at step 3
  (the curves ``rcnn step5`` / ``rcnn step3`` of Fig. 4);
* non-maximum suppression at IoU 0.3;
* (region proposals "didn't work well", hence the sliding windows).

Choices (the paper does not say; all ours):

* [ours] negatives are windows with IoU < 0.5 to every ground truth (no ignore band);
* [ours] each window is resized to a fixed ``patch_size`` (28, option 56) patch, then conv
  trunk -> global average pool -> ``num_classes + 1``-way softmax (background = index 0);
* [ours] 5 window sizes evenly spaced over 14..56 px (``np.linspace(14, 56, 5)`` =
  14, 24.5, 35, 45.5, 56: the digit scale range 0.5..2 of the 28 px MNIST frame);
* [ours] the grid of one size ``s`` has ``floor((L - s) / stride) + 1`` positions per axis
  of length ``L`` (every window fully inside the image), centred so the left-over margin
  is split evenly: 978 windows at step 5 and 2587 at step 3 on 100x100 (paper, §3.1:
  "about 3000 and 1000 boxes for step size 3 and 5");
* [ours] training candidates per image are the whole grid plus ``jitter_copies`` jittered
  squares per ground truth (side ``sqrt(h * w)``, centre shifted and side scaled by up to
  ``jitter`` of the side, moved inside the image), so positives are plentiful ("random
  image patches" of the paper); each candidate is labelled by its best IoU with the ground
  truth (>= ``positive_iou``: that object's class + 1, else background; windows that would
  be negatives inside an ``is_crowd`` region are ignored, the shared matcher's rule);
* [ours] per image ``samples_per_image`` candidates are drawn with at most
  ``positive_fraction`` positives (:func:`kerasdet.sampling.sample_balanced`), loss =
  softmax cross-entropy summed over the sampled windows of the batch divided by their
  global count (:func:`kerasdet.losses.global_normalizer`);
* [ours] the input is converted to gray (``tf.image.rgb_to_grayscale``) and scaled to
  0..1 (``grayscale=True``, the paper's 1-channel MNIST net); patches are sampled at the
  centres of a ``patch_size`` x ``patch_size`` division of the window (bilinear);
* [ours] the score of a window for class ``c`` is its softmax probability; per-class NMS
  at 0.3 (paper) over all windows, ``score_threshold`` 0.05 and 100 detections per image
  (ours); detected boxes are the windows themselves (no box regression, as the paper's
  baseline describes none).

Windows are laid out for ``image_size`` (the network canvas of ``make_dataset``): feed
images of that size (the serving function of :mod:`kerasdet.export` does).
"""
import keras
import numpy as np
import tensorflow as tf

from kerasdet import losses as loss_ops
from kerasdet.layers.postprocess import per_class_nms, resolve_nms_method
from kerasdet.matching import ArgMaxMatcher, match_labels as match_ground_truth
from kerasdet.models.base import Detector
from kerasdet.sampling import random_uniform, sample_balanced

#: The category network's conv trunk [P App. B]: ``(filters, kernel, stride)`` per layer.
PAPER_TRUNK = ((32, 5, 2), (32, 5, 2), (64, 3, 2), (64, 3, 1), (64, 3, 2), (64, 3, 1))
NMS_METHODS = ("auto", "combined", "padded")


def default_window_sizes(min_size=14.0, max_size=56.0, num_sizes=5):
    """``num_sizes`` square window sides evenly spaced over ``[min_size, max_size]``."""
    return tuple(float(s) for s in np.linspace(float(min_size), float(max_size), int(num_sizes)))


def sliding_windows(image_size, window_sizes, stride):
    """All square windows, ``float32 [W, 4]`` yxyx absolute pixels (size-major, then rows).

    For side ``s`` and image side ``L`` there are ``floor((L - s) / stride) + 1`` positions
    per axis (windows fully inside; sizes larger than the image are skipped), the grid
    centred in the image.
    """
    height, width = int(image_size[0]), int(image_size[1])
    stride = float(stride)
    out = []
    for s in window_sizes:
        s = float(s)
        if s > height or s > width:
            continue
        axes = []
        for length in (height, width):
            n = int(np.floor((length - s) / stride + 1e-9)) + 1
            margin = (length - s - (n - 1) * stride) / 2.0
            axes.append(margin + stride * np.arange(n))
        ys, xs = np.meshgrid(axes[0], axes[1], indexing="ij")
        ys, xs = ys.reshape(-1), xs.reshape(-1)
        out.append(np.stack([ys, xs, ys + s, xs + s], axis=1))
    if not out:
        raise ValueError(f"no window size fits in image_size {image_size}: {window_sizes}")
    return np.concatenate(out, axis=0).astype(np.float32)


def _crop_patches(images, boxes, box_indices, patch_size):
    """Bilinear ``patch_size``-square crops of yxyx pixel ``boxes [N, 4]`` (samples at the
    centres of a ``patch_size`` grid over each box) from ``images [B, H, W, C]``."""
    shape = tf.shape(images)
    size = tf.cast(tf.stack([shape[1], shape[2], shape[1], shape[2]]), tf.float32)
    hw = tf.concat([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)
    half_cell = 0.5 * hw / float(patch_size) * tf.constant([1.0, 1.0, -1.0, -1.0])
    coords = (boxes + half_cell - 0.5) / tf.maximum(size - 1.0, 1.0)
    return tf.image.crop_and_resize(images, coords, box_indices, (patch_size, patch_size))


@keras.saving.register_keras_serializable(package="kerasdet")
class SlidingWindowDetector(Detector):
    """Sliding-window CNN classifier with per-class NMS (decompNet's baseline, see module doc).

    Input: float images ``[B, H, W, 3]`` RGB 0..255 with ``(H, W) = image_size``.
    Training targets: ``{"boxes": [B, N, 4] (``bounding_box_format``), "classes": [B, N]
    int32 (-1 padding), optional "is_crowd"}``. ``detect`` returns ``{"boxes" [B, D, 4] yxyx
    px, "scores" [B, D], "classes" [B, D] int32 (0-based, -1 padding), "num_detections"
    [B]}`` with ``D = max_detections``; ``predict`` the same with the boxes in
    ``bounding_box_format``.

    All arguments are keyword-only:
        num_classes: K object classes (the paper: 3). Required.
        image_size: ``(H, W)`` canvas the windows are laid on. Default (100, 100).
        window_sizes: square window sides in px; default ``num_sizes`` sides evenly spaced
            over ``[min_size, max_size]``.
        min_size, max_size, num_sizes: Default 14 / 56 / 5 (our choice: the paper's 0.5..2
            scales of the 28 px MNIST frame, 5 sizes).
        stride: window step in px. Default 5 (paper: 5 and 3).
        patch_size: side of the resized patch. Default 28 (option: 56).
        trunk: conv layers ``(filters, kernel, stride)``, each followed by BN + ReLU.
            Default the paper's ``PAPER_TRUNK``.
        grayscale: classify the gray image (1 channel, as the paper's MNIST net).
            Default True; False keeps RGB.
        samples_per_image: sampled training windows per image. Default 64.
        positive_fraction: at most this fraction of them positive. Default 0.25.
        positive_iou: IoU for a positive window (paper: 0.5); below it: background.
        jitter_copies, jitter: jittered squares added per ground truth for training and
            their relative shift/scale range. Default 4 / 0.25.
        nms_iou_threshold: Default 0.3 (paper).
        score_threshold: Default 0.05.
        max_detections: Default 100.
        nms_method: ``"auto"`` (padded under XLA, else combined), ``"combined"`` or
            ``"padded"`` (see :func:`kerasdet.layers.postprocess.per_class_nms`).
        pre_nms_topk: (window, class) candidates of the padded NMS. Default 1000.
        weight_decay: coupled L2 on kernels. Default 1e-4.
        bounding_box_format: format of the label boxes given to ``fit``/``evaluate`` and of
            the boxes ``predict`` returns. Default ``"yxyx"`` (network-input pixels); see
            :class:`~kerasdet.models.base.Detector`.
        nan_policy: see :class:`~kerasdet.models.base.Detector`.
    """

    LOSS_NAMES = ("cls_loss",)

    def __init__(
        self,
        *,
        num_classes,
        image_size=(100, 100),
        window_sizes=None,
        min_size=14.0,
        max_size=56.0,
        num_sizes=5,
        stride=5,
        patch_size=28,
        trunk=PAPER_TRUNK,
        grayscale=True,
        samples_per_image=64,
        positive_fraction=0.25,
        positive_iou=0.5,
        jitter_copies=4,
        jitter=0.25,
        nms_iou_threshold=0.3,
        score_threshold=0.05,
        max_detections=100,
        nms_method="auto",
        pre_nms_topk=1000,
        weight_decay=1e-4,
        **kwargs,
    ):
        super().__init__(weight_decay=weight_decay, **kwargs)
        resolve_nms_method(nms_method)  # validates (NMS_METHODS)
        if not 0.0 < positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in (0, 1], got {positive_fraction}.")
        self.num_classes = int(num_classes)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        if window_sizes is None:
            window_sizes = default_window_sizes(min_size, max_size, num_sizes)
        self.window_sizes = tuple(float(s) for s in window_sizes)
        self.stride = float(stride)
        self.patch_size = int(patch_size)
        self.trunk_spec = tuple(tuple(int(v) for v in layer) for layer in trunk)
        self.grayscale = bool(grayscale)
        self.samples_per_image = int(samples_per_image)
        self.positive_fraction = float(positive_fraction)
        self.positive_iou = float(positive_iou)
        self.jitter_copies = int(jitter_copies)
        self.jitter = float(jitter)
        self.nms_iou_threshold = float(nms_iou_threshold)
        self.score_threshold = float(score_threshold)
        self.max_detections = int(max_detections)
        self.nms_method = nms_method
        self.pre_nms_topk = int(pre_nms_topk)
        self._windows = sliding_windows(self.image_size, self.window_sizes, self.stride)
        # Positive at >= positive_iou, background below: no ignore band, no forced matches.
        self.matcher = ArgMaxMatcher(
            positive_threshold=self.positive_iou, negative_threshold=self.positive_iou,
            allow_low_quality_matches=False,
        )
        self.trunk = []
        for i, (filters, kernel, strides) in enumerate(self.trunk_spec):
            self.trunk += [
                keras.layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                                    name=f"conv{i + 1}"),
                keras.layers.BatchNormalization(name=f"bn{i + 1}"),
                keras.layers.ReLU(name=f"relu{i + 1}"),
            ]
        self.pool = keras.layers.GlobalAveragePooling2D(name="pool")
        self.classifier = keras.layers.Dense(self.num_classes + 1, name="classifier")
        self._config = dict(
            num_classes=self.num_classes,
            image_size=list(self.image_size),
            window_sizes=list(self.window_sizes),
            min_size=float(min_size),
            max_size=float(max_size),
            num_sizes=int(num_sizes),
            stride=self.stride,
            patch_size=self.patch_size,
            trunk=[list(layer) for layer in self.trunk_spec],
            grayscale=self.grayscale,
            samples_per_image=self.samples_per_image,
            positive_fraction=self.positive_fraction,
            positive_iou=self.positive_iou,
            jitter_copies=self.jitter_copies,
            jitter=self.jitter,
            nms_iou_threshold=self.nms_iou_threshold,
            score_threshold=self.score_threshold,
            max_detections=self.max_detections,
            nms_method=self.nms_method,
            pre_nms_topk=self.pre_nms_topk,
        )
        # A small model: create its weights now, so ``save_weights`` / ``load_weights`` work
        # right after ``fit`` (which never calls the model) or ``from_config``.
        self.build()

    # --- windows ------------------------------------------------------------------------
    @property
    def windows(self):
        """The sliding windows, numpy ``float32 [num_windows, 4]`` yxyx px."""
        return self._windows.copy()

    @property
    def num_windows(self):
        """Windows per image (978 for the paper grid at step 5, 2587 at step 3)."""
        return int(self._windows.shape[0])

    # --- network ------------------------------------------------------------------------
    def build(self, input_shape=None):
        """Creates every weight with one patch through the classifier."""
        if self.built:
            return
        channels = 1 if self.grayscale else 3
        self.classify(tf.zeros((1, self.patch_size, self.patch_size, channels)))
        self.built = True

    def preprocess(self, images):
        """float ``[B, H, W, 3]`` 0..255 -> gray (or RGB) 0..1."""
        images = tf.cast(images, tf.float32)
        if self.grayscale:
            images = tf.image.rgb_to_grayscale(images)
        return images / 255.0

    def classify(self, patches, training=False):
        """Class logits ``[N, num_classes + 1]`` (background at 0) of ``[N, P, P, C]`` patches."""
        x = patches
        for layer in self.trunk:
            x = layer(x, training=training)
        return self.classifier(self.pool(x))

    def window_logits(self, images, windows, training=False):
        """Logits ``[B, M, K + 1]`` of per-image windows ``[B, M, 4]`` (static ``M``)."""
        images = self.preprocess(images)
        batch = tf.shape(windows)[0]
        num = windows.shape[1] if windows.shape[1] is not None else tf.shape(windows)[1]
        flat = tf.reshape(windows, [-1, 4])
        index = tf.repeat(tf.range(batch), num)
        patches = _crop_patches(images, flat, index, self.patch_size)
        logits = self.classify(patches, training=training)
        return tf.reshape(tf.cast(logits, tf.float32), [batch, num, self.num_classes + 1])

    def _grid(self, batch):
        grid = tf.constant(self._windows)
        return tf.tile(grid[None], [batch, 1, 1])

    def call(self, images, training=False):
        """Logits of every grid window: ``{"class_logits": [B, num_windows, K + 1]}``."""
        images = tf.convert_to_tensor(images)
        return {"class_logits": self.window_logits(images, self._grid(tf.shape(images)[0]), training=training)}

    # --- training -----------------------------------------------------------------------
    def jittered_boxes(self, gt_boxes):
        """``jitter_copies`` random squares per ground truth: ``[B, N * copies, 4]``.

        Side ``sqrt(h * w)`` scaled by ``U(1 - jitter, 1 + jitter)``, centre shifted by
        ``U(-jitter, jitter)`` of the side per axis, then moved inside the image.
        """
        gt_boxes = tf.cast(gt_boxes, tf.float32)
        copies = self.jitter_copies
        boxes = tf.repeat(gt_boxes, copies, axis=1)  # [B, N*c, 4]
        ymin, xmin, ymax, xmax = tf.unstack(boxes, 4, axis=-1)
        side = tf.sqrt(tf.maximum(ymax - ymin, 0.0) * tf.maximum(xmax - xmin, 0.0))
        rand = random_uniform(tf.concat([tf.shape(side), [3]], 0), -self.jitter, self.jitter, seed=self.sampling_seed)
        cy = 0.5 * (ymin + ymax) + rand[..., 0] * side
        cx = 0.5 * (xmin + xmax) + rand[..., 1] * side
        side = side * (1.0 + rand[..., 2])
        height, width = float(self.image_size[0]), float(self.image_size[1])
        side = tf.minimum(side, min(height, width))
        y0 = tf.clip_by_value(cy - 0.5 * side, 0.0, height - side)
        x0 = tf.clip_by_value(cx - 0.5 * side, 0.0, width - side)
        return tf.stack([y0, x0, y0 + side, x0 + side], axis=-1)

    def label_windows(self, windows, labels):
        """Class targets of windows ``[B, M, 4]``: ``[B, M]`` int32, ``c + 1`` for a window
        with IoU >= ``positive_iou`` to an object of class ``c`` (its best), 0 background,
        -1 ignored (a would-be negative inside an ``is_crowd`` region)."""
        _, matched_classes, match = match_ground_truth(self.matcher, windows, labels)
        return tf.where(match == 1, matched_classes + 1, tf.where(match == 0, 0, -1))

    def training_candidates(self, labels, batch):
        """``(windows [B, M, 4], valid [B, M])``: the grid plus the jittered ground truth."""
        gt_boxes = tf.cast(labels["boxes"], tf.float32)
        gt_valid = tf.cast(labels["classes"], tf.int32) >= 0
        grid = self._grid(batch)
        jittered = self.jittered_boxes(gt_boxes)
        jitter_valid = tf.repeat(gt_valid, self.jitter_copies, axis=1)
        windows = tf.concat([grid, jittered], axis=1)
        valid = tf.concat([tf.ones(tf.shape(grid)[:2], tf.bool), jitter_valid], axis=1)
        return windows, valid

    def sample_windows(self, windows, valid, targets):
        """``samples_per_image`` windows per image: ``(windows [B, S, 4], targets [B, S],
        weights [B, S])`` (weight 0: an unused slot when an image has too few candidates)."""
        positive = valid & (targets > 0)
        negative = valid & (targets == 0)
        sampled_pos, sampled_neg = sample_balanced(
            positive, negative, num_samples=self.samples_per_image, positive_fraction=self.positive_fraction,
            seed=self.sampling_seed)
        sampled = sampled_pos | sampled_neg  # at most samples_per_image per image
        # Every image has at least the grid's windows as candidates.
        num = windows.shape[1] if windows.shape[1] is not None else self.num_windows
        _, index = tf.math.top_k(tf.cast(sampled, tf.float32), k=min(self.samples_per_image, num))
        return (tf.gather(windows, index, batch_dims=1), tf.gather(targets, index, batch_dims=1),
                tf.cast(tf.gather(sampled, index, batch_dims=1), tf.float32))

    def detection_losses(self, images, labels, training):
        images = tf.convert_to_tensor(images)
        batch = tf.shape(images)[0]
        windows, valid = self.training_candidates(labels, batch)
        targets = self.label_windows(windows, labels)
        windows, targets, weights = self.sample_windows(windows, valid, targets)
        logits = self.window_logits(images, tf.stop_gradient(windows), training=training)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.maximum(targets, 0), logits=logits)
        normalizer = loss_ops.global_normalizer(tf.reduce_sum(weights))
        return {"cls_loss": tf.reduce_sum(ce * weights) / normalizer}

    # --- inference ----------------------------------------------------------------------
    def _padded(self):
        return resolve_nms_method(self.nms_method, self.jit_compile) == "padded"

    def detect(self, images):
        """Every grid window classified in one batched pass, per-class NMS, top detections."""
        images = tf.cast(images, tf.float32)
        batch = tf.shape(images)[0]
        grid = self._grid(batch)
        logits = self.window_logits(images, grid, training=False)
        probs = tf.nn.softmax(logits, axis=-1)[..., 1:]
        return per_class_nms(
            grid[:, :, None, :], probs, self.image_size, padded=self._padded(),
            max_detections=self.max_detections, iou_threshold=self.nms_iou_threshold,
            score_threshold=self.score_threshold, pre_nms_topk=self.pre_nms_topk,
        )
