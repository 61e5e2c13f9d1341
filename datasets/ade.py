"""ADE20K SceneParsing-150 (BARM datasets/ade.py, MiB dataset/ade.py::AdeSegmentationIncremental).

``data_root`` is the ``ADEChallengeData2016`` folder::

    images/{training,validation}/{id}.jpg
    annotations/{training,validation}/{id}.png     labels 0..150, 0 = "other" (scored as background)

The file list of a split is the sorted list of image names (20,210 training / 2,000 validation).
"""
import functools
import itertools
import os

import numpy as np

from datasets.files import check_dir, list_stems, pair_files

NAME = "ade"
NUM_CLASSES = 151
IGNORE_LABEL = 255
CLASS_NAMES = (
    "other", "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car",
    "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat",
    "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column",
    "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
    "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
SPLIT_FOLDERS = {"train": "training", "val": "validation"}
IMAGE_COUNTS = {"train": 20210, "val": 2000}
PALETTE_SIZE = 256  # one colour per 8-bit label value
VOID_COLOUR = (224, 224, 192)  # value 255, as in VOC's colour map
RESERVED_COLOURS = ((255, 255, 255), VOID_COLOUR)  # panel background and void: no class gets a colour near them
PALETTE_LEVELS = 8  # candidate colours: an 8 x 8 x 8 grid over RGB


@functools.lru_cache(maxsize=1)
def _palette():
    levels = np.round(np.linspace(0, 255, PALETTE_LEVELS))
    candidates = np.array(list(itertools.product(levels, repeat=3)))  # black first
    spacing = levels[1] - levels[0]
    reserved = np.array(RESERVED_COLOURS, dtype=np.float64)
    far = np.sqrt(((candidates[:, None] - reserved[None]) ** 2).sum(-1)).min(axis=1) >= spacing
    candidates = candidates[far]
    chosen = [0]
    nearest = np.sqrt(((candidates - candidates[0]) ** 2).sum(-1))
    for _ in range(1, NUM_CLASSES):
        pick = int(np.argmax(nearest))  # the first of the candidates farthest from every chosen colour
        chosen.append(pick)
        nearest = np.minimum(nearest, np.sqrt(((candidates - candidates[pick]) ** 2).sum(-1)))
    colours = np.zeros((PALETTE_SIZE, 3), dtype=np.uint8)
    colours[:NUM_CLASSES] = candidates[chosen]
    colours[PALETTE_SIZE - 1] = VOID_COLOUR
    return colours


def palette():
    """A uint8 (256, 3) colour array indexed by label value (a copy): 0 "other" black, 1..150 distinct colours,
    255 void as in VOC, the rest black (no label takes them).

    ADE20K's official 150 colours are a fixed list that ciss does not ship; this palette is generated instead,
    deterministically: from an 8x8x8 grid over RGB (levels round(255·i/7)), minus the colours closer than one
    grid step to white or to void, each class in turn takes the first candidate farthest (Euclidean, RGB) from
    the colours already taken, starting from black. Any two classes differ by at least one grid step (36).
    """
    return _palette().copy()


def list_split(data_root, split):
    """``[(id, image_path, label_path), ...]`` of ``split`` ("train" / "val"), sorted by file name."""
    check_dir(data_root, "the ADEChallengeData2016 folder (with images/ and annotations/)")
    folder = SPLIT_FOLDERS[split]
    image_dir = check_dir(os.path.join(data_root, "images", folder), f"the ADE {folder} images folder")
    label_dir = check_dir(os.path.join(data_root, "annotations", folder), f"the ADE {folder} annotations folder")
    return pair_files(list_stems(image_dir, ".jpg"), image_dir, ".jpg", label_dir, ".png")
