"""Feature Pyramid Network (thesis ch. 4, §4.3; RetinaNet's P6/P7 from §5.4)."""
import keras
import tensorflow as tf

#: How levels above the backbone's coarsest level are made.
EXTRA_LEVEL_MODES = ("conv_c5", "conv_p5", "subsample_p5")


@keras.saving.register_keras_serializable(package="kerasdet")
class FeaturePyramid(keras.layers.Layer):
    """Top-down pyramid with lateral connections.

    Takes the backbone's feature dict ``{"C2": ..., "C3": ..., "C4": ..., "C5": ...}`` and
    returns ``{"P{min_level}": ..., ..., "P{max_level}": ...}``, each with ``num_channels``
    channels:

    * laterals: 1x1 conv on each ``C_l`` (``min_level <= l <= backbone_max_level``);
    * top-down: nearest-neighbour x2 upsampling of the coarser merged map, added
      element-wise (cropped to the lateral's size when a side is odd);
    * smoothing: a 3x3 conv on every merged map. No non-linearities (§4.3: they had
      "minor impacts");
    * levels above ``backbone_max_level``, by ``extra_levels``:

      - ``"conv_c5"`` (RetinaNet, §5.4): P6 = 3x3 stride-2 conv on C5, then each further
        level = 3x3 stride-2 conv on ReLU(previous);
      - ``"conv_p5"``: the same chain but starting from P5 (a common lighter variant);
      - ``"subsample_p5"`` (FPN for RPN, §4.4.1): P6 = stride-2 subsampling of P5 (a 1x1
        max-pool, as Detectron); further levels subsample again.

    Args:
        min_level: finest output level. Default 3.
        max_level: coarsest output level. Default 7.
        backbone_max_level: coarsest backbone level used (``C{backbone_max_level}``).
            Default 5.
        num_channels: ``d`` of the thesis. Default 256.
        extra_levels: one of ``EXTRA_LEVEL_MODES``. Default ``"conv_c5"``.
        kernel_initializer: the thesis refers to an unstated init (§5.4.1: "as described
            in [67]"); Detectron uses XavierFill = U(+-sqrt(3 / fan_in)), which is Keras'
            ``"lecun_uniform"`` (our choice). Default ``"lecun_uniform"``.
    """

    def __init__(
        self,
        *,
        min_level=3,
        max_level=7,
        backbone_max_level=5,
        num_channels=256,
        extra_levels="conv_c5",
        kernel_initializer="lecun_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if extra_levels not in EXTRA_LEVEL_MODES:
            raise ValueError(f"extra_levels must be one of {EXTRA_LEVEL_MODES}, got {extra_levels!r}.")
        if min_level > backbone_max_level:
            raise ValueError("min_level must be <= backbone_max_level.")
        self.min_level = int(min_level)
        self.max_level = int(max_level)
        self.backbone_max_level = int(backbone_max_level)
        self.num_channels = int(num_channels)
        self.extra_levels = extra_levels
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        top = min(self.max_level, self.backbone_max_level)
        self._backbone_levels = list(range(self.min_level, top + 1))

        def conv(kernel, strides, name):
            return keras.layers.Conv2D(
                self.num_channels,
                kernel,
                strides=strides,
                padding="same",
                kernel_initializer=self.kernel_initializer,
                dtype=self.dtype_policy,
                name=name,
            )

        self.lateral = {f"p{lvl}": conv(1, 1, f"lateral_p{lvl}") for lvl in self._backbone_levels}
        self.smooth = {f"p{lvl}": conv(3, 1, f"output_p{lvl}") for lvl in self._backbone_levels}
        self.extra = {}
        if extra_levels != "subsample_p5":
            for lvl in range(top + 1, self.max_level + 1):
                self.extra[f"p{lvl}"] = conv(3, 2, f"extra_p{lvl}")
        self.upsample = keras.layers.UpSampling2D(2, interpolation="nearest", dtype=self.dtype_policy)

    def _check(self, features):
        missing = [f"C{lvl}" for lvl in self._backbone_levels if f"C{lvl}" not in features]
        if missing:
            raise ValueError(f"FeaturePyramid needs backbone features {missing}; got {sorted(features)}.")

    def build(self, input_shape):
        self._check(input_shape)
        for lvl in self._backbone_levels:
            c_shape = input_shape[f"C{lvl}"]
            self.lateral[f"p{lvl}"].build(c_shape)
            self.smooth[f"p{lvl}"].build(tuple(c_shape[:-1]) + (self.num_channels,))
        top = self._backbone_levels[-1]
        for lvl in range(top + 1, self.max_level + 1):
            if f"p{lvl}" not in self.extra:
                continue
            if lvl == top + 1 and self.extra_levels == "conv_c5":
                in_shape = input_shape[f"C{top}"]
            else:
                in_shape = (None, None, None, self.num_channels)
            self.extra[f"p{lvl}"].build(in_shape)
        self.built = True

    def call(self, features):
        self._check(features)
        outputs = {}
        merged = None
        for lvl in reversed(self._backbone_levels):
            lateral = self.lateral[f"p{lvl}"](features[f"C{lvl}"])
            if merged is not None:
                up = self.upsample(merged)
                shape = tf.shape(lateral)
                up = up[:, : shape[1], : shape[2], :]
                lateral = lateral + up
            merged = lateral
            outputs[f"P{lvl}"] = self.smooth[f"p{lvl}"](merged)
        top = self._backbone_levels[-1]
        if self.extra_levels == "subsample_p5":
            prev = outputs[f"P{top}"]
            for lvl in range(top + 1, self.max_level + 1):
                prev = prev[:, ::2, ::2, :]
                outputs[f"P{lvl}"] = prev
        else:
            prev = features[f"C{top}"] if self.extra_levels == "conv_c5" else outputs[f"P{top}"]
            for i, lvl in enumerate(range(top + 1, self.max_level + 1)):
                if i > 0:
                    prev = tf.nn.relu(prev)
                prev = self.extra[f"p{lvl}"](prev)
                outputs[f"P{lvl}"] = prev
        return outputs

    def compute_output_shape(self, input_shape):
        shapes = {}
        for lvl in range(self.min_level, self.max_level + 1):
            shapes[f"P{lvl}"] = (None, None, None, self.num_channels)
        return shapes

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "min_level": self.min_level,
                "max_level": self.max_level,
                "backbone_max_level": self.backbone_max_level,
                "num_channels": self.num_channels,
                "extra_levels": self.extra_levels,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            }
        )
        return config
