"""The data sections the recipes share (copy them into a preset with ``dict(...)``)."""
import os

#: COCO 2017 (train2017 / val2017) in the layout of cocodataset.org's downloads.
COCO2017 = {
    "kind": "coco",
    "train_annotations": "coco/annotations/instances_train2017.json",
    "train_images": "coco/train2017",
    "val_annotations": "coco/annotations/instances_val2017.json",
    "val_images": "coco/val2017",
}

#: PASCAL VOC "07+12": 2007 trainval + 2012 trainval for training, VOC2007 test for
#: evaluation, read from a VOCdevkit folder (``--set data.voc_root=...``).
VOC0712 = {"kind": "voc", "voc_root": "VOCdevkit", "train_sets": ("2007/trainval", "2012/trainval"),
           "val_sets": ("2007/test",)}

#: The embedded digits set: 4,000 / 500 generated 128x128 images of 1-4 real MNIST digits.
DIGITS = {
    "kind": "digits",
    "dir": os.path.join("data", "digits"),
    "generate": {"num_train": 4000, "num_val": 500, "image_size": (128, 128), "seed": 0},
}
