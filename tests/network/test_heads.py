"""network/heads.py: classifier heads, BARM's background combination (BARM
network/_deeplab.py::DeepLabHeadBgA), initialisation, add_step."""
import math

import pytest
import torch
from torch import nn

from network import build_model
from network.aspp import ATROUS_RATES
from network.heads import BackgroundAdaptationHead, IncrementalHead, SSULHead
from utils.errors import UserError


IN_CHANNELS = 8
BATCH, SIZE = 2, 5


def constant_bga_head(biases):
    """A BARM head whose k-th 1x1 head outputs the constants ``biases[k]`` everywhere (weights zero)."""
    classes_per_step = [len(biases[0])] + [len(b) - 1 for b in biases[1:]]
    head = BackgroundAdaptationHead(IN_CHANNELS, classes_per_step, ATROUS_RATES[16])
    with torch.no_grad():
        for conv, values in zip(head.head, biases):
            conv.weight.zero_()
            conv.bias.copy_(torch.tensor(values))
    return head


# Z_0 = [b_0 = 0.5, 1, 2]; Z_1 = [r_1 = -0.3, 11]; Z_2 = [r_2 = 0.4, 21]; Z_3 = [r_3 = 0.7, 31, 32].
BIASES = [[0.5, 1.0, 2.0], [-0.3, 11.0], [0.4, 21.0], [0.7, 31.0, 32.0]]


@pytest.mark.parametrize("mode, background", [
    ("train", 0.5 + -0.3 + 0.0 + 0.7),  # old residuals clamped (r_2 -> 0), current r_3 unclamped
    ("eval", 0.5 + -0.3 + 0.0 + 0.0),   # every residual clamped to <= 0
], ids=["train", "eval"])
def test_bga_background_combination_on_constant_heads(mode, background):
    head = constant_bga_head(BIASES).train(mode == "train")
    logits, features = head(torch.randn(BATCH, IN_CHANNELS, SIZE, SIZE))
    expected = torch.tensor([background, 1.0, 2.0, 11.0, 21.0, 31.0, 32.0]).view(1, 7, 1, 1)
    expected = expected.expand(BATCH, 7, SIZE, SIZE)
    torch.testing.assert_close(logits, expected)
    assert [z.shape[1] for z in features["prev_heads"]] == [3, 2, 2, 3]
    assert len(features["ear_feats"]) == 4
    assert features["feature"].shape == (BATCH, 256, SIZE, SIZE)


def test_bga_step0_logits_are_head0():
    head = constant_bga_head([[0.25, -1.0, 3.0]]).train()
    logits, features = head(torch.randn(BATCH, IN_CHANNELS, SIZE, SIZE))
    assert torch.equal(logits, features["prev_heads"][0])
    assert logits[0, :, 0, 0].tolist() == [0.25, -1.0, 3.0]
    assert len(head.ear) == 0 and len(features["ear_feats"]) == 1


def test_bga_training_background_gradient_reaches_only_current_residual():
    head = constant_bga_head(BIASES).train()
    logits, _ = head(torch.randn(BATCH, IN_CHANNELS, SIZE, SIZE))
    logits[:, 0].sum().backward()
    current = head.head[3].bias.grad
    assert current.tolist() == [BATCH * SIZE * SIZE, 0.0, 0.0]
    for old in head.head[:3]:
        assert old.weight.grad is None or not old.weight.grad.any()
        assert old.bias.grad is None or not old.bias.grad.any()
    assert head.head_pre[0].weight.grad is None or not head.head_pre[0].weight.grad.any()


def test_bga_eval_background_gradient_reaches_unclamped_parts():
    head = constant_bga_head(BIASES).eval()
    logits, _ = head(torch.randn(BATCH, IN_CHANNELS, SIZE, SIZE))
    logits[:, 0].sum().backward()
    pixels = BATCH * SIZE * SIZE
    assert head.head[0].bias.grad.tolist() == [pixels, 0.0, 0.0]
    assert head.head[1].bias.grad.tolist() == [pixels, 0.0]       # r_1 < 0 passes the clamp
    assert head.head[3].bias.grad.tolist() == [0.0, 0.0, 0.0]     # r_3 > 0 is clamped in eval


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bga_background_formula_on_random_heads(mode):
    torch.manual_seed(1)
    head = BackgroundAdaptationHead(IN_CHANNELS, [4, 2, 1, 3], ATROUS_RATES[16]).train(mode == "train")
    with torch.no_grad():
        logits, features = head(torch.randn(BATCH, IN_CHANNELS, SIZE, SIZE))
    z = features["prev_heads"]
    clamped = [torch.minimum(zk[:, 0], torch.zeros_like(zk[:, 0])) for zk in z[1:]]
    if mode == "train":
        background = z[0][:, 0] + clamped[0] + clamped[1] + z[3][:, 0]
    else:
        background = z[0][:, 0] + clamped[0] + clamped[1] + clamped[2]
    torch.testing.assert_close(logits[:, 0], background)
    torch.testing.assert_close(logits[:, 1:], torch.cat([zk[:, 1:] for zk in z], dim=1))
    # ears read the ASPP output, head[0] reads head_pre (BARM network/_deeplab.py::DeepLabHeadBgA.forward)
    torch.testing.assert_close(features["ear_feats"][2], head.ear[1](features["feature"]))
    torch.testing.assert_close(features["ear_feats"][0], head.head_pre(features["feature"]))


def test_ssul_and_incremental_logits_are_concatenations():
    torch.manual_seed(2)
    x = torch.randn(BATCH, IN_CHANNELS, SIZE, SIZE)
    ssul = SSULHead(IN_CHANNELS, [3, 2], ATROUS_RATES[16], unknown=True).eval()
    with torch.no_grad():
        logits, features = ssul(x)
        parts = [entry(features["feature"]) for entry in ssul.head]
    assert [p.shape[1] for p in parts] == [1, 1, 2, 2]
    torch.testing.assert_close(logits, torch.cat(parts, dim=1))
    assert ssul.num_classes == 5 and ssul.num_outputs == 6

    plain = IncrementalHead(IN_CHANNELS, [3, 2], ATROUS_RATES[16]).eval()
    with torch.no_grad():
        logits, features = plain(x)
    assert [z.shape[1] for z in features["prev_heads"]] == [3, 2]
    torch.testing.assert_close(logits, torch.cat([conv(features["pre_logits"]) for conv in plain.head], dim=1))


def test_initialisation_follows_barm():
    torch.manual_seed(3)
    head = BackgroundAdaptationHead(512, [21, 1], ATROUS_RATES[16])
    conv = head.aspp.convs[1][0].weight  # fan_in = 512 * 9, kaiming normal std = sqrt(2 / fan_in)
    assert conv.std().item() == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.02)
    for bn in (m for m in head.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    for conv in head.head:
        assert conv.bias.abs().max() <= 1 / 16  # PyTorch's default U(-1/sqrt(256), 1/sqrt(256))
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.25)


@pytest.mark.parametrize("name, kwargs", [
    ("deeplabv3bga_resnet18", {}),
    ("deeplabv3_resnet18", {"unknown": True}),
    ("deeplabv3_resnet18", {}),
    ("deeplabv3inc_resnet18", {}),
])
def test_add_step_equals_building_grown_model(name, kwargs):
    model = build_model(name, [16], **kwargs)
    model.add_step(1)
    model.add_step(2)
    grown = build_model(name, [16, 1, 2], **kwargs)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in grown.state_dict().items()}
    assert model.classes_per_step == [16, 1, 2] and model.num_classes == 19
    model.eval()
    with torch.no_grad():
        logits, _ = model(torch.randn(1, 3, 33, 33))
    assert logits.shape[1] == model.classifier.num_outputs == grown.classifier.num_outputs


def test_add_step_matches_dtype_device_memory_format_and_mode():
    model = build_model("deeplabv3bga_resnet18", [3]).double().eval()
    model = model.to(memory_format=torch.channels_last)
    model.add_step(2)
    ear, head = model.classifier.ear[0], model.classifier.head[1]
    assert ear[0].weight.dtype == torch.float64 and head.bias.dtype == torch.float64
    assert ear[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not ear.training and not head.training
    assert torch.all(ear[1].weight == 1) and torch.all(ear[1].bias == 0)
    assert head.weight.shape == (3, 256, 1, 1)
    with torch.no_grad():
        logits, _ = model(torch.randn(1, 3, 33, 33, dtype=torch.float64))
    assert logits.shape[1] == 5


def test_add_step_rejects_bad_counts():
    head = IncrementalHead(IN_CHANNELS, [3], ATROUS_RATES[16])
    with pytest.raises(UserError, match="new classes"):
        head.add_step(0)
    assert head.classes_per_step == [3]
