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
* anchors crossing the image border are kept (thesis §4.5.1 for the FPN RPN; our choice for
  RetinaNet, on which the thesis is silent).
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
        center_offset: anchor centres at ``(i + center_offset) * stride``. Default 0.5
            (pixel centres); 0.0 is torchvision's / keras-hub's grid (centres on the
            top-left corner of each cell), needed by weights trained with it.
        round_to_pixels: ``False`` (default): exact sizes. ``True``: torchvision's /
            keras-hub's rounding: the size ``anchor_size * stride * scale`` truncated to an
            integer, then each half-extent rounded to a whole pixel.
    """

    def __init__(
        self,
        *,
        min_level=3,
        max_level=7,
        anchor_size=4.0,
        scales=(1.0, 2.0 ** (1.0 / 3.0), 2.0 ** (2.0 / 3.0)),
        aspect_ratios=(0.5, 1.0, 2.0),
        center_offset=0.5,
        round_to_pixels=False,
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
        self.center_offset = float(center_offset)
        self.round_to_pixels = bool(round_to_pixels)

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
            "center_offset": self.center_offset,
            "round_to_pixels": self.round_to_pixels,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def base_shapes(self, level):
        """``[A, 2]`` (height, width) of the anchors of one level, scale-major."""
        stride = 2.0**level
        if self.round_to_pixels:  # keras-hub's AnchorGenerator.generate_base_anchors, in float32
            sizes = [float(int(self.anchor_size * stride * scale)) for scale in self.scales]
            h_ratios = tf.sqrt(tf.constant(self.aspect_ratios, tf.float32))
            w_ratios = 1.0 / h_ratios
            size = tf.constant(sizes, tf.float32)[:, None]  # [S, 1]: scale-major
            hs = 2.0 * tf.round(h_ratios[None, :] * size / 2.0)
            ws = 2.0 * tf.round(w_ratios[None, :] * size / 2.0)
            return tf.reshape(tf.stack([hs, ws], axis=-1), [-1, 2])
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
        ys = (tf.cast(tf.range(height), tf.float32) + self.center_offset) * stride
        xs = (tf.cast(tf.range(width), tf.float32) + self.center_offset) * stride
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


class SSDAnchorGenerator:
    """SSD/ASSD default boxes (Liu et al. 2016 §2.2; ASSD, Yi et al. 2019, §4).

    Level ``l`` (one per detection source, finest first) has scale ``s = min_sizes[l]``
    and the next scale ``max_sizes[l]``, both fractions of the image side. Per cell, in
    this order (the authors' code): ``(s, s)``; ``(s', s')`` with ``s' = sqrt(s *
    max_sizes[l])``; then for each ratio ``r`` in ``aspect_ratios[l]`` (the ratios > 1
    only): ``(h, w) = (s / sqrt(r), s * sqrt(r))`` followed by its transpose. So ratios
    ``(2,)`` give A = 4 and ``(2, 3)`` give A = 6. Cells run row-major, levels in order,
    matching a ``[B, H, W, A * K]`` head reshaped to ``[B, H * W * A, K]``.

    Centres: ``(i + 0.5) / f`` of the image for an ``f``-cell map (our
    choice); ``legacy_steps=True`` uses the authors' ``(i + 0.5) * ceil(S / f) / S``
    (centres slightly past the border on odd sizes), for weight parity. Boxes are NOT
    clipped (the authors' clamp is a no-op). Output boxes are yxyx in absolute pixels of
    the network input, like every other anchor in kerasdet.

    Args:
        min_sizes: per-level scale as a fraction of the image. Default ASSD513's
            ``(0.04, 0.10, 0.26, 0.42, 0.58, 0.74, 0.90)``.
        max_sizes: per-level next scale. Default ``min_sizes[1:] + (1.06,)``.
        aspect_ratios: per-level ratios > 1. Default ASSD's ``((2,), (2, 3), (2, 3), (2, 3),
            (2, 3), (2,), (2,))``.
        legacy_steps: see above. Default False.
    """

    def __init__(
        self,
        *,
        min_sizes=(0.04, 0.10, 0.26, 0.42, 0.58, 0.74, 0.90),
        max_sizes=None,
        aspect_ratios=((2.0,), (2.0, 3.0), (2.0, 3.0), (2.0, 3.0), (2.0, 3.0), (2.0,), (2.0,)),
        legacy_steps=False,
    ):
        self.min_sizes = tuple(float(s) for s in min_sizes)
        if max_sizes is None:
            max_sizes = self.min_sizes[1:] + (1.06,)
        self.max_sizes = tuple(float(s) for s in max_sizes)
        self.aspect_ratios = tuple(tuple(float(r) for r in rs) for rs in aspect_ratios)
        if not (len(self.min_sizes) == len(self.max_sizes) == len(self.aspect_ratios)):
            raise ValueError(
                f"min_sizes, max_sizes and aspect_ratios need one entry per level; got "
                f"{len(self.min_sizes)}, {len(self.max_sizes)}, {len(self.aspect_ratios)}."
            )
        if any(r <= 1.0 for rs in self.aspect_ratios for r in rs):
            raise ValueError("SSD aspect_ratios lists the ratios > 1 only (each adds r and 1/r).")
        if any(s <= 0 for s in self.min_sizes + self.max_sizes):
            raise ValueError("min_sizes and max_sizes must be positive fractions of the image.")
        self.legacy_steps = bool(legacy_steps)

    @property
    def num_levels(self):
        return len(self.min_sizes)

    @property
    def num_anchors_per_location(self):
        """``A`` of each level (a list: SSD levels differ)."""
        return [2 + 2 * len(rs) for rs in self.aspect_ratios]

    def get_config(self):
        return {
            "min_sizes": list(self.min_sizes),
            "max_sizes": list(self.max_sizes),
            "aspect_ratios": [list(rs) for rs in self.aspect_ratios],
            "legacy_steps": self.legacy_steps,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def base_shapes(self, level):
        """``[A, 2]`` (height, width) of one level's boxes, as fractions of the image."""
        s, s_max = self.min_sizes[level], self.max_sizes[level]
        shapes = [(s, s), (math.sqrt(s * s_max),) * 2]
        for r in self.aspect_ratios[level]:
            shapes += [(s / math.sqrt(r), s * math.sqrt(r)), (s * math.sqrt(r), s / math.sqrt(r))]
        return tf.constant(shapes, tf.float32)

    def level_anchors(self, level, height, width, image_height, image_width):
        """Boxes ``[height * width * A, 4]`` (yxyx pixels) of one ``height x width`` source."""
        ih = tf.cast(image_height, tf.float32)
        iw = tf.cast(image_width, tf.float32)
        fh = tf.cast(height, tf.float32)
        fw = tf.cast(width, tf.float32)
        if self.legacy_steps:
            step_y, step_x = tf.math.ceil(ih / fh) / ih, tf.math.ceil(iw / fw) / iw
        else:
            step_y, step_x = 1.0 / fh, 1.0 / fw
        ys = (tf.cast(tf.range(height), tf.float32) + 0.5) * step_y
        xs = (tf.cast(tf.range(width), tf.float32) + 0.5) * step_x
        cy, cx = tf.meshgrid(ys, xs, indexing="ij")
        centers = tf.stack([cy, cx, cy, cx], axis=-1)[:, :, None, :]
        hw = self.base_shapes(level)
        half = tf.concat([-0.5 * hw, 0.5 * hw], axis=-1)[None, None]
        scale = tf.stack([ih, iw, ih, iw])
        return tf.reshape(centers + half, [-1, 4]) * scale

    def __call__(self, feature_shapes, image_height, image_width):
        """All boxes ``[N, 4]`` for the sources' map sizes ``[(h, w), ...]`` (finest first)."""
        if len(feature_shapes) != self.num_levels:
            raise ValueError(f"Expected {self.num_levels} feature shapes, got {len(feature_shapes)}.")
        return tf.concat(
            [self.level_anchors(l, h, w, image_height, image_width) for l, (h, w) in enumerate(feature_shapes)],
            axis=0,
        )

    def num_anchors(self, feature_shapes):
        return sum(h * w * a for (h, w), a in zip(feature_shapes, self.num_anchors_per_location))
