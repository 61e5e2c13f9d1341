"""Pascal VOC 2012 with the SBD-augmented labels (BARM datasets/voc.py, MiB dataset/voc.py::VOCSegmentationIncremental).

``data_root`` is the ``VOC2012`` folder itself::

    VOC2012/JPEGImages/{id}.jpg
    VOC2012/SegmentationClassAug/{id}.png                       labels 0..20, 255 = void
    VOC2012/ImageSets/Segmentation/train_aug.txt, val.txt       10,582 / 1,449 ids

A split file may hold bare ids or the ``/JPEGImages/x.jpg /SegmentationClassAug/x.png`` lines of the
MiB/DKD lists; the first token's stem is the id.
"""
import functools
import os

import numpy as np

from datasets.files import check_dir, pair_files, read_id_list

NAME = "voc"
NUM_CLASSES = 21
IGNORE_LABEL = 255
CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
IMAGE_DIR = "JPEGImages"
LABEL_DIR = "SegmentationClassAug"
SPLIT_DIR = os.path.join("ImageSets", "Segmentation")
SPLIT_FILES = {"train": "train_aug.txt", "val": "val.txt"}
IMAGE_COUNTS = {"train": 10582, "val": 1449}  # the full dataset; the data check reports deviations
PALETTE_SIZE = 256  # one colour per 8-bit label value (255 = void: (224, 224, 192))
_COLOUR_BITS = 8  # bits per colour channel


@functools.lru_cache(maxsize=1)
def _palette():
    colours = np.zeros((PALETTE_SIZE, 3), dtype=np.uint8)
    for value in range(PALETTE_SIZE):
        code, rgb = value, [0, 0, 0]
        for bit in range(_COLOUR_BITS):
            for channel in range(3):
                rgb[channel] |= ((code >> channel) & 1) << (_COLOUR_BITS - 1 - bit)
            code >>= 3
        colours[value] = rgb
    return colours


def palette():
    """VOC's standard colour map as a uint8 (256, 3) array indexed by label value (a copy).

    Label value v's bits are dealt out from the most significant colour bit down: bit 3k of v goes to red
    bit 7-k, bit 3k+1 to green bit 7-k, bit 3k+2 to blue bit 7-k (k = 0..7). Background 0 is black,
    aeroplane 1 (128, 0, 0), person 15 (192, 128, 128), void 255 (224, 224, 192), as in the dataset's PNGs.
    """
    return _palette().copy()


def list_split(data_root, split):
    """``[(id, image_path, label_path), ...]`` of ``split`` ("train" = train_aug, "val" = val) in file order."""
    check_dir(data_root, "the VOC2012 folder (with JPEGImages/, SegmentationClassAug/, ImageSets/Segmentation/)")
    image_dir = check_dir(os.path.join(data_root, IMAGE_DIR), "the VOC images folder")
    label_dir = check_dir(os.path.join(data_root, LABEL_DIR), "the augmented VOC labels folder")
    ids = read_id_list(os.path.join(data_root, SPLIT_DIR, SPLIT_FILES[split]), f"the VOC {split} list")
    return pair_files(ids, image_dir, ".jpg", label_dir, ".png")
