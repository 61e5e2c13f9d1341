"""Model assembly, state-dict layout (BARM network/_deeplab.py::DeepLabHeadBgA, SSUL network/_deeplab.py::DeepLabHead),
backbone geometry and taps."""
import pytest
import torch
from torch import nn
from torchvision import models

from network import DeepLabV3, build_model, list_models
from network.backbone import ResNetBackbone
from utils.errors import UserError

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var")


def bn_entries(prefix, channels):
    entries = {f"{prefix}.{suffix}": [channels] for suffix in BN_SUFFIXES}
    entries[f"{prefix}.num_batches_tracked"] = []
    return entries


def shapes(module):
    return {key: list(value.shape) for key, value in module.state_dict().items()}


@pytest.fixture(scope="module")
def resnet101_backbone_table():
    """Backbone part of BARM's state dict (BARM network/backbone/resnet.py): torchvision's ResNet-101 keys without
    ``fc``, under ``backbone.``."""
    table = {f"backbone.{k}": list(v.shape) for k, v in models.resnet101(weights=None).state_dict().items()
             if not k.startswith("fc.")}
    # Spot checks of the key table itself.
    assert table["backbone.layer3.22.conv1.weight"] == [256, 1024, 1, 1]
    assert table["backbone.layer4.0.downsample.0.weight"] == [2048, 1024, 1, 1]
    assert table["backbone.layer4.1.conv1.weight"] == [512, 2048, 1, 1]
    assert "backbone.layer3.23.conv1.weight" not in table
    return table


def aspp_table():
    """ASPP part of BARM's state dict (BARM network/_deeplab.py::ASPP), 2048 input channels."""
    table = {"classifier.aspp.convs.0.0.weight": [256, 2048, 1, 1], **bn_entries("classifier.aspp.convs.0.1", 256)}
    for branch in (1, 2, 3):
        table[f"classifier.aspp.convs.{branch}.0.weight"] = [256, 2048, 3, 3]
        table.update(bn_entries(f"classifier.aspp.convs.{branch}.1", 256))
    table["classifier.aspp.convs.4.1.weight"] = [256, 2048, 1, 1]
    table.update(bn_entries("classifier.aspp.convs.4.2", 256))
    table["classifier.aspp.project.0.weight"] = [256, 1280, 1, 1]
    table.update(bn_entries("classifier.aspp.project.1", 256))
    return table


def bga_classifier_table(classes_per_step):
    """BARM head part (BARM network/_deeplab.py::DeepLabHeadBgA): head_pre, one ear per incremental step, 1x1 heads
    (residual channel for k>=1)."""
    table = aspp_table()
    table["classifier.head_pre.0.weight"] = [256, 256, 3, 3]
    table.update(bn_entries("classifier.head_pre.1", 256))
    n_0, *incremental = classes_per_step
    for k, n_k in enumerate(incremental, start=1):
        table[f"classifier.ear.{k - 1}.0.weight"] = [256, 256, 3, 3]
        table.update(bn_entries(f"classifier.ear.{k - 1}.1", 256))
        table[f"classifier.head.{k}.weight"] = [n_k + 1, 256, 1, 1]
        table[f"classifier.head.{k}.bias"] = [n_k + 1]
    table["classifier.head.0.weight"] = [n_0, 256, 1, 1]
    table["classifier.head.0.bias"] = [n_0]
    return table


def ssul_classifier_table(head_channels):
    """SSUL's heads (SSUL network/_deeplab.py::DeepLabHead): per entry a 3x3 conv (.0), BN (.1) and a biased 1x1
    conv (.3)."""
    table = aspp_table()
    for i, channels in enumerate(head_channels):
        table[f"classifier.head.{i}.0.weight"] = [256, 256, 3, 3]
        table.update(bn_entries(f"classifier.head.{i}.1", 256))
        table[f"classifier.head.{i}.3.weight"] = [channels, 256, 1, 1]
        table[f"classifier.head.{i}.3.bias"] = [channels]
    return table


@pytest.mark.parametrize("classes_per_step", [
    [16],                           # VOC 15-1, step 0
    [16, 1, 1, 1, 1, 1],            # VOC 15-1, step 5: head.1..5 with 2 outputs, ear.0..4
    [101, 10, 10, 10, 10, 10],      # ADE 100-10, step 5: head.1..5 with 11 outputs
])
def test_bga_resnet101_state_dict_matches_spec(classes_per_step, resnet101_backbone_table):
    model = build_model("deeplabv3bga_resnet101", classes_per_step)
    expected = {**resnet101_backbone_table, **bga_classifier_table(classes_per_step)}
    assert shapes(model) == expected
    assert model.num_classes == sum(classes_per_step)


@pytest.mark.parametrize("unknown, head_channels", [(True, [1, 1, 15, 1]), (False, [16, 1])])
def test_ssul_resnet101_state_dict_matches_spec(unknown, head_channels, resnet101_backbone_table):
    model = build_model("deeplabv3_resnet101", [16, 1], unknown=unknown)
    assert shapes(model) == {**resnet101_backbone_table, **ssul_classifier_table(head_channels)}
    assert model.classifier.num_outputs == sum(head_channels)


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


@pytest.mark.parametrize("output_stride, size, expected", [(16, 513, 33), (8, 513, 65), (16, 321, 21), (8, 321, 41)])
def test_output_size(output_stride, size, expected):
    """513 -> 257 (conv1) -> 129 (maxpool, layer1) -> 65 (layer2) -> 33 (layer3) at OS16."""
    stem = {513: 129, 321: 81}[size]
    model = build_model("deeplabv3bga_resnet18", [3, 1], output_stride=output_stride).eval()
    with torch.no_grad():
        logits, features = model(torch.randn(1, 3, size, size))
    assert logits.shape == (1, 4, expected, expected)
    assert features["back_out"].shape == (1, 512, expected, expected)
    assert features["feature"].shape == (1, 256, expected, expected)
    assert features["layer1"].shape[-2:] == (stem, stem)


def test_feature_keys_per_head():
    x = torch.randn(2, 3, 33, 33)
    taps = {"back_out", "layer1", "layer2", "layer3", "layer4"}
    expected = {
        "deeplabv3bga_resnet18": {"feature", "prev_heads", "ear_feats"},
        "deeplabv3_resnet18": {"feature"},
        "deeplabv3inc_resnet18": {"feature", "pre_logits", "prev_heads"},
    }
    for name, keys in expected.items():
        model = build_model(name, [3, 2]).eval()
        with torch.no_grad():
            logits, features = model(x)
        assert set(features) == keys | taps, name
        assert logits.shape[:2] == (2, 5)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_backward_bga_resnet18(mode):
    torch.manual_seed(0)
    model = build_model("deeplabv3bga_resnet18", [16, 1, 1])
    model.train(mode == "train")
    logits, features = model(torch.randn(2, 3, 129, 129))
    assert logits.shape == (2, 18, 9, 9)
    assert len(features["prev_heads"]) == 3 and len(features["ear_feats"]) == 3
    loss = nn.functional.binary_cross_entropy_with_logits(logits, torch.rand_like(logits))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert model.classifier.head[2].weight.grad.abs().sum() > 0


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = build_model("deeplabv3bga_resnet18", [4, 2]).eval()
    x = torch.randn(2, 3, 65, 65)
    with torch.no_grad():
        reference, ref_features = model(x)
        model = model.to(memory_format=torch.channels_last)
        logits, features = model(x.contiguous(memory_format=torch.channels_last))
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    scale = reference.abs().max().item()
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5 * scale)
    for key in ("feature", "back_out", "layer2"):
        torch.testing.assert_close(features[key], ref_features[key], rtol=1e-4,
                                   atol=1e-5 * ref_features[key].abs().max().item())


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


def test_build_model_names_and_errors():
    names = list_models()
    assert {"deeplabv3bga", "deeplabv3bga_resnet101", "deeplabv3_resnet50", "deeplabv3inc_resnet18"} <= set(names)
    model = build_model("deeplabv3inc_resnet101", [3], backbone="resnet18")
    assert isinstance(model, DeepLabV3) and model.backbone.arch == "resnet18"
    assert build_model("deeplabv3", [3], backbone="resnet18").backbone.output_stride == 16
    with pytest.raises(UserError, match="deeplabv3bga_resnet101"):
        build_model("deeplabv3plus_resnet101", [3])
    with pytest.raises(UserError, match="unknown model"):
        build_model("deeplabv3bga_resnet34", [3])
    with pytest.raises(UserError, match="resnet18, resnet50, resnet101"):
        build_model("deeplabv3bga", [3], backbone="vgg16")
    with pytest.raises(UserError, match="output stride"):
        build_model("deeplabv3bga_resnet18", [3], output_stride=32)
    with pytest.raises(UserError, match="classes_per_step"):
        build_model("deeplabv3bga_resnet18", [])
    with pytest.raises(UserError, match=r"classes_per_step\[1\]"):
        build_model("deeplabv3bga_resnet18", [3, 0])
    with pytest.raises(UserError, match="unknown class"):
        build_model("deeplabv3_resnet18", [1], unknown=True)
