"""network/deeplab.py: the assembled DeepLabV3 forward (output sizes, feature keys per head, backward, channels
last, fp16 autocast on CUDA)."""
import pytest
import torch
from torch import nn

from network import build_model
from tests.helpers import barm_setup

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("output_stride, size, expected", [
    (16, 513, 33),
    pytest.param(8, 513, 65, marks=pytest.mark.slow),  # ~1 s: a 513-pixel forward at output stride 8
    (16, 321, 21),
    (8, 321, 41),
])
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


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_channels_last_under_autocast_matches_fp32():
    device = torch.device("cuda")
    method, student, teacher, batch = barm_setup(device, channels_last=True)
    teacher.eval()
    with torch.no_grad():
        reference = teacher(batch.images.contiguous())[0].float()
        with torch.autocast("cuda", dtype=torch.float16):
            fast = teacher(batch.images)[0].float()
    assert torch.isfinite(fast).all()
    assert (fast - reference).abs().max() <= 5e-2 * reference.abs().max()
