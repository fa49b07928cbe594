"""Shared fixtures-as-functions of the model tests."""
import numpy as np


def tiny_batch(batch=4, size=64, seed=0, num_classes=3):
    """Images with 2 painted squares each (class c painted in channel c), the last image empty.

    Returns ``(images float32 [B, size, size, 3], {"boxes" [B, 3, 4], "classes" [B, 3]})``.
    """
    rng = np.random.RandomState(seed)
    images = rng.uniform(0, 40, (batch, size, size, 3)).astype("float32")
    boxes = np.zeros((batch, 3, 4), "float32")
    classes = np.full((batch, 3), -1, "int32")
    for b in range(batch - 1):  # last image: no objects at all
        for j in range(2):
            y, x = rng.randint(0, size - 24, 2)
            s = rng.randint(12, 24)
            boxes[b, j] = [y, x, y + s, x + s]
            classes[b, j] = rng.randint(0, num_classes)
            images[b, y : y + s, x : x + s, classes[b, j] % 3] = 255.0
    return images, {"boxes": boxes, "classes": classes}
