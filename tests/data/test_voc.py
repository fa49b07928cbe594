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


# --------------------------------------------------------------------------------------
# load_voc_sets: a two-year VOCdevkit
# --------------------------------------------------------------------------------------
def make_devkit(root, missing_image=True):
    """VOCdevkit/VOC2007 (make_voc's trainval + test 000004) and VOC2012 trainval:
    2012_000001: cat, difficult dog, unknown 'unicorn'; 2012_000002: dog, listed in
    trainval with its XML but (``missing_image``) no image file."""
    root = os.path.join(str(root), "VOCdevkit")
    voc07 = make_voc(os.path.join(root, "VOC2007"))
    write_image(os.path.join(voc07, "JPEGImages", "000004.jpg"), np.full((10, 12, 3), 50, np.uint8))
    with open(os.path.join(voc07, "Annotations", "000004.xml"), "w") as f:
        f.write(_xml("000004", 10, 12, [_obj("bird", (2, 3, 8, 9))]))
    with open(os.path.join(voc07, "ImageSets", "Main", "test.txt"), "w") as f:
        f.write("000004\n")
    voc12 = os.path.join(root, "VOC2012")
    xmls = {
        "2012_000001": _xml("2012_000001", 24, 32, [_obj("cat", (3, 4, 20, 22), 0),
                                                    _obj("dog", (1, 1, 6, 6), 1),
                                                    _obj("unicorn", (2, 2, 9, 9))]),
        "2012_000002": _xml("2012_000002", 18, 18, [_obj("dog", (1, 2, 10, 11))]),
    }
    os.makedirs(os.path.join(voc12, "Annotations"))
    for stem, text in xmls.items():
        with open(os.path.join(voc12, "Annotations", f"{stem}.xml"), "w") as f:
            f.write(text)
    write_image(os.path.join(voc12, "JPEGImages", "2012_000001.jpg"), np.full((24, 32, 3), 70, np.uint8))
    if not missing_image:
        write_image(os.path.join(voc12, "JPEGImages", "2012_000002.jpg"),
                    np.full((18, 18, 3), 70, np.uint8))
    os.makedirs(os.path.join(voc12, "ImageSets", "Main"))
    with open(os.path.join(voc12, "ImageSets", "Main", "trainval.txt"), "w") as f:
        f.write("2012_000001\n2012_000002\n")
    return root


def test_load_voc_sets_joins_years(tmp_path, caplog):
    from kerasdet.data.voc import load_voc_sets

    root = make_devkit(tmp_path, missing_image=False)
    with caplog.at_level(logging.WARNING):
        src = load_voc_sets(root, ["2007/trainval", "2012/trainval"])
    # Image ids unique across the joined sets, in order; paths in each year's folder.
    assert src.image_ids == [0, 1, 2, 3, 4]
    assert src.image_paths == [
        os.path.join(root, "VOC2007", "JPEGImages", f"{s}.jpg") for s in ("000001", "000002", "000003")
    ] + [os.path.join(root, "VOC2012", "JPEGImages", f"{s}.jpg") for s in ("2012_000001", "2012_000002")]
    assert src.heights == [30, 20, 16, 24, 18] and src.widths == [40, 24, 16, 32, 18]
    assert src.category_ids == list(range(1, 21)) and src.category_names == list(VOC_CLASSES)
    # VOC2012 image 3: cat (1-based -> pixel edges), difficult dog ignored, unicorn skipped.
    np.testing.assert_allclose(src.boxes[3], [[3, 2, 22, 20], [0, 0, 6, 6]])
    assert src.classes[3].tolist() == [VOC_CLASSES.index("cat"), VOC_CLASSES.index("dog")]
    assert src.is_crowd[3].tolist() == [False, True]
    np.testing.assert_allclose(src.boxes[4], [[1, 0, 11, 10]])
    # unicorn in 000002 and in 2012_000001, counted over the joined set and logged once.
    assert src.skipped == {"unknown_class": 2}
    assert sum("unknown_class=2" in r.getMessage() for r in caplog.records) == 1
    # Annotation ids run 1..M across the join (dog, person, car, cat, dog, dog).
    assert np.concatenate(src.annotation_ids).tolist() == [1, 2, 3, 4, 5, 6]
    assert "VOC2007" in src.annotation_file and "VOC2012" in src.annotation_file
    # The same as load_voc year by year, with ids shifted.
    one = load_voc(os.path.join(root, "VOC2007"))
    for k in range(3):
        np.testing.assert_array_equal(src.boxes[k], one.boxes[k])
        np.testing.assert_array_equal(src.is_crowd[k], one.is_crowd[k])
    # A single string with '+' and tuples are the same sets.
    assert load_voc_sets(root, "2007/trainval+2012/trainval").image_paths == src.image_paths
    assert load_voc_sets(root, [("VOC2007", "test")]).image_ids == [0]
    assert load_voc_sets(root, ["2012/trainval"], use_difficult=True).is_crowd[0].tolist() == [False, False]


def test_load_voc_sets_missing_image_is_a_clear_error(tmp_path):
    from kerasdet.data.voc import load_voc_sets
    from kerasdet.errors import DataFileNotFoundError

    root = make_devkit(tmp_path)
    for check in (True, "exists"):
        with pytest.raises(DataFileNotFoundError, match=r"VOC2012.JPEGImages.2012_000002\.jpg.*image id 4"):
            load_voc_sets(root, check_images=check)
    # As load_coco: check_images=False checks nothing (the pipeline's read names the file).
    src = load_voc_sets(root, check_images=False)
    assert len(src) == 5 and src.image_paths[4].endswith("2012_000002.jpg")
    assert src.heights[4] == 18  # from the XML


def test_load_voc_sets_missing_folders_name_the_path(tmp_path):
    from kerasdet.data.voc import load_voc_sets
    from kerasdet.errors import ConfigError, DataError, DataFileNotFoundError, UserInputError

    root = make_devkit(tmp_path, missing_image=False)
    with pytest.raises(DataFileNotFoundError, match=r"VOC2010: VOC year folder does not exist.*VOC2007"):
        load_voc_sets(root, ["2007/trainval", "2010/trainval"])
    with pytest.raises(DataFileNotFoundError, match=r"VOC2012.ImageSets.Main.test\.txt"):
        load_voc_sets(root, ["2012/test"])
    with pytest.raises(DataFileNotFoundError, match="nowhere: VOCdevkit folder does not exist"):
        load_voc_sets(os.path.join(root, "nowhere"))
    with pytest.raises(ConfigError, match="YEAR/SPLIT"):
        load_voc_sets(root, ["2007"])
    os.rename(os.path.join(root, "VOC2012", "Annotations"), os.path.join(root, "VOC2012", "Ann"))
    with pytest.raises(DataFileNotFoundError, match=r"VOC2012.Annotations: VOC 'Annotations' folder"):
        load_voc_sets(root, ["2012/trainval"])
    # The classes the command line reports in one line (also FileNotFoundError/ValueError).
    with pytest.raises(FileNotFoundError) as info:
        load_voc_sets(root, ["2012/trainval"])
    assert isinstance(info.value, DataError) and isinstance(info.value, UserInputError)


def test_load_voc_sets_counts_duplicate_images(tmp_path, caplog):
    from kerasdet.data.voc import load_voc_sets

    root = make_devkit(tmp_path, missing_image=False)
    with caplog.at_level(logging.WARNING):
        src = load_voc_sets(root, ["2007/trainval", "2007/trainval", "2007/test"])
    assert src.image_ids == [0, 1, 2, 3] and src.image_paths[3].endswith("000004.jpg")
    assert src.skipped == {"duplicate_image": 3, "unknown_class": 1}
    assert any("listed more than once" in r.getMessage() for r in caplog.records)


def test_voc_errors_are_user_input_errors(tmp_path):
    from kerasdet.errors import DataError, DataFileNotFoundError

    root = make_voc(tmp_path, xmls={"000001": "<annotation><size>"})
    with pytest.raises(DataError, match=r"000001\.xml: not valid XML"):
        load_voc(root)
    root = make_voc(tmp_path / "b")
    os.remove(os.path.join(root, "Annotations", "000002.xml"))
    with pytest.raises(DataFileNotFoundError, match=r"000002\.xml"):
        load_voc(root)
    with open(os.path.join(root, "JPEGImages", "000001.jpg"), "wb") as f:
        f.write(b"not an image")
    os.remove(os.path.join(root, "ImageSets", "Main", "trainval.txt"))
    with open(os.path.join(root, "ImageSets", "Main", "trainval.txt"), "w") as f:
        f.write("000001\n")
    with pytest.raises(DataError, match=r"000001\.jpg.*could not decode.*image id 0"):
        load_voc(root)
