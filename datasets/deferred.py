"""Decoding and augmentation on the training device (``--device_augment``), for GPUs the CPU cannot feed.

The loader's workers do only what is cheap: read the JPEG's bytes, decode and map the label (a small PNG),
and draw the augmentation's random parameters from the image size (:meth:`datasets.transforms.Compose.plan`,
the same draws in the same order as the PIL path, so a sample seeded alike is cropped and flipped alike). The
training process then decodes the batch's JPEGs on the device (``torchvision.io.decode_jpeg``, nvJPEG on
CUDA) and applies the planned transforms to the tensors there (:meth:`Compose.apply`: resizing the image
bilinearly with antialiasing, as PIL's filter, and the maps nearest). Works on any device; it pays only where
the device is much faster than the CPU's decoding.
"""
import functools
import io
import warnings

import numpy as np
import torch
import torchvision.io as tvio
from PIL import Image

from datasets.incremental import IncrementalSegmentation, open_extra_map, open_label
from utils.errors import UserError

JPEG_MAGIC = b"\xff\xd8"


class DeferredImage:
    """An encoded image (bytes), its size and the planned parameters of its augmentation. Loader workers
    return bytes and numpy arrays, not tensors: a batch of many small tensors would cost one shared-memory
    file descriptor each."""

    def __init__(self, encoded, size, plan, path):
        self.encoded, self.size, self.plan, self.path = encoded, size, plan, path


class DeferredSegmentation(IncrementalSegmentation):
    """:class:`IncrementalSegmentation` whose items carry a :class:`DeferredImage` instead of the decoded,
    transformed image; the label and extras are decoded and mapped but not yet transformed (uint8 (H, W))."""

    def __init__(self, samples, lut, transform, extra_maps=None):
        if not getattr(transform, "deferrable", False):
            raise UserError("--device_augment: the method's training transform cannot be planned ahead; run"
                            " without --device_augment")
        super().__init__(samples, lut, transform, extra_maps)

    def __getitem__(self, i):
        image_id, image_path, label_path = self.samples[i]
        try:
            with open(image_path, "rb") as handle:
                encoded = handle.read()
            with Image.open(io.BytesIO(encoded)) as image:  # parses the header only
                size = image.size
        except (OSError, SyntaxError, ValueError) as err:
            raise UserError(f"image {image_path} cannot be decoded ({err}): expected a JPEG or PNG image") from None
        label = open_label(label_path, self.lut)
        maps = [label] + [open_extra_map(path_of(image_id), name) for name, path_of in self.extra_maps.items()]
        for path, item in zip([label_path] + [p(image_id) for p in self.extra_maps.values()], maps):
            if item.size != size:
                raise UserError(f"{path} is {item.size[0]}x{item.size[1]} but image {image_path} is {size[0]}x"
                                f"{size[1]}: expected the same size")
        plan = self.transform.plan(size)
        arrays = [np.array(m, dtype=np.uint8) for m in maps]
        image = DeferredImage(encoded, size, plan, image_path)
        return image, arrays[0], dict(zip(self.extra_maps, arrays[1:])), image_id


class DeferredBatch:
    """A collated batch of :class:`DeferredSegmentation` items (lists: the sizes differ until transformed)."""

    def __init__(self, items, transform):
        self.images = [item[0] for item in items]
        self.labels = [item[1] for item in items]
        names = list(items[0][2])
        self.extras = {name: [item[2][name] for item in items] for name in names}
        self.ids = tuple(item[3] for item in items)
        self.transform = transform

    def materialize(self, device):
        """``(images uint8 (B, 3, S, S), labels uint8 (B, S, S), extras {name: (B, ...)}, ids)`` on ``device``:
        the JPEGs decoded there, every sample transformed as planned. Extras that are per-sample scalars (a
        memory flag) are stacked as they are."""
        decoded = decode(self.images, device)
        maps_of = [name for name, values in self.extras.items() if np.ndim(values[0]) == 2]
        images, labels, extras = [], [], {name: [] for name in maps_of}
        for k, (image, item) in enumerate(zip(decoded, self.images)):
            maps = [torch.from_numpy(self.labels[k]).to(device)]
            maps += [torch.from_numpy(self.extras[name][k]).to(device) for name in maps_of]
            image, maps = self.transform.apply(item.plan, image, maps)
            images.append(image)
            labels.append(maps[0])
            for name, value in zip(maps_of, maps[1:]):
                extras[name].append(value)
        stacked = {name: torch.stack(values) for name, values in extras.items()}
        stacked.update({name: torch.stack([torch.as_tensor(v) for v in values])
                        for name, values in self.extras.items() if name not in maps_of})
        return torch.stack(images), torch.stack(labels), stacked, self.ids


def decode(images, device):
    """Decode :class:`DeferredImage` s on ``device``: JPEGs with ``torchvision.io.decode_jpeg`` (batched,
    nvJPEG on CUDA), other formats on the CPU, then moved."""
    encoded = [torch.frombuffer(bytearray(image.encoded), dtype=torch.uint8) for image in images]
    jpegs = [k for k, image in enumerate(images) if image.encoded[:2] == JPEG_MAGIC]
    out = [None] * len(images)
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image decoders in favour of TorchCodec
        warnings.simplefilter("ignore")
        if jpegs:
            decoded = tvio.decode_jpeg([encoded[k] for k in jpegs], mode=tvio.ImageReadMode.RGB, device=device)
            for k, image in zip(jpegs, decoded):
                out[k] = image
        for k, data in enumerate(encoded):
            if out[k] is None:
                out[k] = tvio.decode_image(data, mode=tvio.ImageReadMode.RGB).to(device)
    for image, item in zip(out, images):
        if (image.shape[2], image.shape[1]) != tuple(item.size):
            raise UserError(f"image {item.path} decodes to {image.shape[2]}x{image.shape[1]}, its header says"
                            f" {item.size[0]}x{item.size[1]}")
    return out


def collate(items, transform):
    return DeferredBatch(items, transform)


def deferred_collate(transform):
    """The loader's ``collate_fn`` for :class:`DeferredSegmentation` items."""
    return functools.partial(collate, transform=transform)
