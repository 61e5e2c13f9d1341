"""datasets/deferred.py (--device_augment): the workers plan, the device decodes and transforms. Seeded
alike, a sample gets the same crop, scale and flip as on the PIL path; the pixels differ only by the resampling kernels
(PIL's bilinear filter vs torchvision's antialiased one, nearest-neighbour rounding), so the statistics agree."""
import random

import numpy as np
import pytest
import torch

from datasets import step_samples
from datasets.deferred import DeferredSegmentation, deferred_collate
from datasets.incremental import IncrementalSegmentation
from datasets.transforms import mib_train_transform, train_transform
from methods.barm import barm_lut
from utils.errors import UserError
from utils.tasks import get_task


STEPS = get_task("voc", "15-1")
SEEDS = range(24)


def both_paths(data_root, transform):
    """(PIL path, device path on the CPU) outputs for every seed, on the step-0 training images."""
    samples = step_samples("voc", data_root, STEPS, 0, True)[:len(SEEDS)]
    lut = barm_lut(STEPS, 0, "train")
    pil = IncrementalSegmentation(samples, lut, transform)
    deferred = DeferredSegmentation(samples, lut, transform)
    collate = deferred_collate(transform)
    outputs = []
    for seed, index in zip(SEEDS, range(len(samples))):
        random.seed(seed)
        image, label, _, _ = pil[index]
        random.seed(seed)
        images, labels, _, _ = collate([deferred[index]]).materialize(torch.device("cpu"))
        outputs.append((image, label, images[0], labels[0]))
    return outputs


@pytest.mark.parametrize("make", [train_transform, mib_train_transform], ids=["barm", "mib"])
def test_same_geometry_and_statistics_as_the_pil_path(tiny_voc, make):
    outputs = both_paths(tiny_voc, make(49))
    agreement, differences = [], []
    for image, label, device_image, device_label in outputs:
        assert device_image.shape == image.shape == (3, 49, 49) and device_image.dtype == torch.uint8
        assert device_label.shape == label.shape
        agreement.append((device_label == label).float().mean().item())
        differences.append((device_image.float() - image.float()).abs().mean().item())
    assert np.mean(agreement) > 0.97 and min(agreement) > 0.9  # same crops and flips; nearest rounding aside
    assert np.mean(differences) < 4.0  # grey levels: the resampling kernels
    pil_images = torch.stack([o[0] for o in outputs]).float()
    device_images = torch.stack([o[2] for o in outputs]).float()
    assert abs(pil_images.mean() - device_images.mean()) < 1.0
    assert abs(pil_images.std() - device_images.std()) < 1.5
    for value in (0, 255):  # padded background and void borders: the same shares of pixels
        pil_share = np.mean([(o[1] == value).float().mean().item() for o in outputs])
        device_share = np.mean([(o[3] == value).float().mean().item() for o in outputs])
        assert abs(pil_share - device_share) < 0.02


def test_a_transform_without_a_plan_is_refused(tiny_voc):
    samples = step_samples("voc", tiny_voc, STEPS, 0, True)[:2]
    with pytest.raises(UserError, match="--device_augment"):
        DeferredSegmentation(samples, barm_lut(STEPS, 0, "train"), lambda image, label: (image, label))
