"""kerasdet.data.voc: a tiny VOC tree written in tmp_path."""
import logging
import os

import numpy as np
import pytest

from kerasdet.data.voc import VOC_CLASSES, load_voc

from .conftest import write_image


def _obj(name, box, difficult=None):
    d = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    xmin, ymin, xmax, ymax = box
    return (f"<object><name>{name}</name><pose>Left</pose>{d}<bndbox><xmin>{xmin}</xmin>"
            f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


def _xml(stem, h, w, objects, size=True):
    s = f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>" if size else ""
    return f"<annotation><folder>VOC2007</folder><filename>{stem}.jpg</filename>{s}" \
           f"{''.join(objects)}</annotation>"


def make_voc(root, xmls=None, split="trainval"):
    """000001: dog + difficult person; 000002: unknown class + box past the border;
    000003: no objects."""
    sizes = {"000001": (30, 40), "000002": (20, 24), "000003": (16, 16)}
    if xmls is None:
        xmls = {
            "000001": _xml("000001", 30, 40, [_obj("dog", (1, 1, 10, 20), 0),
                                              _obj("person", (5, 6, 7, 8), 1)]),
            "000002": _xml("000002", 20, 24, [_obj("unicorn", (1, 1, 5, 5)),
                                              _obj("car", (20.5, 3, 30, 20))]),
            "000003": _xml("000003", 16, 16, []),
        }
    for stem, (h, w) in sizes.items():
        write_image(os.path.join(root, "JPEGImages", f"{stem}.jpg"),
                    np.full((h, w, 3), 90, np.uint8))
    os.makedirs(os.path.join(root, "Annotations"), exist_ok=True)
    for stem, text in xmls.items():
        with open(os.path.join(root, "Annotations", f"{stem}.xml"), "w") as f:
            f.write(text)
    os.makedirs(os.path.join(root, "ImageSets", "Main"), exist_ok=True)
    with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
        f.write("\n".join(sorted(xmls)) + "\n")
    return str(root)


def test_load_voc_converts_one_based_boxes(tmp_path, caplog):
    root = make_voc(tmp_path)
    with caplog.at_level(logging.WARNING):
        src = load_voc(root)
    assert len(src) == 3 and src.image_ids == [0, 1, 2]
    assert src.heights == [30, 20, 16] and src.widths == [40, 24, 16]
    assert src.image_paths[0] == os.path.join(root, "JPEGImages", "000001.jpg")
    # 1-based inclusive (1, 1, 10, 20) -> 0-based edges [ymin-1, xmin-1, ymax, xmax].
    np.testing.assert_allclose(src.boxes[0], [[0, 0, 20, 10], [5, 4, 8, 7]])
    assert src.classes[0].tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    assert src.is_crowd[0].tolist() == [False, True]  # difficult -> ignored
    # Unknown class skipped; the box past the right border (w=24) is clipped.
    np.testing.assert_allclose(src.boxes[1], [[2, 19.5, 20, 24]])
    assert src.classes[1].tolist() == [VOC_CLASSES.index("car")]
    assert src.boxes[2].shape == (0, 4)
    assert src.skipped == {"unknown_class": 1}
    assert src.category_ids == list(range(1, 21)) and src.category_names == list(VOC_CLASSES)
    assert any("unknown_class=1" in r.getMessage() for r in caplog.records)


def test_use_difficult_and_custom_classes(tmp_path):
    root = make_voc(tmp_path)
    src = load_voc(root, use_difficult=True, class_names=("person", "dog"))
    assert src.is_crowd[0].tolist() == [False, False]
    assert src.classes[0].tolist() == [1, 0]
    assert src.skipped == {"unknown_class": 2}  # unicorn, car


@pytest.mark.parametrize("text, match", [
    ("<annotation><size>", "not valid XML"),
    ("<foo/>", "expected <annotation>"),
    (_xml("000001", 30, 40, ["<object><name>dog</name></object>"]), r"object\[0\]/bndbox"),
    (_xml("000001", 30, 40, ["<object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
                              "<xmax>x</xmax><ymax>3</ymax></bndbox></object>"]),
     "bndbox/xmax' is not a number"),
    (_xml("000001", 30, 40, ["<object><bndbox/></object>"]), r"object\[0\]/name"),
    (_xml("000001", 30, 40, []).replace("<height>30</height>", ""), "size/height"),
])
def test_bad_xml_names_file_and_field(tmp_path, text, match):
    root = make_voc(tmp_path, xmls={"000001": text})
    with pytest.raises(ValueError, match=match) as info:
        load_voc(root)
    assert "000001.xml" in str(info.value)


def test_missing_split_image_and_size(tmp_path):
    root = make_voc(tmp_path)
    with pytest.raises(ValueError, match="test.txt"):
        load_voc(root, split="test")
    xmls = {"000001": _xml("000001", 30, 40, [_obj("dog", (1, 1, 10, 20))], size=False)}
    root2 = make_voc(tmp_path / "nosize", xmls=xmls)
    assert load_voc(root2).heights == [30]  # size read from the image
    with pytest.raises(ValueError, match="missing field 'size'"):
        load_voc(root2, check_images="exists")
    os.remove(os.path.join(root, "JPEGImages", "000002.jpg"))
    with pytest.raises(FileNotFoundError, match=r"000002\.jpg.*image id 1"):
        load_voc(root)


def test_degenerate_voc_boxes_are_counted(tmp_path):
    xmls = {"000001": _xml("000001", 30, 40, [_obj("dog", (10, 1, 9, 20)),
                                              _obj("dog", (50, 1, 60, 20)),
                                              _obj("cat", (2, 2, 3, 3))])}
    src = load_voc(make_voc(tmp_path, xmls=xmls))
    assert src.skipped == {"degenerate_bbox": 1, "box_outside_image": 1}
    np.testing.assert_allclose(src.boxes[0], [[1, 1, 3, 3]])
