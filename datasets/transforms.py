"""Joint image/label transforms with the semantics of BARM's ``ext_transforms`` (spec barm-ssul-kproba §5.4).

Training: random scale 0.5-2.0 (image bilinear, label nearest) → pad to the crop size with 0 on both image
and label (padded label pixels are background, not ignore: spec §10.7) → random crop → horizontal flip.
Evaluation: with ``crop_val``, resize the shorter side to the crop size then centre-crop; otherwise the full
image. All randomness comes from Python's ``random`` module, as in the reference.

The transforms end with uint8 tensors: the image (3, H, W) and the label (H, W). Normalisation with the
ImageNet mean and std happens on the device, batched, with :func:`normalize` (the same arithmetic as
``to_tensor`` + ``Normalize`` on the CPU, at a quarter of the host-to-device traffic).
"""
import random

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SCALE_RANGE = (0.5, 2.0)
FLIP_PROBABILITY = 0.5


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, label):
        for transform in self.transforms:
            image, label = transform(image, label)
        return image, label


class RandomScale:
    """Scale both by ``s ~ U(lo, hi)`` to ``(int(H·s), int(W·s))``."""

    def __init__(self, scale_range=SCALE_RANGE):
        self.scale_range = scale_range

    def __call__(self, image, label):
        scale = random.uniform(*self.scale_range)
        size = (int(image.size[1] * scale), int(image.size[0] * scale))
        return (TF.resize(image, size, InterpolationMode.BILINEAR),
                TF.resize(label, size, InterpolationMode.NEAREST))


class RandomCrop:
    """Pad (if smaller) then crop ``size``×``size`` at a uniformly random position.

    As BARM: when the width is short, all four sides are padded by ``int((1 + size - w) / 2)``; then the same
    for the height; padding is 0 for image and label. The crop corner is ``randint(0, h - size)``,
    ``randint(0, w - size)`` (inclusive), drawn only when the padded image is larger than the crop.
    """

    def __init__(self, size):
        self.size = size

    def __call__(self, image, label):
        if image.size[0] < self.size:
            pad = int((1 + self.size - image.size[0]) / 2)
            image, label = TF.pad(image, pad, fill=0), TF.pad(label, pad, fill=0)
        if image.size[1] < self.size:
            pad = int((1 + self.size - image.size[1]) / 2)
            image, label = TF.pad(image, pad, fill=0), TF.pad(label, pad, fill=0)
        width, height = image.size
        if width == self.size and height == self.size:
            return image, label
        top = random.randint(0, height - self.size)
        left = random.randint(0, width - self.size)
        return (TF.crop(image, top, left, self.size, self.size),
                TF.crop(label, top, left, self.size, self.size))


class RandomHorizontalFlip:
    def __init__(self, p=FLIP_PROBABILITY):
        self.p = p

    def __call__(self, image, label):
        if random.random() < self.p:
            return TF.hflip(image), TF.hflip(label)
        return image, label


class Resize:
    """Shorter side to ``size``, the longer one to ``int(size · long / short)``."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image, label):
        return (TF.resize(image, self.size, InterpolationMode.BILINEAR),
                TF.resize(label, self.size, InterpolationMode.NEAREST))


class CenterCrop:
    def __init__(self, size):
        self.size = size

    def __call__(self, image, label):
        return TF.center_crop(image, self.size), TF.center_crop(label, self.size)


class ToUint8Tensor:
    """PIL image → uint8 (3, H, W) tensor; PIL label → uint8 (H, W) tensor."""

    def __call__(self, image, label):
        image = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return image, torch.from_numpy(np.array(label, dtype=np.uint8))


def train_transform(crop_size):
    return Compose([RandomScale(), RandomCrop(crop_size), RandomHorizontalFlip(), ToUint8Tensor()])


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
