"""One incremental step's data: which images a step uses and what their labels mean.

* :func:`step_mask` — the overlap / disjoint image filters (spec barm-ssul-kproba §5.2, methods §3.2),
  written with the classes of the earlier steps (not BARM's ``range(1, first new class)``, which is wrong
  for shuffled orders, spec §10.17), so they are correct for any class order.
* :func:`label_lut` — a 256-entry lookup table from raw label values to training targets; the mapping is a
  named policy (``LABEL_POLICIES``) so that the conventions of other methods can be added beside BARM's.
* :class:`IncrementalSegmentation` — the dataset: decode, map through the table, joint transforms.
"""
import numpy as np
from PIL import Image

from datasets.files import read_label
from utils.errors import UserError

IGNORE = 255


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


def barm_lut(steps, step, split):
    """BARM/SSUL label mapping (spec barm-ssul-kproba §5.3).

    train / val: raw values that are not classes of the current step become background 0 (old and future
    classes included), void stays 255; then the channel order. test: the channel order only, so classes of
    later steps keep indices >= the current number of channels and the metric ignores them.
    """
    order = channel_order(steps)
    if split == "test":
        return order
    lut = np.zeros(256, dtype=np.uint8)
    current = list(steps[step])
    lut[current] = order[current]
    lut[IGNORE] = IGNORE
    return lut


LABEL_POLICIES = {"barm": barm_lut}
SPLITS = ("train", "val", "test")


def label_lut(steps, step, split, policy="barm"):
    """The 256-entry uint8 table that maps raw label values to targets for ``split`` at ``step``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if policy not in LABEL_POLICIES:
        raise UserError(f"unknown label policy '{policy}': expected one of {', '.join(LABEL_POLICIES)}")
    return LABEL_POLICIES[policy](steps, step, split)


def open_image(path):
    """Decode an RGB image; a corrupt or unreadable file is a :class:`UserError` naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"cannot decode image {path} ({err})") from None


def open_label(path, lut):
    """Decode a label PNG and map it through ``lut``; returns a mode-L image."""
    return Image.fromarray(lut[read_label(path, np.asarray)], mode="L")


class IncrementalSegmentation:
    """Map-style dataset over ``samples`` = ``[(id, image_path, label_path)]``.

    Item ``i`` is ``(image, label, id)`` after ``transform`` (see ``datasets.transforms``): with the
    standard transforms, a uint8 image tensor (3, H, W) and a uint8 label tensor (H, W) of channel indices
    with 255 = ignore; images are normalised on the device (``datasets.transforms.normalize``).
    """

    def __init__(self, samples, lut, transform):
        self.samples = list(samples)
        self.lut = np.asarray(lut, dtype=np.uint8)
        self.transform = transform

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
        image, label = self.transform(image, label)
        return image, label, image_id
