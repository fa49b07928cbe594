"""kerasdet.recipes.datasets: the shared data sections load as checked configs, and presets
copy them (changing a preset never changes the shared section)."""
from kerasdet.engine.config import load_config
from kerasdet.engine.recipes import load_recipe
from kerasdet.recipes.datasets import COCO2017, DIGITS, VOC0712


def test_shared_sections_are_valid_and_copied():
    for section in (COCO2017, DIGITS, VOC0712):
        assert load_config({"data": section}).data.kind == section["kind"]
    assert load_config({"data": VOC0712}).data.train_sets == ("2007/trainval", "2012/trainval")
    retina = load_recipe("retinanet")
    assert retina.config("paper").data.train_annotations == COCO2017["train_annotations"]
    assert retina.config("digits", {"data.generate.num_train": 8}).data.generate["num_train"] == 8
    assert DIGITS["generate"]["num_train"] == 4000  # an override does not leak into the shared dict
    assert load_recipe("couplenet").config("couplenet").data.voc_root == VOC0712["voc_root"]
