"""Learning-rate schedules used by the recipes."""
import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="kerasdet")
class WarmupPiecewiseConstant(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up followed by step decays (the Detectron / thesis schedule).

    ``lr(step) = base_lr * factor(step) * decay**k`` where ``k`` is the number of
    ``boundaries`` passed and, during the first ``warmup_steps``, ``factor`` rises linearly
    from ``warmup_factor`` to 1 (Detectron: 500 steps from 1/3). Thesis RetinaNet:
    ``base_lr=0.01`` at batch 16, ``boundaries=(60000, 80000)``, ``decay=0.1``.

    Args:
        base_lr: peak learning rate. Required.
        boundaries: steps at which the rate is multiplied by ``decay``. Default ().
        decay: Default 0.1.
        warmup_steps: Default 0 (no warm-up).
        warmup_factor: starting fraction of ``base_lr``. Default 1/3.
    """

    def __init__(self, *, base_lr, boundaries=(), decay=0.1, warmup_steps=0, warmup_factor=1.0 / 3.0):
        self.base_lr = float(base_lr)
        self.boundaries = [int(b) for b in boundaries]
        self.decay = float(decay)
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        passed = tf.zeros([], tf.float32)
        for b in self.boundaries:
            passed += tf.cast(step >= b, tf.float32)
        lr = self.base_lr * tf.pow(self.decay, passed)
        if self.warmup_steps > 0:
            alpha = tf.minimum(step / self.warmup_steps, 1.0)
            lr = lr * (self.warmup_factor * (1.0 - alpha) + alpha)
        return lr

    def get_config(self):
        return {
            "base_lr": self.base_lr,
            "boundaries": self.boundaries,
            "decay": self.decay,
            "warmup_steps": self.warmup_steps,
            "warmup_factor": self.warmup_factor,
        }
