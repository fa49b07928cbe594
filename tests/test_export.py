"""SavedModel export: fresh-process load without kerasdet, saved_model_cli, parity with predict,
TF Serving's versioned layout (``<base>/<version>/``), ``kerasdet export --version``."""
import json
import os
import subprocess
import sys
import textwrap

import cv2
import keras
import numpy as np
import pytest

from kerasdet.data.coco import load_coco
from kerasdet.data.pipeline import make_dataset
from kerasdet.export import export_saved_model
from kerasdet.models.faster_rcnn import FasterRCNN
from kerasdet.models.retinanet import RetinaNet
from kerasdet.models.ssd import SSD
from kerasdet.backbones import small_backbone

CATEGORY_IDS = [3, 7, 11]


def _model(kind="retinanet"):
    keras.utils.set_random_seed(3)
    if kind == "faster_rcnn":
        return FasterRCNN(
            backbone=small_backbone(widths=(8, 16, 16, 16), blocks=(0, 0, 0, 0), levels=("C2", "C3", "C4", "C5")),
            num_classes=3, fpn_channels=16, rpn_channels=16, anchor_size=4.0, canonical_size=112.0,
            rpn_pre_nms_topk_test=100, rpn_post_nms_topk_test=50, num_rois=32, fc_dim=32, max_detections=20,
        )
    if kind == "assd":
        return SSD(
            backbone=small_backbone(widths=(8, 16, 16, 16), blocks=(0, 0, 0, 0)),
            num_classes=3, extra_layers=((8, 16, 2, "same"),), min_sizes=(0.15, 0.3, 0.5, 0.75),
            aspect_ratios=((2.0,),) * 4, attention=True, fusion=True, fusion_channels=8, max_detections=20,
        )
    return RetinaNet(
        backbone=small_backbone(widths=(8, 16, 16, 16), blocks=(0, 0, 0, 0)),
        num_classes=3, min_level=3, max_level=5, fpn_channels=16, head_convs=1, head_channels=16,
        anchor_size=2.0, prior_probability=0.1, max_detections=20,
    )


def _export_fixture(model, name, tmp_path_factory):
    """Exports ``model`` (64x64 canvas) next to two 96x80 images and a COCO file of them:
    ``(model, saved_model_path, root, images)``."""
    root = tmp_path_factory.mktemp(f"export_{name}")
    rng = np.random.RandomState(0)
    images = [rng.randint(0, 255, (96, 80, 3), dtype=np.uint8) for _ in range(2)]
    os.makedirs(root / "img")
    coco = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in CATEGORY_IDS]}
    for i, im in enumerate(images):
        cv2.imwrite(str(root / "img" / f"{i}.png"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
        coco["images"].append({"id": i + 1, "file_name": f"{i}.png", "height": 96, "width": 80})
    with open(root / "ann.json", "w") as f:
        json.dump(coco, f)
    path = str(root / "saved_model")
    export_saved_model(model, path, image_size=(64, 64), category_ids=CATEGORY_IDS)
    np.save(root / "batch.npy", np.stack(images))
    return model, path, root, np.stack(images)


@pytest.fixture(scope="module", params=["retinanet", "faster_rcnn", "assd"])
def exported(request, tmp_path_factory):
    return _export_fixture(_model(request.param), request.param, tmp_path_factory)


FRESH = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "kerasdet" or name.startswith("kerasdet."):
                raise ImportError("kerasdet is blocked in this process")
    sys.meta_path.insert(0, Block())
    try:
        import kerasdet
        raise SystemExit("kerasdet was importable")
    except ImportError:
        pass
    import numpy as np, tensorflow as tf
    fn = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
    out = fn(images=tf.constant(np.load(sys.argv[2])))
    np.savez(sys.argv[3], **{k: v.numpy() for k, v in out.items()})
    print("kerasdet" in sys.modules)
    """
)


def test_fresh_process_without_kerasdet_matches_in_process_predict(exported):
    model, path, root, batch = exported
    out_file = str(root / "fresh.npz")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, path, str(root / "batch.npy"), out_file],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(root),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("False")
    served = dict(np.load(out_file))
    assert served["detection_boxes"].dtype == np.float32 and served["detection_boxes"].shape == (2, 20, 4)
    assert served["num_detections"].dtype == np.int32

    # In-process reference: the training/eval pipeline's canvas + model.predict.
    source = load_coco(str(root / "ann.json"), str(root / "img"))
    ds = make_dataset(source, batch_size=2, image_size=(64, 64))
    (images, labels), = list(ds)
    pred = model.predict(images, verbose=0)
    np.testing.assert_array_equal(served["num_detections"], pred["num_detections"])
    assert served["num_detections"].min() > 0
    for b in range(2):
        n = int(pred["num_detections"][b])
        np.testing.assert_allclose(served["detection_scores"][b, :n], pred["scores"][b, :n], atol=1e-5)
        ids = np.array(CATEGORY_IDS)[pred["classes"][b, :n]]
        np.testing.assert_array_equal(served["detection_classes"][b, :n], ids)
        assert np.all(served["detection_classes"][b, n:] == -1)
        scale = float(labels["image_scale"][b])
        ref = pred["boxes"][b, :n] / scale / np.array([96, 80, 96, 80])
        np.testing.assert_allclose(served["detection_boxes"][b, :n], np.clip(ref, 0, 1), atol=0.01)
        assert served["detection_boxes"].min() >= 0 and served["detection_boxes"].max() <= 1


def test_saved_model_cli_show_and_run(exported):
    _, path, root, _ = exported
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if not os.path.exists(cli):
        pytest.skip("saved_model_cli is not installed next to this Python")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    show = subprocess.run([cli, "show", "--dir", path, "--all"], capture_output=True, text=True, timeout=300, env=env)
    assert show.returncode == 0, show.stderr[-2000:]
    text = show.stdout
    for key in ("serving_default", "encoded_image", "tf_example"):
        assert f"signature_def['{key}']" in text
    assert "inputs['image_bytes'] tensor_info:" in text and "dtype: DT_STRING" in text and "shape: (-1)" in text
    assert "inputs['images'] tensor_info:" in text and "dtype: DT_UINT8" in text and "shape: (-1, -1, -1, 3)" in text
    for key in ("detection_boxes", "detection_scores", "detection_classes", "num_detections"):
        assert f"outputs['{key}']" in text
    outdir = str(root / "cli_out")
    run = subprocess.run(
        [cli, "run", "--dir", path, "--tag_set", "serve", "--signature_def", "serving_default",
         "--inputs", f"images={root / 'batch.npy'}", "--outdir", outdir],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    boxes = np.load(os.path.join(outdir, "detection_boxes.npy"))
    assert boxes.shape == (2, 20, 4)


def test_export_metadata(exported):
    _, path, _, _ = exported
    with open(os.path.join(path, "kerasdet_export.json")) as f:
        meta = json.load(f)
    assert meta["category_ids"] == CATEGORY_IDS and meta["image_size"] == [64, 64]


def test_serving_ignores_the_models_bounding_box_format(tmp_path):
    """A model predicting ``xywh`` boxes exports the same graph as its ``yxyx`` twin:
    ``detection_boxes`` stay ``rel_yxyx`` of the original image, and the metadata says so."""
    import tensorflow as tf

    yxyx = _model("retinanet")
    yxyx.build((None, 64, 64, 3))
    xywh = RetinaNet.from_config(dict(yxyx.get_config(), bounding_box_format="xywh"))
    xywh.build((None, 64, 64, 3))
    xywh.set_weights(yxyx.get_weights())
    rng = np.random.RandomState(1)
    batch = tf.constant(rng.randint(0, 255, (2, 96, 80, 3), dtype=np.uint8))
    served = []
    for name, model in (("yxyx", yxyx), ("xywh", xywh)):
        path = str(tmp_path / name)
        export_saved_model(model, path, image_size=(64, 64), category_ids=CATEGORY_IDS, category_names=["a", "b", "c"])
        out = tf.saved_model.load(path).signatures["serving_default"](images=batch)
        served.append({k: v.numpy() for k, v in out.items()})
        with open(os.path.join(path, "kerasdet_export.json")) as f:
            meta = json.load(f)
        assert meta["bounding_box_format"] == "rel_yxyx" and meta["model_config"]["bounding_box_format"] == name
        assert meta["class_name"] == meta["model"] == "RetinaNet" and meta["num_classes"] == 3
        assert meta["max_detections"] == 20 and meta["has_masks"] is False
        assert meta["category_ids"] == CATEGORY_IDS and meta["category_names"] == ["a", "b", "c"]
        assert meta["image_size"] == [64, 64] and meta["min_size"] is None and meta["max_size"] is None
        assert meta["backbone"] == {"class_name": "Functional", "name": "small_backbone"}
        assert set(meta["signature"]["outputs"]) == set(out)
        assert meta["signature"]["outputs"]["detection_boxes"].startswith("float32 [B, K, 4]")
    assert served[0]["num_detections"].min() > 0
    for key in served[0]:
        np.testing.assert_array_equal(served[1][key], served[0][key], err_msg=key)
    # and the xywh model's predict does answer in xywh (the user edge)
    canvas = tf.image.pad_to_bounding_box(tf.image.resize(tf.cast(batch, tf.float32), (64, 53)), 0, 0, 64, 64)
    ref = yxyx.predict(canvas, verbose=0)["boxes"]
    got = xywh.predict(canvas, verbose=0)["boxes"]
    np.testing.assert_allclose(got, np.stack([ref[..., 1], ref[..., 0], ref[..., 3] - ref[..., 1],
                                              ref[..., 2] - ref[..., 0]], -1), atol=1e-4)


# --- R-FCN / CoupleNet / Attention CoupleNet (issue 8) ----------------------------------------
def _rfcn_model(kind):
    from kerasdet.models.rfcn import RFCN

    keras.utils.set_random_seed(3)
    backbone = small_backbone(widths=(8, 16, 16, 16), blocks=(0, 0, 0, 0), levels=("C4", "C5"), dilate_c5=True,
                              attention_levels=(2, 3, 4) if kind == "acouplenet" else (), attention_channels=8)
    return RFCN(
        backbone=backbone, num_classes=3, global_branch=kind != "rfcn", conv_new_channels=16, group_size=3,
        global_pool_size=3, global_channels=16, rpn_channels=16, anchor_size=1.0, scales=(1.0, 2.0),
        rpn_pre_nms_topk_test=100, rpn_post_nms_topk_test=32, rpn_min_size=0.0, max_detections=20,
    )


@pytest.fixture(scope="module", params=["rfcn", "couplenet", "acouplenet"])
def exported_rfcn(request, tmp_path_factory):
    return _export_fixture(_rfcn_model(request.param), request.param, tmp_path_factory)


def test_rfcn_variants_load_without_kerasdet_and_match_predict(exported_rfcn):
    """The TF-only SavedModel load test (fresh process, kerasdet blocked) for each variant."""
    test_fresh_process_without_kerasdet_matches_in_process_predict(exported_rfcn)
    test_export_metadata(exported_rfcn)


# --- Spatial Memory Network (issue 7) ----------------------------------------------------------
def _smn_model(kind):
    from kerasdet.models.smn import SMN

    keras.utils.set_random_seed(3)
    base = FasterRCNN(
        architecture="c4", feature_level=4, num_classes=3, anchor_size=1.0, scales=(1.0, 2.0),
        backbone=small_backbone(widths=(8, 16, 16, 16), blocks=(0, 0, 0, 0), levels=("C4",)),
        roi_pooler="crop_pool", rpn_channels=8, fc_dim=16, rpn_pre_nms_topk_test=100, rpn_post_nms_topk_test=16,
        max_detections=20, score_threshold=0.0,
    )
    base.build((None, 64, 64, 3))
    return SMN(base=base, context="mlp" if kind == "smn_mlp" else "memory", num_steps=3, num_base_writes=3,
               num_memory_steps=2, memory_channels=8, crop_size=5, memory_roi_crop=4, memory_roi_pool=1,
               memory_rpn_channels=8, memory_fc_dim=16, fusion_dim=16, max_detections=20, score_threshold=0.0)


@pytest.fixture(scope="module", params=["smn", "smn_mlp"])
def exported_smn(request, tmp_path_factory):
    return _export_fixture(_smn_model(request.param), request.param, tmp_path_factory)


def test_smn_loads_without_kerasdet_and_matches_predict(exported_smn):
    """The TF-only SavedModel load test (fresh process, kerasdet blocked) for SMN (final
    inference mode: N1 base writes + N2 memory steps, all in the graph) and its MLP control."""
    test_fresh_process_without_kerasdet_matches_in_process_predict(exported_smn)
    test_export_metadata(exported_smn)


# --- TF Serving's versioned layout (issue 20) ------------------------------------------------
def test_versioned_layout_never_overwrites(tmp_path):
    """``export_model`` writes ``<base>/1/``, then ``2/`` (one above the highest, gaps
    kept), an explicit version that exists is an error, a non-positive one too; the base
    folder resolves to its highest version, and ``predict_images`` takes either folder."""
    from types import SimpleNamespace

    from kerasdet.engine.predict import export_model, predict_images, read_export_metadata
    from kerasdet.errors import UserInputError
    from kerasdet.export import ExportVersionExistsError, existing_versions, resolve_saved_model_dir

    model = _model("retinanet")
    from kerasdet.engine.config import ExportConfig

    config = SimpleNamespace(input=SimpleNamespace(image_size=(64, 64), min_size=None, max_size=None),
                             export=ExportConfig(precision="float32"))
    label_map = {"category_ids": CATEGORY_IDS, "category_names": ["a", "b", "c"]}
    base = str(tmp_path / "retinanet_digits")
    first = export_model(model, config, label_map, base)
    assert first == os.path.join(base, "1") and os.path.isfile(os.path.join(first, "saved_model.pb"))
    assert os.path.isfile(os.path.join(first, "assets.extra", "tf_serving_warmup_requests"))
    assert export_model(model, config, label_map, base, version=5) == os.path.join(base, "5")
    assert export_model(model, config, label_map, base) == os.path.join(base, "6")
    assert existing_versions(base) == [1, 5, 6] and sorted(os.listdir(base)) == ["1", "5", "6"]  # no temp folder left
    stamp = os.path.getmtime(os.path.join(base, "5", "saved_model.pb"))
    with pytest.raises(ExportVersionExistsError, match="export version 5 exists already .* next free: 7"):
        export_model(model, config, label_map, base, version=5)
    assert os.path.getmtime(os.path.join(base, "5", "saved_model.pb")) == stamp
    for bad in (0, -1, "3", 2.0, True):
        with pytest.raises(UserInputError, match="positive integer"):
            export_model(model, config, label_map, base, version=bad)
    assert resolve_saved_model_dir(base) == os.path.join(base, "6") and resolve_saved_model_dir(first) == first
    assert read_export_metadata(base)["category_names"] == ["a", "b", "c"]
    image = str(tmp_path / "x.png")
    cv2.imwrite(image, np.random.RandomState(0).randint(0, 255, (96, 80, 3), dtype=np.uint8))
    for folder in (base, first):
        written = predict_images(folder, [image], str(tmp_path / "pred"), score_threshold=0.0)
        assert len(written) == 1 and os.path.isfile(written[0])
    # an unversioned export under the base path is refused (TF Serving would not see it)
    flat = str(tmp_path / "flat")
    export_saved_model(model, flat, image_size=(64, 64), category_ids=CATEGORY_IDS)
    with pytest.raises(UserInputError, match="unversioned SavedModel"):
        export_model(model, config, label_map, flat)
    with pytest.raises(FileNotFoundError, match="neither saved_model.pb nor"):
        resolve_saved_model_dir(str(tmp_path))


def test_cli_export_version_flag(monkeypatch):
    """``kerasdet export --version N`` reaches ``export_run`` as ``version=N``; without the
    flag, ``version=None`` (the next free version)."""
    from kerasdet import cli
    import kerasdet.engine.runner as runner

    calls = []
    monkeypatch.setattr(runner, "export_run", lambda run, output, **kw: calls.append((run, output, kw)) or output)
    cli.main(["export", "--run", "w", "--output", "o", "--version", "3"])
    cli.main(["export", "--run", "w", "--output", "o"])
    assert calls == [
        ("w", "o", {"weights": None, "version": 3, "precision": None}),
        ("w", "o", {"weights": None, "version": None, "precision": None}),
    ]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["export", "--run", "w", "--output", "o", "--version", "x"])
