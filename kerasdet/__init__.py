"""kerasdet: Keras 3 (TensorFlow backend) object detection.

Conventions (see README): boxes are ``[ymin, xmin, ymax, xmax]`` in absolute pixels of the
network input inside the package; ground truth is a dict ``{"boxes": [B, N, 4] float32,
"classes": [B, N] int32}`` padded with class ``-1``; classes are 0-based and contiguous.
"""
__version__ = "0.1.0"
