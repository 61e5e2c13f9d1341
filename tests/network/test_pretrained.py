"""network/pretrained.py: backbone weights (BARM network/backbone/resnet.py::model_urls) from local files and
through the torch.hub cache."""
import urllib.error

import numpy as np
import pytest
import torch
from torchvision import models

from network import build_model
from network.pretrained import IMAGENET_URLS
from utils.errors import UserError


def assert_backbone_equals(model, reference, buffers_optional=False):
    state = model.backbone.state_dict()
    expected = {k: v for k, v in reference.items() if not k.startswith("fc.")}
    if buffers_optional:
        assert set(expected) == {k for k in state if not k.endswith("num_batches_tracked")}
    else:
        assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


@pytest.fixture()
def resnet18_state():
    torch.manual_seed(0)
    net = models.resnet18(weights=None)
    with torch.no_grad():
        for name, buffer in net.named_buffers():  # make the BN statistics distinguishable from defaults
            if "running" in name:
                buffer.uniform_(0.5, 1.5)
    return net.state_dict()


# ------------------------------------------------------------------------------------------------
# Local pretrained files
# ------------------------------------------------------------------------------------------------

def test_torchvision_state_dict_with_fc_loads_as_backbone(tmp_path, resnet18_state):
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18_state, path)
    model = build_model("deeplabv3bga_resnet18", [16], pretrained=str(path))
    assert_backbone_equals(model, resnet18_state)
    assert all(m.momentum == 0.01 for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_wrapped_and_prefixed_state_dict_loads(tmp_path, resnet18_state):
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in resnet18_state.items()}, "epoch": 3}, path)
    model = build_model("deeplabv3inc_resnet18", [4], pretrained=str(path))
    assert_backbone_equals(model, resnet18_state)


def test_legacy_state_dict_without_num_batches_tracked_loads(tmp_path, resnet18_state):
    legacy = {k: v for k, v in resnet18_state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "legacy.pth"
    torch.save(legacy, path)
    model = build_model("deeplabv3bga_resnet18", [4], pretrained=str(path))
    assert_backbone_equals(model, legacy, buffers_optional=True)
    assert model.backbone.bn1.num_batches_tracked.item() == 0


def test_barm_checkpoint_as_pretrained_source(tmp_path):
    torch.manual_seed(1)
    source = build_model("deeplabv3bga_resnet18", [16, 1])
    path = tmp_path / "barm.pth"
    torch.save({"model_state": source.state_dict(), "optimizer_state": {"state": {}, "param_groups": []},
                "best_score": np.float64(0.6123)}, path)
    torch.manual_seed(2)
    model = build_model("deeplabv3bga_resnet18", [16], pretrained=str(path))
    assert_backbone_equals(model, source.backbone.state_dict())
    assert not torch.equal(model.classifier.head_pre[0].weight, source.classifier.head_pre[0].weight)


@pytest.mark.slow  # ~1.3 s: builds a ResNet-50 state dict
def test_bad_pretrained_files_raise_user_error(tmp_path, resnet18_state):
    with pytest.raises(UserError, match="does not exist"):
        build_model("deeplabv3bga_resnet18", [3], pretrained=str(tmp_path / "missing.pth"))

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="garbage.pth"):
        build_model("deeplabv3bga_resnet18", [3], pretrained=str(garbage))

    tensor_file = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(UserError, match="expected a state dict"):
        build_model("deeplabv3bga_resnet18", [3], pretrained=str(tensor_file))

    resnet50 = tmp_path / "resnet50.pth"
    torch.save(models.resnet50(weights=None).state_dict(), resnet50)
    with pytest.raises(UserError, match=r"resnet50\.pth.*resnet18.*unexpected: layer1\.0\.conv3\.weight") as info:
        build_model("deeplabv3bga_resnet18", [3], pretrained=str(resnet50))
    assert "mis-shaped: layer1.0.conv1.weight [64, 64, 1, 1] (expected [64, 64, 3, 3])" in str(info.value)

    incomplete = tmp_path / "incomplete.pth"
    torch.save({k: v for k, v in resnet18_state.items() if not k.startswith("layer4.1.")}, incomplete)
    with pytest.raises(UserError, match=r"incomplete\.pth.*missing: layer4\.1\.conv1\.weight"):
        build_model("deeplabv3bga_resnet18", [3], pretrained=str(incomplete))


# ------------------------------------------------------------------------------------------------
# ImageNet weights through the torch.hub cache
# ------------------------------------------------------------------------------------------------

@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    """An empty TORCH_HOME and no network: any download attempt raises URLError."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert torch.hub.get_dir() == str(tmp_path / "hub")
    attempts = []

    def no_network(url, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    return tmp_path / "hub" / "checkpoints", attempts


def test_imagenet_offline_without_cache_raises_user_error(offline_hub):
    cache_dir, attempts = offline_hub
    with pytest.raises(UserError) as info:
        build_model("deeplabv3bga_resnet18", [16], pretrained="imagenet")
    message = str(info.value)
    assert "resnet18-5c106cde.pth" in message and str(cache_dir) in message
    assert "--pretrained PATH" in message and "--no_pretrained" in message
    assert attempts == [IMAGENET_URLS["resnet18"]]


def test_imagenet_from_cache_needs_no_network(offline_hub, resnet18_state):
    cache_dir, attempts = offline_hub
    cache_dir.mkdir(parents=True)
    torch.save(resnet18_state, cache_dir / "resnet18-5c106cde.pth")
    model = build_model("deeplabv3bga_resnet18", [16], pretrained="imagenet")
    assert_backbone_equals(model, resnet18_state)
    assert attempts == []


def test_imagenet_download_goes_through_torch_hub(monkeypatch, tmp_path, resnet18_state):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = []

    def fake_download(url, **kwargs):
        calls.append((url, kwargs.get("weights_only")))
        return resnet18_state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    model = build_model("deeplabv3_resnet18", [16], pretrained="imagenet")
    assert calls == [("https://download.pytorch.org/models/resnet18-5c106cde.pth", True)]
    assert_backbone_equals(model, resnet18_state)
