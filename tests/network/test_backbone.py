"""network/backbone.py: ResNet geometry (dilations, strides), BN momentum, pre-activation taps and block
swapping."""
import pytest
import torch
from torch import nn
from torchvision import models

from network import build_model
from network.backbone import ResNetBackbone


@pytest.mark.slow  # builds a ResNet-101
def test_resnet101_layer4_is_dilated_as_spec():
    backbone = ResNetBackbone("resnet101", 16)
    block0, block1 = backbone.layer4[0], backbone.layer4[1]
    assert block0.conv2.stride == (1, 1) and block0.conv2.dilation == (1, 1)
    assert block0.downsample[0].stride == (1, 1)
    assert block1.conv2.dilation == (2, 2) and block1.conv2.padding == (2, 2)
    assert backbone.layer3[0].conv2.stride == (2, 2)
    assert backbone.out_channels == 2048


def test_backbone_children_and_bn_momentum():
    model = build_model("deeplabv3inc_resnet18", [3])
    names = [name for name, _ in model.backbone.named_children()]
    assert names == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    reference = {k for k in models.resnet18(weights=None).state_dict() if not k.startswith("fc.")}
    assert set(model.backbone.state_dict()) == reference
    backbone_bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    classifier_bns = [m for m in model.classifier.modules() if isinstance(m, nn.BatchNorm2d)]
    assert backbone_bns and all(m.momentum == 0.01 for m in backbone_bns)
    assert classifier_bns and all(m.momentum == 0.1 for m in classifier_bns)
    assert model.backbone.out_channels == 512


@pytest.mark.parametrize("output_stride, dilations", [
    # (stage, block) -> (stride of conv1, dilation of both 3x3 convs)
    (16, {("layer3", 0): (2, 1), ("layer3", 1): (1, 1), ("layer4", 0): (1, 1), ("layer4", 1): (1, 2)}),
    (8, {("layer3", 0): (1, 1), ("layer3", 1): (1, 2), ("layer4", 0): (1, 2), ("layer4", 1): (1, 4)}),
])
def test_resnet18_dilation_follows_bottleneck_convention(output_stride, dilations):
    backbone = ResNetBackbone("resnet18", output_stride)
    for (stage, index), (stride, dilation) in dilations.items():
        block = getattr(backbone, stage)[index]
        assert block.conv1.stride == (stride, stride)
        for conv in (block.conv1, block.conv2):
            assert conv.dilation == (dilation, dilation) and conv.padding == (dilation, dilation)
        if index == 0:
            assert block.downsample[0].stride == (stride, stride)
    assert backbone.layer2[0].conv1.stride == (2, 2)


def test_preact_taps_are_the_residual_sums():
    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet18", 16).eval()
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        plain = backbone(x)
    captured = {}
    last = backbone.layer4[-1]  # BasicBlock without downsample: pre = bn2(conv2(.)) + block input
    last.conv1.register_forward_pre_hook(lambda m, args: captured.__setitem__("input", args[0].clone()))
    last.bn2.register_forward_hook(lambda m, args, out: captured.__setitem__("bn2", out.clone()))
    backbone.return_preact = True
    with torch.no_grad():
        taps = backbone(x)
    assert set(taps) == {"out", "layer1", "layer2", "layer3", "layer4",
                         "layer1_pre", "layer2_pre", "layer3_pre", "layer4_pre"}
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        assert torch.equal(taps[stage], plain[stage])
        assert torch.equal(torch.relu(taps[f"{stage}_pre"]), taps[stage])
        assert (taps[f"{stage}_pre"] < 0).any()
    torch.testing.assert_close(taps["layer4_pre"], captured["bn2"] + captured["input"])


def test_preact_supports_backward_with_bottleneck():
    backbone = ResNetBackbone("resnet50", 16)
    backbone.return_preact = True
    taps = backbone(torch.randn(2, 3, 33, 33))
    (taps["layer4_pre"].sum() + taps["layer2_pre"].square().mean()).backward()
    assert torch.isfinite(backbone.conv1.weight.grad).all()
    assert taps["layer4_pre"].shape == (2, 2048, 3, 3)


class _Wrapped(nn.Module):
    """A swapped-in block that delegates to the old block and counts preact calls."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.preact_calls = 0

    def forward(self, x):
        return self.inner(x)

    def forward_preact(self, x):
        self.preact_calls += 1
        out = self.inner(x)
        return out, out - 1


def test_swap_blocks():
    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet18", 16).eval()
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        before = backbone(x)["out"]
    calls = []

    def factory(stage_idx, block_idx, old_block):
        calls.append((stage_idx, block_idx))
        return _Wrapped(old_block)

    backbone.swap_blocks(factory)
    assert calls == [(stage, block) for stage in (1, 2, 3, 4) for block in (0, 1)]
    assert "layer3.1.inner.conv2.weight" in backbone.state_dict()
    backbone.return_preact = True
    with torch.no_grad():
        taps = backbone(x)
    assert torch.equal(taps["out"], before)
    assert torch.equal(taps["layer4_pre"], taps["layer4"] - 1)
    assert [backbone.layer1[0].preact_calls, backbone.layer1[1].preact_calls] == [0, 1]
