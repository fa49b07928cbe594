"""Fixtures for the evaluation tests."""
import json

import pytest

from evaluation_testdata import make_gt_dict


@pytest.fixture
def coco_gt_file(tmp_path):
    path = tmp_path / "instances_tiny.json"
    path.write_text(json.dumps(make_gt_dict()))
    return path
