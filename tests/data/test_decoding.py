"""kerasdet.data.decoding: graph-native decoding gives the OpenCV pipeline's tensors, and
bad files fail naming the file."""
import os

import cv2
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.data.coco import load_coco, read_image
from kerasdet.data.decoding import decode_image_bytes, needs_opencv, read_image_graph
from kerasdet.data.pipeline import make_dataset

from .conftest import make_jpeg_coco, make_tiny_coco


def _collect(ds):
    out = [(x.numpy(), {k: v.numpy() for k, v in y.items()}) for x, y in ds]
    return np.concatenate([x for x, _ in out]), {k: np.concatenate([y[k] for _, y in out]) for k in out[0][1]}


def _same(a, b, atol=0):
    np.testing.assert_allclose(a[0], b[0], atol=atol, rtol=0)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        np.testing.assert_array_equal(a[1][k], b[1][k], err_msg=k)


def test_every_png_kind_decodes_as_opencv_does(tmp_path):
    ann_file, image_dir = make_tiny_coco(str(tmp_path))  # colour, grey, RGBA, 16-bit grey, JPEG
    rng = np.random.default_rng(1)
    extra = {"deep_rgb.png": rng.integers(0, 65535, (9, 7, 3), dtype=np.uint16),
             "deep_rgba.png": rng.integers(0, 65535, (9, 7, 4), dtype=np.uint16),
             "grey.jpg": rng.integers(0, 255, (16, 24), dtype=np.uint8)}
    for name, array in extra.items():
        cv2.imwrite(os.path.join(image_dir, name), array)
    names = sorted(os.listdir(image_dir))
    assert len(names) == 8
    for name in names:
        path = os.path.join(image_dir, name)
        got = read_image_graph(path).numpy()
        assert got.dtype == np.uint8 and got.shape[-1] == 3
        np.testing.assert_array_equal(got, read_image(path), err_msg=name)


def test_pipeline_tensors_identical_on_digits_with_augmentation(digits_set):
    source = load_coco(digits_set["train_annotations"], digits_set["train_images"])
    for kwargs in (dict(training=False), dict(training=True, flip=True, scale_jitter=(0.8, 1.2), seed=3),
                   dict(training=True, flip=True, seed=5, repeat=True)):
        def run(decoder):
            ds = make_dataset(source, batch_size=4, image_size=(96, 96), decoder=decoder, **kwargs)
            return _collect(ds.take(6))
        _same(run("tf"), run("opencv"))


def test_pipeline_tensors_on_jpegs_within_one_grey_level(tmp_path):
    source = load_coco(*make_jpeg_coco(str(tmp_path), num_images=6, size=(60, 80)))
    args = dict(batch_size=3, image_size=(128, 128), min_size=100, max_size=128)
    graph = _collect(make_dataset(source, decoder="tf", **args))
    opencv = _collect(make_dataset(source, decoder="opencv", **args))
    _same(graph, opencv, atol=1.0)  # the requirement; measured: identical
    np.testing.assert_array_equal(graph[0], opencv[0])


def test_the_graph_pipeline_has_no_python_op(digits_set):
    source = load_coco(digits_set["val_annotations"], digits_set["val_images"])
    for decoder, expected in (("tf", False), ("opencv", True)):
        ds = make_dataset(source, batch_size=2, image_size=(96, 96), decoder=decoder)
        graph = tf.compat.v1.GraphDef()
        graph.ParseFromString(ds._as_serialized_graph().numpy())
        ops = {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
        assert any("PyFunc" in op for op in ops) == expected, decoder  # PyFunc, PyFuncStateless, EagerPyFunc


def test_other_formats_fall_back_to_opencv(tmp_path):
    ann_file, image_dir = make_tiny_coco(str(tmp_path))
    src = load_coco(ann_file, image_dir)
    bmp = os.path.join(image_dir, "a.bmp")
    cv2.imwrite(bmp, cv2.imread(os.path.join(image_dir, "a.png")))
    src.image_paths[0] = bmp
    assert needs_opencv(src.image_paths).tolist() == [True, False, False, False, False]
    for repeat in (False, True):
        args = dict(batch_size=5, image_size=(48, 64), repeat=repeat, training=repeat, flip=False, seed=0)
        _same(_collect(make_dataset(src, decoder="tf", **args).take(1)),
              _collect(make_dataset(src, decoder="opencv", **args).take(1)))


@pytest.mark.parametrize("damage, message", [
    ("missing", "not found|No such file"), ("text", "not a PNG or JPEG"), ("empty", "not a PNG or JPEG"),
    ("cut_png", "truncated"), ("cut_jpeg", "truncated"), ("size", r"annotations say")])
def test_bad_files_fail_naming_the_file(tmp_path, damage, message):
    ann_file, image_dir = make_tiny_coco(str(tmp_path))
    src = load_coco(ann_file, image_dir, check_images=False)
    index = 4 if damage == "cut_jpeg" else 0
    path = src.image_paths[index]
    with open(path, "rb") as f:
        data = f.read()
    if damage == "missing":
        os.remove(path)
    elif damage == "size":
        src.heights[index] = 41
    else:
        with open(path, "wb") as f:
            f.write({"text": b"hello", "empty": b""}.get(damage, data[:len(data) // 2]))
    name = os.path.basename(path).replace(".", r"\.")
    for repeat in (False, True):
        ds = make_dataset(src.subset([index]), batch_size=1, image_size=(48, 64), repeat=repeat,
                          training=repeat, seed=0)
        with pytest.raises(tf.errors.OpError, match=f"(?s)(?=.*{name})(?=.*({message}))"):
            next(iter(ds))


def test_decode_image_bytes_of_an_encoded_array():
    image = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", image)
    np.testing.assert_array_equal(decode_image_bytes(png.tobytes()).numpy(), image[..., ::-1])
