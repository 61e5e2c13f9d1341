"""A dataset of the user's own: a folder of images and label maps described by a small JSON file.

``data_root`` holds ``dataset.json`` and the files it names::

    DIR/dataset.json
    DIR/images/{id}.jpg                 (``images``, ``image_ext``)
    DIR/labels/{id}.png                 (``labels``, ``label_ext``): 8-bit single-channel PNGs of label ids
    DIR/train.txt, DIR/val.txt          optional (``train_list``, ``val_list``): one image id per line

``dataset.json``::

    {"name": "streets",
     "classes": [{"id": 0, "name": "background"}, {"id": 3, "name": "car"}, {"id": 7, "name": "bike"}],
     "ignore_index": 255, "background": 0,
     "images": "images", "labels": "labels", "image_ext": ".jpg", "label_ext": ".png",
     "train_list": "train.txt", "val_list": "val.txt", "split_seed": 0, "val_fraction": 0.2}

Only ``classes`` is required; the others default to the values above (no lists: a seeded split, see
:func:`seeded_split`). The label ids in the files may be any distinct values 0..255 other than the ignore value
(``ignore_index``, or ``null`` for none): ciss numbers the classes contiguously, as its convention requires
(class 0 = background, 255 = ignored, see :func:`class_order`):

* with a background (``"background": <its label id>``): class 0 is the background, classes 1..N-1 the other
  entries of ``classes`` in the order they are listed;
* without (``"background": null``): class 0 is a reserved background channel that no pixel is labelled with
  (every method has a channel 0: the pixels a step does not label, old and future classes, go there during
  training), and classes 1..N are the entries of ``classes`` in the order listed. The test scores channel 0
  like any class; ``mIoU_nobg`` in the results leaves it out (docs/data.md).

Class ids in ``--task_file`` orders and ``X-Y`` task names count these contiguous ids (``python -m
datasets.check --dataset custom --data_root DIR`` prints the table). The label values are mapped through
:attr:`CustomLayout.LABEL_MAP` when a label is read (the class index and the label lookup tables); a value the
description does not list is a :class:`UserError` naming the file.
"""
import functools
import hashlib
import json
import os

import numpy as np

from datasets.voc import palette as voc_palette
from datasets.class_index import LABEL_VALUES, LabelValues
from datasets.files import check_dir, list_stems, pair_files, read_id_list
from utils.errors import UserError

NAME = "custom"
DESCRIPTION_FILE = "dataset.json"
IGNORE = 255  # the ignore value after remapping (ciss's convention), whatever the files use
BACKGROUND_NAME = "background"  # the name of the reserved channel 0 of a dataset without background
DEFAULTS = {"name": NAME, "ignore_index": 255, "background": 0, "images": "images", "labels": "labels",
            "image_ext": ".jpg", "label_ext": ".png", "train_list": None, "val_list": None, "split_seed": 0,
            "val_fraction": 0.2}
KEYS = ("classes",) + tuple(DEFAULTS)
MAX_CLASSES = IGNORE  # class ids 0..254: 255 is the ignore value
SPLITS = ("train", "val")


def description_path(data_root):
    return os.path.join(data_root, DESCRIPTION_FILE)


def _fail(path, message):
    raise UserError(f"{path}: {message}")


def _label_id(path, value, what):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < LABEL_VALUES:
        _fail(path, f"{what} is {value!r}: expected a label value 0..{LABEL_VALUES - 1} (8-bit PNG labels)")
    return value


def _text(path, content, key):
    value = content[key]
    if not isinstance(value, str) or not value.strip():
        _fail(path, f'"{key}" is {value!r}: expected a non-empty string')
    return value


def parse_description(path, content):
    """The checked settings of a description (the JSON ``content`` of the file ``path``) as a dict: ``classes``
    as ``[(label id, name)]`` in the listed order, and every key of :data:`DEFAULTS`. Every problem is a
    :class:`UserError` naming the file."""
    if not isinstance(content, dict):
        _fail(path, "expected a JSON object with at least \"classes\"")
    unknown = sorted(set(content) - set(KEYS))
    if unknown:
        _fail(path, f"unknown keys {unknown}: expected some of {list(KEYS)}")
    if "classes" not in content:
        _fail(path, 'no "classes": expected a list of {"id": label value, "name": class name}')
    settings = {**DEFAULTS, **content}
    classes = settings["classes"]
    if not isinstance(classes, list) or not classes:
        _fail(path, '"classes" must be a non-empty list of {"id": label value, "name": class name}')
    parsed = []
    for entry in classes:
        if not isinstance(entry, dict) or set(entry) != {"id", "name"}:
            _fail(path, f'class entry {entry!r}: expected {{"id": label value, "name": class name}}')
        if not isinstance(entry["name"], str) or not entry["name"].strip():
            _fail(path, f"class entry {entry!r}: expected a non-empty name")
        parsed.append((_label_id(path, entry["id"], f"the id of class {entry['name']!r}"), entry["name"].strip()))
    for position, what in ((0, "id"), (1, "name")):
        values = [c[position] for c in parsed]
        repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
        if repeated:
            _fail(path, f"duplicate class {what}s {repeated}: expected each class once")
    ids = [c[0] for c in parsed]
    if settings["ignore_index"] is not None:
        ignore = _label_id(path, settings["ignore_index"], '"ignore_index"')
        if ignore in ids:
            _fail(path, f'"ignore_index" {ignore} is also the id of class {dict(parsed)[ignore]!r}: expected a value'
                        f" no class uses (or null)")
    background = settings["background"]
    if background is not None:
        _label_id(path, background, '"background"')
        if background not in ids:
            _fail(path, f'"background" is {background}, which no class has as id: expected the id of the'
                        f" background class, or null")
    elif BACKGROUND_NAME in [c[1] for c in parsed]:
        _fail(path, f'"background" is null but a class is named {BACKGROUND_NAME!r}: give its id as "background"')
    if len(parsed) + (background is None) > MAX_CLASSES:
        _fail(path, f"{len(parsed)} classes: expected at most {MAX_CLASSES - (background is None)}")
    for key in ("name", "images", "labels", "image_ext", "label_ext"):
        _text(path, settings, key)
    lists = [settings[k] for k in ("train_list", "val_list")]
    if (lists[0] is None) != (lists[1] is None):
        _fail(path, '"train_list" and "val_list" go together: give both, or neither for a seeded split')
    for key, value in zip(("train_list", "val_list"), lists):
        if value is not None:
            _text(path, settings, key)
    seed = settings["split_seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        _fail(path, f'"split_seed" is {seed!r}: expected an integer >= 0')
    fraction = settings["val_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        _fail(path, f'"val_fraction" is {fraction!r}: expected a number between 0 and 1 (exclusive)')
    settings["classes"] = parsed
    return settings


def class_order(classes, background):
    """The label id of every class id (contiguous, channel 0 first): the background's id (None: the reserved
    channel of a dataset without background), then the other classes' ids in the listed order."""
    others = [label for label, _ in classes if label != background]
    return [background] + others


def label_table(order, ignore_index):
    """The 256-entry uint8 table from label values in the files to class ids: ``order[k]`` → k, the ignore value
    → 255; values the description does not list → 255 too (they are refused before the table is used)."""
    table = np.full(LABEL_VALUES, IGNORE, dtype=np.uint8)
    for class_id, label in enumerate(order):
        if label is not None:
            table[label] = class_id
    if ignore_index is not None:
        table[ignore_index] = IGNORE
    return table


def seeded_split(ids, seed, val_fraction):
    """``(train ids, val ids)`` of a folder without lists, each in the order of ``ids``: the images are ranked by
    the SHA-256 of ``"{seed}/{id}"`` (hex digest) and the first ``round(val_fraction * n)`` (at least 1, at most
    n - 1) go to validation. An image's split depends only on the seed, its id and how many images there are
    ranked before it, not on the file system's order."""
    if len(ids) < 2:
        raise UserError(f"{len(ids)} image(s): a seeded split needs at least 2 (one to train, one to validate)")
    n_val = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}/{i}".encode()).hexdigest())
    val = set(ranked[:n_val])
    return [i for i in ids if i not in val], [i for i in ids if i in val]


class CustomLayout:
    """The layout of one described folder, with the attributes of the ``datasets.voc`` / ``datasets.ade`` modules
    (``NAME``, ``NUM_CLASSES``, ``IGNORE_LABEL``, ``CLASS_NAMES``, ``IMAGE_COUNTS``, :meth:`palette`,
    :meth:`list_split`) and, for the label files, ``LABEL_VALUES`` (a
    :class:`datasets.class_index.LabelValues`: the table to class ids, the values allowed, the description's
    digest) and ``CHECK_ALL_SPLITS`` (every file is checked before a step starts: ``datasets.check_data``)."""

    IGNORE_LABEL = IGNORE
    IMAGE_COUNTS = None  # no full dataset to compare with
    CHECK_ALL_SPLITS = True

    def __init__(self, data_root, settings, digest):
        self.data_root, self.settings, self.path = data_root, settings, description_path(data_root)
        self.NAME = NAME
        self.DATASET_NAME = settings["name"]
        classes, background = settings["classes"], settings["background"]
        self.ORDER = class_order(classes, background)
        names = dict(classes)
        self.CLASS_NAMES = tuple(BACKGROUND_NAME if label is None else names[label] for label in self.ORDER)
        self.NUM_CLASSES = len(self.ORDER)
        self.LABEL_MAP = label_table(self.ORDER, settings["ignore_index"])
        allowed = [label for label in self.ORDER if label is not None]
        if settings["ignore_index"] is not None:
            allowed.append(settings["ignore_index"])
        self.LABEL_VALUES = LabelValues(self.LABEL_MAP, tuple(sorted(allowed)), self.path, digest)

    def palette(self):
        """VOC's colour map, indexed by class id (``datasets.voc.palette``)."""
        return voc_palette()

    def _folder(self, key, what):
        return check_dir(os.path.join(self.data_root, self.settings[key]), f"{what} ({self.path}: \"{key}\")")

    def split_ids(self, split):
        """The image ids of ``split``: its list file, else the seeded split of the images folder."""
        settings = self.settings
        if settings["train_list"] is not None:
            key = f"{split}_list"
            return read_id_list(os.path.join(self.data_root, settings[key]),
                                f"the {split} list of {self.path} (\"{key}\"): one image id per line")
        image_dir = self._folder("images", "the images folder")
        ids = list_stems(image_dir, settings["image_ext"])
        return seeded_split(ids, settings["split_seed"], settings["val_fraction"])[SPLITS.index(split)]

    def list_split(self, data_root, split):
        """``[(id, image_path, label_path), ...]`` of ``split`` ("train" / "val") in list (or sorted) order; a
        listed image without its image or label file is a UserError naming the file."""
        if os.path.abspath(data_root) != os.path.abspath(self.data_root):
            raise ValueError(f"this layout describes {self.data_root}, not {data_root}")
        image_dir = self._folder("images", "the images folder")
        label_dir = self._folder("labels", "the labels folder")
        ids = self.split_ids(split)
        repeated = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
        if repeated:
            raise UserError(f"the {split} list of {self.path} names image {repeated[0]} more than once")
        return pair_files(ids, image_dir, self.settings["image_ext"], label_dir, self.settings["label_ext"])


def read_description(data_root):
    """``(settings, digest)`` of ``{data_root}/dataset.json``; a missing or malformed file is a UserError."""
    check_dir(data_root, f"a dataset folder with {DESCRIPTION_FILE}")
    path = description_path(data_root)
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        content = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing: expected the dataset description (docs/data.md, \"A dataset of your"
                        f" own\")") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path} ({err}): expected a JSON dataset description") from None
    return parse_description(path, content), hashlib.sha1(raw).hexdigest()


@functools.lru_cache(maxsize=8)
def _load(data_root, size, mtime_ns):
    settings, digest = read_description(data_root)
    return CustomLayout(data_root, settings, digest)


def load(data_root):
    """The :class:`CustomLayout` of ``data_root`` (read again whenever ``dataset.json`` changes)."""
    if data_root is None:
        raise UserError(f"the custom dataset is described by its folder: give --data_root DIR (with"
                        f" {DESCRIPTION_FILE})")
    data_root = os.path.abspath(data_root)
    try:
        stat = os.stat(description_path(data_root))
        key = (stat.st_size, stat.st_mtime_ns)
    except OSError:
        key = (None, None)  # read_description says what is missing
    if key == (None, None):
        return CustomLayout(data_root, *read_description(data_root))
    return _load(data_root, *key)
