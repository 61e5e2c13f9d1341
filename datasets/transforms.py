"""Joint image/label transforms with the semantics of BARM's ``ext_transforms`` (BARM utils/ext_transforms.py),
and MiB's training transform (MiB dataset/transform.py).

Every transform is called as ``transform(image, label, *extras)`` and returns ``(image, label, *extras)``:
``extras`` are per-sample 8-bit maps (SSUL's saliency, SSUL datasets/voc.py::__getitem__) that are transformed
exactly like the label (nearest resize, the same crop, padding 0, the same flip). Without extras a transform
returns ``(image, label)``; the extras never draw random numbers, so image and label are the same with or
without them for the same state of Python's ``random``.

BARM training: random scale 0.5-2.0 (image bilinear, label nearest) → pad to the crop size with 0 on both
image and label (padded label pixels are background, not ignore, as in BARM
utils/ext_transforms.py::ExtRandomCrop) → random crop → horizontal flip. MiB/PLOP/RCIL/DKD training
(:func:`mib_train_transform`): RandomResizedCrop (torchvision's algorithm, scale 0.5-2.0, aspect 3/4-4/3) →
horizontal flip. Evaluation: with ``crop_val``, resize the shorter side to the crop size then centre-crop
(both families); otherwise the full image. All randomness comes from Python's ``random`` module, as in the
references.

The transforms end with uint8 tensors: the image (3, H, W), the label and every extra map (H, W). The training
transforms can also be split (``--device_augment``): :meth:`Compose.plan` draws their random parameters from
the image size alone, in the same order, and :meth:`Compose.apply` applies them later to decoded tensors on
any device (image bilinear with antialiasing, as PIL's filter; maps nearest).
Normalisation with the ImageNet mean and std happens on the device, batched, with :func:`normalize` (the same
arithmetic as ``to_tensor`` + ``Normalize`` on the CPU, at a quarter of the host-to-device traffic).
"""
import math
import random

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SCALE_RANGE = (0.5, 2.0)
FLIP_PROBABILITY = 0.5
# MiB-family RandomResizedCrop (MiB dataset/transform.py)
RESIZED_CROP_SCALE = (0.5, 2.0)  # crop area as a fraction of the image area
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)  # crop aspect (width / height), drawn log-uniformly
RESIZED_CROP_ATTEMPTS = 10


def _maps(transform, label, extras):
    """``transform`` applied to the label and every extra map (label-like, 8-bit)."""
    return (transform(label), *(transform(extra) for extra in extras))


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, label, *extras):
        for transform in self.transforms:
            image, label, *extras = transform(image, label, *extras)
        return (image, label, *extras)

    @property
    def deferrable(self):
        """Whether every step can draw its parameters without the pixels and apply them to tensors later."""
        return all(hasattr(t, "plan") for t in self.transforms)

    def plan(self, size):
        """The random parameters of every step for an image of ``size`` = (width, height), drawn from Python's
        ``random`` in the order ``__call__`` draws them: applying them with :meth:`apply` to the decoded tensors
        gives the same geometry as ``__call__`` on the PIL images."""
        plans = []
        for transform in self.transforms:
            params, size = transform.plan(size)
            plans.append(params)
        return plans

    def apply(self, plans, image, maps):
        """The planned transform on tensors (any device): ``image`` uint8 (3, H, W), ``maps`` (label and extras)
        uint8 (H, W); returns ``(image, maps)``."""
        for transform, params in zip(self.transforms, plans):
            image, maps = transform.apply(params, image, maps)
        return image, maps


def _resize_tensors(image, maps, size):
    """Image bilinear with antialiasing (as PIL's bilinear filter), maps nearest (sampling pixel centres, as
    PIL), to ``size`` = [h, w]."""
    image = TF.resize(image, size, InterpolationMode.BILINEAR, antialias=True)
    return image, [TF.resize(m[None], size, InterpolationMode.NEAREST_EXACT)[0] for m in maps]  # as PIL's nearest


class RandomScale:
    """Scale all by ``s ~ U(lo, hi)`` to ``(int(H·s), int(W·s))`` (image bilinear, label/extras nearest)."""

    def __init__(self, scale_range=SCALE_RANGE):
        self.scale_range = scale_range

    def __call__(self, image, label, *extras):
        size, _ = self.plan(image.size)
        return (TF.resize(image, size, InterpolationMode.BILINEAR),
                *_maps(lambda m: TF.resize(m, size, InterpolationMode.NEAREST), label, extras))

    def plan(self, size):
        scale = random.uniform(*self.scale_range)
        height, width = int(size[1] * scale), int(size[0] * scale)
        return [height, width], (width, height)

    def apply(self, params, image, maps):
        return _resize_tensors(image, maps, params)


class RandomCrop:
    """Pad (if smaller) then crop ``size``×``size`` at a uniformly random position.

    As BARM: when the width is short, all four sides are padded by ``int((1 + size - w) / 2)``; then the same
    for the height; padding is 0 for image, label and extras. The crop corner is ``randint(0, h - size)``,
    ``randint(0, w - size)`` (inclusive), drawn only when the padded image is larger than the crop.
    """

    def __init__(self, size):
        self.size = size

    def __call__(self, image, label, *extras):
        (pads, corner), _ = self.plan(image.size)
        maps = (label, *extras)
        for pad in pads:
            image, maps = TF.pad(image, pad, fill=0), tuple(TF.pad(m, pad, fill=0) for m in maps)
        if corner is None:
            return (image, *maps)
        top, left = corner
        return tuple(TF.crop(x, top, left, self.size, self.size) for x in (image, *maps))

    def plan(self, size):
        """``((pads, corner), (size, size))``: the paddings applied in turn (width short, then height short, of
        the padded image) and the crop's ``(top, left)``, None when the padded image is the crop."""
        width, height = size
        pads = []
        if width < self.size:
            pads.append(int((1 + self.size - width) / 2))
            width, height = width + 2 * pads[-1], height + 2 * pads[-1]
        if height < self.size:
            pads.append(int((1 + self.size - height) / 2))
            width, height = width + 2 * pads[-1], height + 2 * pads[-1]
        corner = None
        if not (width == self.size and height == self.size):
            corner = (random.randint(0, height - self.size), random.randint(0, width - self.size))
        return (pads, corner), (self.size, self.size)

    def apply(self, params, image, maps):
        pads, corner = params
        for pad in pads:
            image = torch.nn.functional.pad(image, (pad, pad, pad, pad))
            maps = [torch.nn.functional.pad(m, (pad, pad, pad, pad)) for m in maps]
        if corner is not None:
            top, left = corner
            image = image[:, top:top + self.size, left:left + self.size]
            maps = [m[top:top + self.size, left:left + self.size] for m in maps]
        return image, maps


class RandomHorizontalFlip:
    def __init__(self, p=FLIP_PROBABILITY):
        self.p = p

    def __call__(self, image, label, *extras):
        flip, _ = self.plan(image.size)
        if flip:
            return tuple(TF.hflip(x) for x in (image, label, *extras))
        return (image, label, *extras)

    def plan(self, size):
        return random.random() < self.p, size

    def apply(self, flip, image, maps):
        if flip:
            return image.flip(-1), [m.flip(-1) for m in maps]
        return image, maps


def resized_crop_box(width, height, scale=RESIZED_CROP_SCALE, ratio=RESIZED_CROP_RATIO,
                     attempts=RESIZED_CROP_ATTEMPTS):
    """``(top, left, h, w)`` of torchvision's RandomResizedCrop box in a ``width``×``height`` image, drawn
    with Python's ``random`` (MiB dataset/transform.py).

    Up to ``attempts`` times: area ``A = W·H·U(scale)``, aspect ``r = exp(U(log ratio))``,
    ``w = round(√(A·r))``, ``h = round(√(A/r))``; the first box with ``0 < w <= W`` and ``0 < h <= H`` is
    taken at ``top = randint(0, H - h)``, ``left = randint(0, W - w)`` (inclusive). So area fractions above 1
    are always rejected. Fallback (no attempt fits): a centred box, the whole image if ``W/H`` lies within
    ``ratio``, else the largest box of the clamped aspect: ``w = W, h = round(W / min(ratio))`` when the
    image is too tall, ``h = H, w = round(H · max(ratio))`` when too wide; ``top = (H - h) // 2``,
    ``left = (W - w) // 2``.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return random.randint(0, height - h), random.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class RandomResizedCrop:
    """MiB-family crop (MiB dataset/transform.py): the box of :func:`resized_crop_box`, resized to ``size``×``size``
    (image bilinear, label and extras nearest)."""

    def __init__(self, size, scale=RESIZED_CROP_SCALE, ratio=RESIZED_CROP_RATIO):
        self.size, self.scale, self.ratio = size, scale, ratio

    def __call__(self, image, label, *extras):
        (top, left, h, w), _ = self.plan(image.size)
        size = [self.size, self.size]
        return (TF.resized_crop(image, top, left, h, w, size, InterpolationMode.BILINEAR),
                *_maps(lambda m: TF.resized_crop(m, top, left, h, w, size, InterpolationMode.NEAREST),
                       label, extras))

    def plan(self, size):
        return resized_crop_box(size[0], size[1], self.scale, self.ratio), (self.size, self.size)

    def apply(self, box, image, maps):
        top, left, h, w = box
        image, maps = image[:, top:top + h, left:left + w], [m[top:top + h, left:left + w] for m in maps]
        return _resize_tensors(image, maps, [self.size, self.size])


class Resize:
    """Shorter side to ``size``, the longer one to ``int(size · long / short)`` (label/extras nearest)."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image, label, *extras):
        return (TF.resize(image, self.size, InterpolationMode.BILINEAR),
                *_maps(lambda m: TF.resize(m, self.size, InterpolationMode.NEAREST), label, extras))


class CenterCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, image, label, *extras):
        return tuple(TF.center_crop(x, self.size) for x in (image, label, *extras))


class ToUint8Tensor:
    """PIL image → uint8 (3, H, W) tensor; PIL label and extras → uint8 (H, W) tensors."""

    def __call__(self, image, label, *extras):
        image = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return (image, *(torch.from_numpy(np.array(m, dtype=np.uint8)) for m in (label, *extras)))

    def plan(self, size):
        return None, size

    def apply(self, params, image, maps):
        return image, maps


def train_transform(crop_size):
    """BARM/SSUL/KProBA training transform (BARM datasets/init_dataset.py::get_dataset)."""
    return Compose([RandomScale(), RandomCrop(crop_size), RandomHorizontalFlip(), ToUint8Tensor()])


def mib_train_transform(size):
    """MiB/PLOP/RCIL/DKD training transform (MiB run.py::get_dataset, DKD data_loader/custom_transforms.py):
    RandomResizedCrop(size, scale 0.5-2.0, aspect 3/4-4/3) → horizontal flip 0.5. Their evaluation transform
    is ``eval_transform(size, True)``."""
    return Compose([RandomResizedCrop(size), RandomHorizontalFlip(), ToUint8Tensor()])


def eval_transform(crop_size, crop_val):
    """``crop_val``: resize + centre crop to ``crop_size``; otherwise the full image (batch size 1)."""
    if crop_val:
        return Compose([Resize(crop_size), CenterCrop(crop_size), ToUint8Tensor()])
    return Compose([ToUint8Tensor()])


def normalize(images, mean=MEAN, std=STD):
    """uint8 (B, 3, H, W) on any device → float32, scaled to [0, 1] and normalised per channel."""
    images = images.float().div_(255.0)
    mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return images.sub_(mean).div_(std)
