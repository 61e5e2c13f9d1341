"""methods/finetune.py: FT under MiB's protocol: one parameter group, CE over all pixels of the upsampled
logits."""
import pytest
import torch
from torch import nn

from methods import get_method
from methods.base import Batch, StepContext
from network import build_model
from tests.helpers import REL, ce_px, ids, per_pixel_mean
from utils.tasks import get_task


STEPS = get_task("voc", "15-1")


CTX1 = StepContext("voc", ((0, 1, 2), (3, 4)), 1)


def test_ft_trains_everything_with_one_group():
    method = get_method("ft")  # FT under MiB's protocol (MiB argparser.py, train.py): MiB's network, CE over all pixels
    assert method.model_families == ("mib",) and not method.needs_teacher(StepContext("voc", STEPS, 1))
    model = build_model("mib_resnet18", [16, 1])
    groups = method.param_groups(model, StepContext("voc", STEPS, 1), lr=0.001)
    assert len(groups) == 1 and groups[0]["lr"] == 0.001
    assert ids(groups[0]["params"]) == ids(model.parameters())
    images, labels = torch.randn(2, 3, 33, 33), torch.randint(0, 17, (2, 33, 33))
    labels[0, :4] = 255
    loss = method.loss(model(images), None, Batch(images, labels), StepContext("voc", STEPS, 1))
    assert set(loss) == {"total", "ce"} and torch.isfinite(loss["total"])
    # the mean runs over all pixels, ignored ones included (reduction 'none' then .mean(), MiB train.py::Trainer.train)
    logits = nn.functional.interpolate(model(images)[0], size=(33, 33), mode="bilinear", align_corners=False)
    valid = nn.functional.cross_entropy(logits, labels, ignore_index=255)
    torch.testing.assert_close(loss["total"], valid * (labels != 255).float().mean(), rtol=1e-5, atol=1e-6)


def test_ft_upsamples_logits_to_the_labels():
    gen = torch.Generator().manual_seed(1)
    z, labels = torch.randn(2, 5, 2, 2, generator=gen), torch.randint(0, 5, (2, 4, 4), generator=gen)
    up = nn.functional.interpolate(z, size=(4, 4), mode="bilinear", align_corners=False)
    expected = per_pixel_mean(ce_px, up, labels)
    assert get_method("ft").loss((z, {}), None, Batch(z, labels), CTX1)["total"].item() == pytest.approx(expected,
                                                                                                        rel=REL)
