"""Cityscapes as a domain-incremental benchmark: one city per domain, the 19 official classes at every step
(PLOP dataset/cityscapes_domain.py::CityscapesSegmentationDomain; RCIL's file is the same).

``data_root`` is the Cityscapes folder, in the official layout (only ``train`` and ``val`` are read)::

    leftImg8bit/{train,val}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    gtFine/{train,val}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png      raw label ids 0..33

The pool is every training image then every validation image, each string-sorted by path (2,975 + 500); the domain
of an image is its city (:data:`CITIES`, in PLOP's id order). The images of a set of domains are split by a seeded
shuffle: :func:`domain_split`. The labels are the raw ``labelIds``, mapped to the 19 train ids by
:data:`LABEL_TO_TRAIN_ID` (cityscapesScripts' table; every other id is ignored).
"""
import os

import numpy as np

from datasets.files import check_dir
from utils.errors import UserError

NAME = "cityscapes_domain"
NUM_CLASSES = 19
IGNORE_LABEL = 255
#: channel 0 is road, a class like the others: no channel stands for "anything else" (the results' ``_nobg`` means
#: are None), every class is scored at every step
BACKGROUND_CHANNEL = False
CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
#: raw ``labelIds`` value -> train id (PLOP dataset/cityscapes_domain.py::id_to_trainid, cityscapesScripts
#: labels.py); every other value is ignored (255).
LABEL_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                     26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
#: the domains in id order (PLOP dataset/cityscapes_domain.py::city_to_id): the 18 official training cities
#: (not alphabetical), then the 3 validation cities.
CITIES = ("aachen", "bremen", "darmstadt", "erfurt", "hanover", "krefeld", "strasbourg", "tubingen", "weimar",
          "bochum", "cologne", "dusseldorf", "hamburg", "jena", "monchengladbach", "stuttgart", "ulm", "zurich",
          "frankfurt", "lindau", "munster")
#: images per city in the public gtFine release (the data check reports deviations)
CITY_COUNTS = {"aachen": 174, "bremen": 316, "darmstadt": 85, "erfurt": 109, "hanover": 196, "krefeld": 99,
               "strasbourg": 365, "tubingen": 144, "weimar": 142, "bochum": 96, "cologne": 154, "dusseldorf": 221,
               "hamburg": 248, "jena": 119, "monchengladbach": 94, "stuttgart": 196, "ulm": 95, "zurich": 122,
               "frankfurt": 267, "lindau": 59, "munster": 174}
SPLIT_FOLDERS = ("train", "val")  # read in this order; the official test/ is never read
IMAGE_COUNTS = {"train": 2975, "val": 500}
IMAGE_DIR, LABEL_DIR = "leftImg8bit", "gtFine"
IMAGE_SUFFIX = "leftImg8bit.png"
LABEL_SUFFIX = "gtFine_labelIds.png"
SHUFFLE_SEED = 1  # np.random.RandomState(1) (PLOP dataset/cityscapes_domain.py::CityscapesSegmentationDomain.__init__)
TRAIN_FRACTION = 0.8  # int(0.8 * n) images train, the rest validate / test (same function)
PALETTE_SIZE = 256
#: the official colours of the 19 classes (cityscapesScripts labels.py), indexed by train id; 255 black
CLASS_COLOURS = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
                 (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
                 (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))


def palette():
    """A uint8 (256, 3) colour array indexed by train id (a copy): the official Cityscapes colours, the rest black."""
    colours = np.zeros((PALETTE_SIZE, 3), dtype=np.uint8)
    colours[:NUM_CLASSES] = CLASS_COLOURS
    return colours


def label_table():
    """The 256-entry uint8 table from raw ``labelIds`` values to train ids (255 = ignored)."""
    table = np.full(PALETTE_SIZE, IGNORE_LABEL, dtype=np.uint8)
    for label_id, train_id in LABEL_TO_TRAIN_ID.items():
        table[label_id] = train_id
    return table


def label_name(image_name):
    """The label file of an image file: the image's name minus ``leftImg8bit.png``, plus ``gtFine_labelIds.png``
    (PLOP dataset/cityscapes_domain.py::CityscapesSegmentationDomain.__init__)."""
    return image_name[:-len(IMAGE_SUFFIX)] + LABEL_SUFFIX


def _list_folder(data_root, split):
    """``[(id, image_path, label_path, domain)]`` of one official folder ("train" or "val"), ``{city}/*`` sorted by
    ``city/name``, as PLOP's ``sorted(glob(...))`` of POSIX paths."""
    known = {city: domain for domain, city in enumerate(CITIES)}
    image_root = check_dir(os.path.join(data_root, IMAGE_DIR, split), f"the Cityscapes {split} images folder")
    label_root = check_dir(os.path.join(data_root, LABEL_DIR, split), f"the Cityscapes {split} labels folder")
    entries = []
    for city in os.listdir(image_root):
        folder = os.path.join(image_root, city)
        if not os.path.isdir(folder):
            continue
        if city not in known:
            raise UserError(f"{folder}: unknown city '{city}': expected the Cityscapes cities {', '.join(CITIES)}")
        entries += [(city, name) for name in os.listdir(folder) if name.endswith(IMAGE_SUFFIX)]
    listed = []
    for city, name in sorted(entries, key=lambda entry: f"{entry[0]}/{entry[1]}"):
        label_path = os.path.join(label_root, city, label_name(name))
        if not os.path.exists(label_path):
            raise UserError(f"image {os.path.join(image_root, city, name)} has no label: expected {label_path}")
        listed.append((name[:-len(IMAGE_SUFFIX) - 1], os.path.join(image_root, city, name), label_path, known[city]))
    return listed


def list_pool(data_root):
    """``[(id, image_path, label_path, domain)]``: every training then every validation image (PLOP
    dataset/cityscapes_domain.py::CityscapesSegmentationDomain.__init__), each folder's ``{city}/*_leftImg8bit.png``
    string-sorted by ``city/name``; the id is the image name without ``_leftImg8bit.png``. A city outside
    :data:`CITIES` or an image without its label is a :class:`UserError`."""
    check_dir(data_root, "the Cityscapes folder (with leftImg8bit/ and gtFine/)")
    pool = [entry for split in SPLIT_FOLDERS for entry in _list_folder(data_root, split)]
    if not pool:
        raise UserError(f"{os.path.join(data_root, IMAGE_DIR)} holds no {{train,val}}/CITY/*_{IMAGE_SUFFIX} images")
    return pool


def domain_split(domains_of_pool, domains, part):
    """Pool indices of the images of ``domains``, shuffled and split (PLOP
    dataset/cityscapes_domain.py::CityscapesSegmentationDomain.__init__): the ascending indices whose domain is in
    ``domains``, shuffled in place by a fresh ``np.random.RandomState(1)``; ``part`` "train" keeps the first
    ``int(0.8 * n)``, "held_out" the rest. The split is over the pooled images of all the domains at once."""
    wanted = set(domains)
    indices = [i for i, domain in enumerate(domains_of_pool) if domain in wanted]
    np.random.RandomState(SHUFFLE_SEED).shuffle(indices)
    n_train = int(TRAIN_FRACTION * len(indices))
    if part == "train":
        return indices[:n_train]
    if part == "held_out":
        return indices[n_train:]
    raise ValueError(f"part must be 'train' or 'held_out', got {part!r}")


def step_indices(domains_of_pool, task_domains, step, split, held_out_test=False):
    """Pool indices that step ``step`` of a task (``task_domains``: domain ids per step) uses for ``split``
    (PLOP run.py::get_dataset):

    * "train": the training part of the step's domains; "val": their held-out part;
    * "test" / "test_seen": the held-out part of the shuffle of **all domains of steps 0..step together** — a
      new shuffle, so for t >= 1 it holds images that earlier steps trained on (the reference's test, on which
      the published numbers were measured); ``held_out_test``: the union, in step order, of each step's own
      held-out part, which no step trains on (``--held_out_test``, part of ``--clean``).
    """
    if split == "train":
        return domain_split(domains_of_pool, task_domains[step], "train")
    if split == "val":
        return domain_split(domains_of_pool, task_domains[step], "held_out")
    if held_out_test:
        return [i for t in range(step + 1) for i in domain_split(domains_of_pool, task_domains[t], "held_out")]
    seen = [d for t in range(step + 1) for d in task_domains[t]]
    return domain_split(domains_of_pool, seen, "held_out")


def list_split(data_root, split):
    """``[(id, image_path, label_path)]`` of the official ``split`` folder ("train" or "val"), in pool order."""
    check_dir(data_root, "the Cityscapes folder (with leftImg8bit/ and gtFine/)")
    return [entry[:3] for entry in _list_folder(data_root, split)]
