"""One incremental step's data: which images a step uses and what their labels mean.

* :func:`step_mask` — the overlap / disjoint image filters (BARM utils/tasks.py::get_dataset_list, MiB
  dataset/utils.py::filter_images), written with the classes of the earlier steps (not BARM's
  ``range(1, first new class)``, which is wrong for shuffled orders; docs/differences.md), so they are
  correct for any class order.
* :func:`label_lut` — a 256-entry lookup table from raw label values to training targets; the mapping is a
  label policy, a function ``(steps, step, split) -> table`` that each method defines (``Method.label_policy``).
* :class:`IncrementalSegmentation` — the dataset: decode, map through the table, joint transforms of the
  image, the label and the method's extra per-sample maps (SSUL's saliency).
"""
import os

import numpy as np
from PIL import Image

from datasets.files import read_label
from utils.errors import UserError

IGNORE = 255
LUT_SIZE = 256
# label splits a policy maps: "train" / "val" (the step's classes), "test" (every class, channel order),
# "memory" (SSUL-M's memory samples: current and previous classes)
SPLITS = ("train", "val", "test", "memory")


def step_mask(index, steps, step, overlap):
    """Boolean mask over ``index`` of the images step ``step`` trains on.

    Overlap: the image contains at least one class introduced at ``step``. Disjoint: additionally every
    value it contains is background, void, or a class of steps 0..step (no future class visible).
    Background (0) never selects an image, so step 0 ignores images with nothing but background.
    """
    new = [c for c in steps[step] if c != 0]
    mask = index.contains_any(new)
    if not overlap:
        seen = {c for s in steps[:step + 1] for c in s}
        mask &= index.contains_only(seen | {0, IGNORE})
    return mask


def channel_order(steps):
    """Position of each class in the model's channels (the concatenation of the steps), 255 elsewhere."""
    order = np.full(256, IGNORE, dtype=np.uint8)
    for position, c in enumerate(c for s in steps for c in s):
        order[c] = position
    return order


def label_lut(steps, step, split, policy, values=None):
    """The 256-entry uint8 table that maps raw label values to targets for ``split`` (one of ``SPLITS``) at
    ``step``: ``policy(steps, step, split)``, a method's label policy (``Method.label_policy``), checked. With
    ``values`` (a :class:`datasets.class_index.LabelValues`: the label files hold the values of a description,
    not class ids), a file's value ``v`` becomes ``policy_table[values.table[v]]``: first its class id (the
    ignore value: 255), then the policy's target."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    lut = np.asarray(policy(steps, step, split))
    if lut.shape != (LUT_SIZE,) or lut.min() < 0 or lut.max() >= LUT_SIZE:
        raise ValueError(f"label policy {policy!r} returned a table of shape {lut.shape}: expected"
                         f" {LUT_SIZE} values in 0..{LUT_SIZE - 1}")
    if values is not None:
        lut = lut[np.asarray(values.table)]
    return lut.astype(np.uint8)


def open_image(path):
    """Decode an RGB image; an empty, corrupt or unreadable file is a :class:`UserError` naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        size = os.path.getsize(path) if os.path.exists(path) else None
        what = "is empty (0 bytes)" if size == 0 else f"cannot be decoded ({err})"
        raise UserError(f"image {path} {what}: expected a JPEG or PNG image") from None


def open_label(path, lut):
    """Decode a label PNG and map it through ``lut``; returns a mode-L image."""
    return Image.fromarray(lut[read_label(path, np.asarray)], mode="L")


EIGHT_BIT_MODES = ("L", "P", "1", "LA", "RGB", "RGBA")  # read as their 8-bit luminance


def open_extra_map(path, name):
    """Decode the 8-bit PNG of the extra map ``name`` (e.g. a saliency map) as a mode-L image; a missing,
    undecodable or not 8-bit file is a :class:`UserError` naming it."""
    expected = f"an 8-bit PNG {name} map for every image"
    try:
        with Image.open(path) as image:
            if image.mode not in EIGHT_BIT_MODES:
                raise UserError(f"{name} map {path} has image mode {image.mode}: expected {expected}")
            return image.convert("L") if image.mode != "L" else image.copy()
    except FileNotFoundError:
        raise UserError(f"{name} map {path} is missing: expected {expected}") from None
    except UserError:
        raise
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"cannot decode {name} map {path} ({err}): expected {expected}") from None


class IncrementalSegmentation:
    """Map-style dataset over ``samples`` = ``[(id, image_path, label_path)]``.

    Item ``i`` is ``(image, label, extras, id)`` after ``transform`` (see ``datasets.transforms``): with the
    standard transforms, a uint8 image tensor (3, H, W), a uint8 label tensor (H, W) of channel indices
    with 255 = ignore, and ``extras`` = ``{name: uint8 tensor (H, W)}``, one per entry of ``extra_maps``
    (``{name: image_id -> path of an 8-bit PNG}``, e.g. SSUL's saliency), each transformed exactly like the
    label (nearest resize, the same crop, padding 0, flip); ``{}`` without extra maps (``default_collate``
    keeps it ``{}``). Images are normalised on the device (``datasets.transforms.normalize``).
    """

    def __init__(self, samples, lut, transform, extra_maps=None):
        self.samples = list(samples)
        self.lut = np.asarray(lut, dtype=np.uint8)
        self.transform = transform
        self.extra_maps = dict(extra_maps or {})

    def __len__(self):
        return len(self.samples)

    @property
    def ids(self):
        return [s[0] for s in self.samples]

    def __getitem__(self, i):
        image_id, image_path, label_path = self.samples[i]
        image = open_image(image_path)
        label = open_label(label_path, self.lut)
        if image.size != label.size:
            raise UserError(f"image {image_path} is {image.size[0]}x{image.size[1]} but its label {label_path}"
                            f" is {label.size[0]}x{label.size[1]}: expected the same size")
        extras = {name: open_extra_map(path_of(image_id), name) for name, path_of in self.extra_maps.items()}
        for name, extra in extras.items():
            if extra.size != image.size:
                raise UserError(f"{name} map {self.extra_maps[name](image_id)} is {extra.size[0]}x"
                                f"{extra.size[1]} but image {image_path} is {image.size[0]}x{image.size[1]}:"
                                f" expected the same size")
        image, label, *maps = self.transform(image, label, *extras.values())
        return image, label, dict(zip(extras, maps)), image_id
