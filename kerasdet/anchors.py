"""Multi-level anchor generation (RetinaNet, RPN and SSD-style grids).

One generator serves every anchor-based model in kerasdet. Anchors are yxyx in absolute
pixels of the network input, ordered ``(level, y, x, anchor)`` with the anchor index
running over ``(scale, aspect_ratio)`` (scale-major). That is exactly the order of a head
output of shape ``[B, H, W, A * K]`` reshaped to ``[B, H * W * A, K]`` and concatenated
across levels, so no permutation is ever needed.

Choices where the papers are silent (documented in the README):

* anchor centres sit at ``(i + 0.5) * stride`` (pixel-centre convention, as TF Model
  Garden and torchvision; Detectron's legacy offset differs by half a pixel);
* ``aspect_ratio`` is ``height / width``; an anchor of base size ``s`` and ratio ``r`` has
  ``h = s * sqrt(r)`` and ``w = s / sqrt(r)`` (area ``s**2`` for every ratio);
* anchors crossing the image border are kept (FPN §4.4.1, spec ambiguity 21).
"""
import math

import tensorflow as tf


class AnchorGenerator:
    """Builds anchors for feature levels ``min_level..max_level``.

    Args:
        min_level: finest pyramid level (stride ``2**min_level``). Default 3 (P3).
        max_level: coarsest level. Default 7 (P7).
        anchor_size: base anchor size as a multiple of the level's stride. Default 4.0
            (RetinaNet: 32 px on P3 .. 512 px on P7; the FPN RPN uses 8.0 on P2..P6).
        scales: multipliers of the base size; default the three octave scales
            ``2**0, 2**(1/3), 2**(2/3)`` of RetinaNet (one scale ``(1.0,)`` for the RPN).
        aspect_ratios: ``height / width`` ratios. Default ``(0.5, 1.0, 2.0)``.
    """

    def __init__(
        self,
        *,
        min_level=3,
        max_level=7,
        anchor_size=4.0,
        scales=(1.0, 2.0 ** (1.0 / 3.0), 2.0 ** (2.0 / 3.0)),
        aspect_ratios=(0.5, 1.0, 2.0),
    ):
        if min_level > max_level:
            raise ValueError(f"min_level ({min_level}) must be <= max_level ({max_level}).")
        if not scales or not aspect_ratios:
            raise ValueError("scales and aspect_ratios must be non-empty.")
        if any(r <= 0 for r in aspect_ratios) or any(s <= 0 for s in scales):
            raise ValueError("scales and aspect_ratios must be positive.")
        self.min_level = int(min_level)
        self.max_level = int(max_level)
        self.anchor_size = float(anchor_size)
        self.scales = tuple(float(s) for s in scales)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)

    @property
    def levels(self):
        return list(range(self.min_level, self.max_level + 1))

    @property
    def num_anchors_per_location(self):
        return len(self.scales) * len(self.aspect_ratios)

    def get_config(self):
        return {
            "min_level": self.min_level,
            "max_level": self.max_level,
            "anchor_size": self.anchor_size,
            "scales": list(self.scales),
            "aspect_ratios": list(self.aspect_ratios),
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def base_shapes(self, level):
        """``[A, 2]`` (height, width) of the anchors of one level, scale-major."""
        stride = 2.0**level
        shapes = []
        for scale in self.scales:
            size = self.anchor_size * stride * scale
            for ratio in self.aspect_ratios:
                shapes.append((size * math.sqrt(ratio), size / math.sqrt(ratio)))
        return tf.constant(shapes, tf.float32)

    def level_anchors(self, level, height, width):
        """Anchors ``[height * width * A, 4]`` of one level whose map is ``height x width``.

        ``height``/``width`` may be Python ints or scalar tensors (dynamic image sizes).
        """
        stride = 2.0**level
        ys = (tf.cast(tf.range(height), tf.float32) + 0.5) * stride
        xs = (tf.cast(tf.range(width), tf.float32) + 0.5) * stride
        cy, cx = tf.meshgrid(ys, xs, indexing="ij")  # [H, W]
        centers = tf.stack([cy, cx, cy, cx], axis=-1)[:, :, None, :]  # [H, W, 1, 4]
        hw = self.base_shapes(level)
        half = tf.concat([-0.5 * hw, 0.5 * hw], axis=-1)[None, None]  # [1, 1, A, 4]
        return tf.reshape(centers + half, [-1, 4])

    def feature_sizes(self, image_height, image_width):
        """Map sizes ``ceil(size / 2**level)`` of each level for an input image size.

        This is the size of a 'same'-padded stride-2 conv chain (and of keras.applications'
        ResNet stages).
        """
        sizes = []
        for level in self.levels:
            s = 2**level
            sizes.append(((image_height + s - 1) // s, (image_width + s - 1) // s))
        return sizes

    def __call__(self, image_height, image_width):
        """All anchors ``[N, 4]`` for an input image size (ints or scalar tensors)."""
        return tf.concat(
            [
                self.level_anchors(level, h, w)
                for level, (h, w) in zip(self.levels, self.feature_sizes(image_height, image_width))
            ],
            axis=0,
        )

    def from_feature_shapes(self, feature_shapes):
        """Anchors for explicit per-level map sizes ``[(h, w), ...]`` (finest first)."""
        if len(feature_shapes) != len(self.levels):
            raise ValueError(f"Expected {len(self.levels)} feature shapes, got {len(feature_shapes)}.")
        return tf.concat(
            [self.level_anchors(level, h, w) for level, (h, w) in zip(self.levels, feature_shapes)], axis=0
        )

    def num_anchors(self, image_height, image_width):
        """Total anchor count for a (static) image size."""
        return sum(h * w for h, w in self.feature_sizes(image_height, image_width)) * self.num_anchors_per_location
