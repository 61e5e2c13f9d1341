"""ADE20K SceneParsing-150 (spec barm-ssul-kproba §5.1, methods §3.1).

``data_root`` is the ``ADEChallengeData2016`` folder::

    images/{training,validation}/{id}.jpg
    annotations/{training,validation}/{id}.png     labels 0..150, 0 = "other" (scored as background)

The file list of a split is the sorted list of image names (20,210 training / 2,000 validation).
"""
import os

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


def list_split(data_root, split):
    """``[(id, image_path, label_path), ...]`` of ``split`` ("train" / "val"), sorted by file name."""
    check_dir(data_root, "the ADEChallengeData2016 folder (with images/ and annotations/)")
    folder = SPLIT_FOLDERS[split]
    image_dir = check_dir(os.path.join(data_root, "images", folder), f"the ADE {folder} images folder")
    label_dir = check_dir(os.path.join(data_root, "annotations", folder), f"the ADE {folder} annotations folder")
    return pair_files(list_stems(image_dir, ".jpg"), image_dir, ".jpg", label_dir, ".png")
