"""The tiny two-stage models of the legacy-weights fixtures (``tests/fixtures/two_stage``).

Written once by ``tests/fixtures/make_two_stage_fixtures.py`` with the code before the
RegionProposalNetwork refactor; :func:`assert_matches_fixture` checks the current code
against them: same weight paths, same ``.weights.h5`` layout, same parameter count, and the
old file loads into a model built from the old config with identical detections and losses.
"""
import json
import os

import numpy as np

from model_testutils import tiny_batch

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "two_stage")


def fixture_inputs():
    images, labels = tiny_batch(batch=2, seed=7)
    return images, labels


def _small(levels):
    from kerasdet.backbones import small_backbone

    return small_backbone(widths=(4, 8, 8, 8), blocks=(0, 0, 0, 0), levels=levels)


def faster_rcnn_fpn():
    from kerasdet.models.faster_rcnn import FasterRCNN

    model = FasterRCNN(
        backbone=_small(("C2", "C3", "C4", "C5")), num_classes=3, fpn_channels=8, rpn_channels=8, anchor_size=4.0,
        canonical_size=112.0, rpn_pre_nms_topk_train=100, rpn_post_nms_topk_train=40, rpn_pre_nms_topk_test=100,
        rpn_post_nms_topk_test=30, num_rois=16, roi_output_size=4, fc_dim=8, max_detections=20,
        score_threshold=0.0,
    )
    model.build((None, 64, 64, 3))
    return model


def faster_rcnn_c4():
    from kerasdet.models.faster_rcnn import FasterRCNN

    model = FasterRCNN(
        backbone=_small(("C4",)), num_classes=3, architecture="c4", feature_level=4, anchor_size=1.0,
        scales=(1.0, 2.0), roi_pooler="crop_pool", crop_size=6, rpn_channels=8, fc_dim=8, dropout=0.5,
        rpn_post_nms_topk_train=16, rpn_post_nms_topk_test=16, num_rois=16, max_detections=20, score_threshold=0.0,
    )
    model.build((None, 64, 64, 3))
    return model


def _rfcn(global_branch):
    from kerasdet.backbones import small_backbone
    from kerasdet.models.rfcn import RFCN

    model = RFCN(
        backbone=small_backbone(widths=(4, 8, 8, 8), blocks=(0, 0, 0, 0), levels=("C4", "C5"), dilate_c5=True),
        num_classes=3, global_branch=global_branch, conv_new_channels=8, group_size=3, psroi_method="align",
        global_pool_size=3, global_channels=8, rpn_channels=8, anchor_size=1.0, scales=(1.0, 2.0),
        rpn_pre_nms_topk_train=100, rpn_post_nms_topk_train=24, rpn_pre_nms_topk_test=100, rpn_post_nms_topk_test=24,
        rpn_min_size=0.0, ohem_rois=12, max_detections=20, score_threshold=0.0,
    )
    model.build((None, 64, 64, 3))
    return model


def rfcn():
    return _rfcn(False)


def couplenet():
    return _rfcn(True)


def smn():
    from kerasdet.models.smn import SMN

    model = SMN(base=faster_rcnn_c4(), num_steps=2, num_base_writes=2, num_memory_steps=2, memory_channels=4,
                crop_size=3, memory_roi_crop=4, memory_roi_pool=1, memory_rpn_channels=4, memory_fc_dim=8,
                fusion_dim=8, num_rois=12, rpn_batch_size=16, max_detections=20, score_threshold=0.0)
    model.build((None, 64, 64, 3))
    return model


MODELS = {"faster_rcnn_fpn": faster_rcnn_fpn, "faster_rcnn_c4": faster_rcnn_c4, "rfcn": rfcn,
          "couplenet": couplenet, "smn": smn}


def load_fixture(name):
    with open(os.path.join(FIXTURE_DIR, f"{name}.json")) as f:
        record = json.load(f)
    outputs = dict(np.load(os.path.join(FIXTURE_DIR, f"{name}.npz")))
    return record, outputs, os.path.join(FIXTURE_DIR, f"{name}.weights.h5")
