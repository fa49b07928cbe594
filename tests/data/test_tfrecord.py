"""kerasdet.data.tfrecord: OD API / Model Garden tf.Example shards, written and read back;
a record written by hand as other tools write it; per-worker sharding; the tfrecord kind."""
import os

import cv2
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.cli import console_main
from kerasdet.data.coco import load_coco
from kerasdet.data.pipeline import make_dataset
from kerasdet.data.tfrecord import (load_tfrecord_source, make_tfrecord_dataset, read_label_map,
                                    shard_names, write_tfrecords)
from kerasdet.engine import builders
from kerasdet.engine.config import load_config

from .conftest import make_jpeg_coco, make_tiny_coco


def _by_id(ds):
    out = {}
    for x, y in ds:
        for b in range(x.shape[0]):
            out[int(y["image_id"][b])] = (x[b].numpy(), {k: v[b].numpy() for k, v in y.items()})
    return out


@pytest.fixture
def jpeg_source(tmp_path):
    return load_coco(*make_jpeg_coco(str(tmp_path), num_images=7, size=(40, 56)))


def test_write_read_round_trip_gives_the_pipeline_tensors(jpeg_source, tmp_path):
    files = write_tfrecords(jpeg_source, str(tmp_path / "rec" / "train"), num_shards=3)
    assert [os.path.basename(f) for f in files] == [f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
    assert files == shard_names(str(tmp_path / "rec" / "train"), 3)
    back = load_tfrecord_source(str(tmp_path / "rec" / "train-*"))
    assert back.category_ids == jpeg_source.category_ids and back.category_names == jpeg_source.category_names
    order = np.argsort(back.image_ids)
    assert [back.image_ids[i] for i in order] == jpeg_source.image_ids
    for i, j in enumerate(order):
        assert (back.heights[j], back.widths[j]) == (jpeg_source.heights[i], jpeg_source.widths[i])
        np.testing.assert_allclose(back.boxes[j], jpeg_source.boxes[i], atol=1e-4)
        np.testing.assert_array_equal(back.classes[j], jpeg_source.classes[i])
    args = dict(batch_size=2, image_size=(64, 64), max_boxes=5)
    ref = _by_id(make_dataset(jpeg_source, **args))
    got = _by_id(make_tfrecord_dataset(str(tmp_path / "rec" / "*.tfrecord"), category_ids=back.category_ids, **args))
    assert sorted(got) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(got[k][0], ref[k][0])
        for key in ref[k][1]:
            np.testing.assert_allclose(got[k][1][key], ref[k][1][key], atol=1e-3, err_msg=key)


def _hand_written_example(image, source_id, boxes_xyxy_px, labels, texts, crowd=None):
    """A record as the OD API's create_coco_tf_record.py writes it (raw feature dict)."""
    h, w = image.shape[:2]
    encoded = cv2.imencode(".jpg", image)[1].tobytes()
    b = np.asarray(boxes_xyxy_px, np.float32).reshape(-1, 4)
    f = {
        "image/height": tf.train.Feature(int64_list=tf.train.Int64List(value=[h])),
        "image/width": tf.train.Feature(int64_list=tf.train.Int64List(value=[w])),
        "image/filename": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x.jpg"])),
        "image/source_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[source_id])),
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
        "image/format": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"jpeg"])),
        "image/object/bbox/xmin": tf.train.Feature(float_list=tf.train.FloatList(value=list(b[:, 0] / w))),
        "image/object/bbox/xmax": tf.train.Feature(float_list=tf.train.FloatList(value=list(b[:, 2] / w))),
        "image/object/bbox/ymin": tf.train.Feature(float_list=tf.train.FloatList(value=list(b[:, 1] / h))),
        "image/object/bbox/ymax": tf.train.Feature(float_list=tf.train.FloatList(value=list(b[:, 3] / h))),
        "image/object/class/text": tf.train.Feature(bytes_list=tf.train.BytesList(value=texts)),
        "image/object/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=labels)),
    }
    if crowd is not None:
        f["image/object/is_crowd"] = tf.train.Feature(int64_list=tf.train.Int64List(value=crowd))
    return tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString()


def test_a_hand_written_od_api_record_reads_through_the_tfrecord_kind(tmp_path):
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), (5, 5), 2)
    path = str(tmp_path / "val.record")
    with tf.io.TFRecordWriter(path) as w:
        w.write(_hand_written_example(image, b"42", [[4, 3, 20, 15], [10, 10, 39, 29]], [18, 3],
                                      [b"dog", b"car"], crowd=[0, 1]))
        w.write(_hand_written_example(image[:20], b"7", [[0, 0, 10, 10]], [99], [b"other"]))  # no is_crowd
    label_map = tmp_path / "label_map.pbtxt"
    label_map.write_text("item {\n  id: 3\n  name: 'car'\n}\nitem {\n  name: \"dog\"\n  id: 18\n}\n")
    assert read_label_map(str(label_map)) == {3: "car", 18: "dog"}
    config = load_config({"data": {"kind": "tfrecord", "train_records": path, "val_records": path,
                                   "label_map": str(label_map)},
                          "input": {"image_size": [64, 64], "max_boxes": 4}, "eval": {"batch_size": 2}})
    train, val = builders.build_sources(config)
    assert val.category_ids == [3, 18] and val.category_names == ["car", "dog"]
    assert val.image_ids == [42, 7] and val.heights == [30, 20] and val.widths == [40, 40]
    assert val.skipped == {"unknown_category": 1}  # label 99 is not in the label map
    np.testing.assert_allclose(val.boxes[0], [[3, 4, 15, 20], [10, 10, 29, 39]], atol=1e-4)
    assert val.classes[0].tolist() == [1, 0] and val.is_crowd[0].tolist() == [False, True]
    x, y = next(iter(builders.build_dataset(config, val, training=False)))
    assert x.shape == (2, 64, 64, 3) and y["image_id"].numpy().tolist() == [42, 7]
    scale = 64 / 40
    np.testing.assert_allclose(y["boxes"][0, :2].numpy(), np.array([[3, 4, 15, 20], [10, 10, 29, 39]]) * scale,
                               atol=1e-3)
    assert y["classes"].numpy().tolist() == [[1, 0, -1, -1], [-1, -1, -1, -1]]
    assert y["is_crowd"][0].numpy().tolist() == [False, True, False, False]
    assert y["original_size"].numpy().tolist() == [[30, 40], [20, 40]]
    from kerasdet.data.convert import coco_ground_truth

    gt = coco_ground_truth(val)  # pycocotools GT built from the records
    assert sorted(gt.getImgIds()) == [7, 42] and len(gt.getAnnIds()) == 2


def test_workers_read_disjoint_shards_and_training_is_seeded(jpeg_source, tmp_path):
    write_tfrecords(jpeg_source, str(tmp_path / "t"), num_shards=4)
    pattern = str(tmp_path / "t-*")
    cats = jpeg_source.category_ids
    seen = []
    for w in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=w, num_replicas_in_sync=2)
        ds = make_tfrecord_dataset(pattern, category_ids=cats, batch_size=2, image_size=(64, 64),
                                   input_context=ctx)
        seen.append(sorted(_by_id(ds)))
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == sorted(jpeg_source.image_ids)

    def stream(seed, start_batch=0):
        ds = make_tfrecord_dataset(pattern, category_ids=cats, batch_size=2, image_size=(64, 64), training=True,
                                   seed=seed, shuffle_buffer_size=8, start_batch=start_batch, scale_jitter=(0.8, 1.2))
        return [(x.numpy(), y["image_id"].numpy()) for x, y in ds.take(6 - start_batch)]

    a, b, c = stream(1), stream(1), stream(2)
    assert all((x1 == x2).all() and (i1 == i2).all() for (x1, i1), (x2, i2) in zip(a, b))
    assert any((i1 != i2).any() for (_, i1), (_, i2) in zip(a, c))
    first_epoch = np.concatenate([i for _, i in a])[:6]
    assert len(set(first_epoch.tolist())) == 6  # no image twice before an epoch ends (7 images)
    resumed = stream(1, start_batch=2)
    assert all((x1 == x2).all() and (i1 == i2).all() for (x1, i1), (x2, i2) in zip(a[2:], resumed))


def test_convert_commands_write_shards_and_bad_input_is_one_line(tmp_path, capsys):
    ann_file, image_dir = make_tiny_coco(str(tmp_path))  # PNGs, grey, RGBA, 16-bit, a JPEG
    prefix = str(tmp_path / "out" / "coco")
    assert console_main(["convert", "coco2tfrecord", "--annotations", ann_file, "--images", image_dir,
                         "--output", prefix, "--num-shards", "2", "--include-masks"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["coco-00000-of-00002.tfrecord", "coco-00001-of-00002.tfrecord"]
    src, back = load_coco(ann_file, image_dir), load_tfrecord_source(prefix + "-*")
    assert sorted(back.image_ids) == sorted(src.image_ids) and back.num_boxes == src.num_boxes
    record = next(iter(tf.data.TFRecordDataset(prefix + "-00000-of-00002.tfrecord")))
    ex = tf.train.Example.FromString(record.numpy()).features.feature
    assert ex["image/source_id"].bytes_list.value == [b"1"] and ex["image/format"].bytes_list.value == [b"png"]
    masks = ex["image/object/mask"].bytes_list.value
    assert len(masks) == 3 and cv2.imdecode(np.frombuffer(masks[0], np.uint8), cv2.IMREAD_UNCHANGED).shape == (40, 60)
    assert ex["image/object/class/label"].int64_list.value == [3, 12, 7]
    capsys.readouterr()
    assert console_main(["convert", "coco2tfrecord", "--images", image_dir, "--output", prefix]) == 2
    assert console_main(["convert", "coco2tfrecord", "--annotations", str(tmp_path / "nope.json"),
                         "--images", image_dir, "--output", prefix]) == 2
    assert console_main(["convert", "voc2tfrecord", "--voc-root", str(tmp_path / "nope"), "--output", prefix,
                         "--num-shards", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("kerasdet: error: ") for line in err), err
    assert "--annotations" in err[0] and "nope.json" in err[1] and "num-shards" in err[2]
