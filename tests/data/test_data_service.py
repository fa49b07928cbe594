"""input.data_service: the training preprocessing on tf.data service workers (a dispatcher
and two workers on loopback). What is asserted, and why it is the honest claim:

* every training example of an epoch is processed exactly once (``distributed_epoch``:
  each stream position goes to one worker), and each element equals the local
  pipeline's element of the same position (same decode, augmentation seed, resize);
* the workers' elements come back in arrival order, so batches are composed differently
  from the local stream's: the loss is compared on the same batches (the local
  pipeline's elements grouped as the service grouped them), step by step while
  training from the same weights, and must be equal.
"""
import numpy as np
import pytest
import tensorflow as tf

from kerasdet.data.coco import load_coco
from kerasdet.data.pipeline import make_dataset
from kerasdet.engine import builders
from kerasdet.engine.config import load_config
from kerasdet.errors import ConfigError

pytestmark = pytest.mark.slow

ARGS = dict(batch_size=4, image_size=(64, 96), max_boxes=8, training=True, flip=True, scale_jitter=(0.8, 1.2),
            seed=3, repeat=True)


@pytest.fixture(scope="module")
def service():
    dispatcher = tf.data.experimental.service.DispatchServer(
        tf.data.experimental.service.DispatcherConfig(port=0, protocol="grpc"))
    address = dispatcher.target.split("://", 1)[1]
    workers = [tf.data.experimental.service.WorkerServer(tf.data.experimental.service.WorkerConfig(
        dispatcher_address=address, port=0, protocol="grpc")) for _ in range(2)]
    yield dispatcher.target
    for w in workers:
        w.stop()
    dispatcher.stop()


def _elements(ds):
    out = []
    for x, y in ds:
        out += [(x[b].numpy(), {k: v[b].numpy() for k, v in y.items()}) for b in range(x.shape[0])]
    return out


def _model(num_classes):
    import keras

    from kerasdet.backbones import small_backbone
    from kerasdet.models.retinanet import RetinaNet

    model = RetinaNet(backbone=small_backbone(widths=(8, 16, 16, 16), blocks=(0, 1, 0, 0)), num_classes=num_classes,
                      min_level=3, max_level=5, fpn_channels=16, head_convs=1, head_channels=16, anchor_size=2.0,
                      aspect_ratios=(1.0,), scales=(1.0, 1.5))
    model(tf.zeros((1, 64, 96, 3)))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9))
    return model


def test_each_example_once_per_epoch_and_the_same_loss_as_local(digits_set, service):
    source = load_coco(digits_set["train_annotations"], digits_set["train_images"])
    n, batch = len(source), ARGS["batch_size"]
    epoch = n // batch
    remote = _elements(make_dataset(source, data_service=service, num_batches=epoch, **ARGS))
    ids = [int(y["image_id"]) for _, y in remote]
    assert sorted(ids) == sorted(source.image_ids)  # each image of epoch 0 exactly once
    local = {int(y["image_id"]): (x, y) for x, y in _elements(make_dataset(source, **ARGS).take(epoch))}
    assert sorted(local) == sorted(ids)
    for x, y in remote:
        lx, ly = local[int(y["image_id"])]
        np.testing.assert_array_equal(x, lx)
        for k in y:
            np.testing.assert_array_equal(y[k], ly[k], err_msg=k)

    def batches(elements):
        return [(np.stack([e[0] for e in elements[i:i + batch]]),
                 {k: np.stack([e[1][k] for e in elements[i:i + batch]]) for k in elements[0][1]})
                for i in range(0, len(elements), batch)]

    remote_batches = batches(remote)
    local_batches = batches([local[i] for i in ids])  # the local elements, grouped as the service grouped them
    m_remote, m_local = _model(source.num_classes), _model(source.num_classes)
    m_local.set_weights(m_remote.get_weights())  # same start (no global seed: it would leak into later tests)
    for (xr, yr), (xl, yl) in zip(remote_batches[:3], local_batches[:3]):  # train a few steps
        lr = m_remote.train_on_batch(xr, yr, return_dict=True)["loss"]
        ll = m_local.train_on_batch(xl, yl, return_dict=True)["loss"]
        assert np.isfinite(lr) and lr == ll
    for a, b in zip(m_remote.trainable_variables, m_local.trainable_variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_config_option_sends_training_to_the_service(digits_set, service):
    config = load_config({"input": {"image_size": [64, 96], "max_boxes": 8, "data_service": service},
                          "train": {"batch_size": 4}})
    source = builders.build_source(config, "train", paths=digits_set)
    ds = builders.build_dataset(config, source, training=True, seed=0)
    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(ds._as_serialized_graph().numpy())
    assert any("DataService" in node.op for node in graph.node)
    model = _model(source.num_classes)
    history = model.fit(ds, steps_per_epoch=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    with pytest.raises(ConfigError, match="cache_images"):
        make_dataset(source, data_service=service, cache_images=True, **ARGS)
