"""network/mib_resnet.py: MiB's ResNet body (MiB models/resnet.py::ResNet): block swapping and the
InPlace-ABN ImageNet weight files (InPlace-ABN README; MiB segmentation_module.py::make_model)."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from network.mib import build_mib_model
from network.mib_resnet import IABN_IMAGENET_URL
from utils.errors import UserError


EPS = 1e-5
SLOPE = 0.01


def test_swap_blocks_visits_every_block_with_its_geometry():
    torch.manual_seed(0)
    model = build_mib_model([3], "resnet18").eval()
    x = torch.randn(1, 3, 33, 33)
    expected, _ = model(x)
    seen = []

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

        def forward_preact(self, x):
            return self.inner.forward_preact(x)

    def factory(mod_index, block_index, old):
        seen.append((mod_index, block_index, old.stride, old.dilation, old.channels))
        return Wrapped(old)

    model.body.swap_blocks(factory)
    assert seen == [(2, 1, 1, 1, (64, 64)), (2, 2, 1, 1, (64, 64)), (3, 1, 2, 1, (128, 128)), (3, 2, 1, 1, (128, 128)),
                    (4, 1, 2, 1, (256, 256)), (4, 2, 1, 1, (256, 256)), (5, 1, 1, 2, (512, 512)),
                    (5, 2, 1, 2, (512, 512))]
    assert "body.mod3.block1.inner.proj_conv.weight" in model.state_dict()
    model.return_attentions = True
    logits, _ = model(x)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# InPlace-ABN ImageNet weights (InPlace-ABN README; MiB segmentation_module.py::make_model)
# ------------------------------------------------------------------------------------------------

def reference_resnet18_shapes():
    """The InPlace-ABN ResNet-18 file's keys and shapes, with MiB's names (MiB models/resnet.py::ResNet; no
    counters)."""
    shapes = {"mod1.conv1.weight": (64, 3, 7, 7)}

    def norm(prefix, n):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (n,)

    norm("mod1.bn1", 64)
    in_channels = 64
    for mod, channels in zip(range(2, 6), (64, 128, 256, 512)):
        for block in (1, 2):
            prefix, cin = f"mod{mod}.block{block}", in_channels if block == 1 else channels
            shapes[f"{prefix}.convs.conv1.weight"] = (channels, cin, 3, 3)
            norm(f"{prefix}.convs.bn1", channels)
            shapes[f"{prefix}.convs.conv2.weight"] = (channels, channels, 3, 3)
            norm(f"{prefix}.convs.bn2", channels)
            if block == 1 and mod > 2:
                shapes[f"{prefix}.proj_conv.weight"] = (channels, cin, 1, 1)
                norm(f"{prefix}.proj_bn", channels)
        in_channels = channels
    shapes["classifier.fc.weight"] = (1000, 512)
    shapes["classifier.fc.bias"] = (1000,)
    return shapes


def random_reference_state():
    generator = torch.Generator().manual_seed(6)
    state = {}
    for key, shape in reference_resnet18_shapes().items():
        if key.endswith("running_var"):
            value = torch.rand(shape, generator=generator) + 0.5
        elif key.endswith(("bn1.weight", "bn2.weight", "proj_bn.weight")):
            value = torch.randn(shape, generator=generator)  # negative gammas included
        else:
            value = torch.randn(shape, generator=generator) * 0.1
        state[key] = value
    return state


def save_reference(tmp_path, state, prefix="module.", legacy=False):
    """Write the file like mapillary's (a dict with ``state_dict``); ``legacy``: torch < 1.6's non-zip format."""
    path = tmp_path / "resnet18_iabn_sync.pth.tar"
    torch.save({"state_dict": {prefix + k: v for k, v in state.items()}, "epoch": 90}, path,
               _use_new_zipfile_serialization=not legacy)
    return str(path)


def by_hand_norm(x, state, prefix, slope):
    """Eval-mode InPlace-ABN from torch primitives: scale |gamma| + eps (InPlace-ABN inplace_abn/functions.py)."""
    y = F.batch_norm(x, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                     state[f"{prefix}.weight"].abs() + EPS, state[f"{prefix}.bias"], False, 0.0, EPS)
    return F.leaky_relu(y, slope) if slope is not None else y


def by_hand_basic_block(x, state, prefix, stride):
    """MiB basic block, pre-activation sum (basic-block variant of MiB modules/residual.py::ResidualBlock)."""
    u = by_hand_norm(F.conv2d(x, state[f"{prefix}.convs.conv1.weight"], stride=stride, padding=1), state,
                     f"{prefix}.convs.bn1", SLOPE)
    v = by_hand_norm(F.conv2d(u, state[f"{prefix}.convs.conv2.weight"], padding=1), state, f"{prefix}.convs.bn2", None)
    if f"{prefix}.proj_conv.weight" in state:
        shortcut = by_hand_norm(F.conv2d(x, state[f"{prefix}.proj_conv.weight"], stride=stride), state,
                                f"{prefix}.proj_bn", None)
    else:
        shortcut = x
    return v + shortcut


@pytest.mark.parametrize("prefix, legacy", [("module.", True), ("", False)], ids=["prefixed-legacy", "stripped"])
def test_reference_weights_load_and_compute_the_reference_function(tmp_path, prefix, legacy):
    state = random_reference_state()
    path = save_reference(tmp_path, state, prefix, legacy)
    model = build_mib_model([3], "resnet18", pretrained=path).eval()
    model.return_attentions = True
    x = torch.randn(2, 3, 33, 33, generator=torch.Generator().manual_seed(7))
    _, features = model(x)
    stem = F.max_pool2d(by_hand_norm(F.conv2d(x, state["mod1.conv1.weight"], stride=2, padding=3), state, "mod1.bn1",
                                     SLOPE), 3, stride=2, padding=1)
    h = F.leaky_relu(by_hand_basic_block(stem, state, "mod2.block1", 1), SLOPE)
    mod2_pre = by_hand_basic_block(h, state, "mod2.block2", 1)
    torch.testing.assert_close(features["attentions"][0], mod2_pre, rtol=1e-5, atol=1e-5)
    h = F.leaky_relu(by_hand_basic_block(F.leaky_relu(mod2_pre, SLOPE), state, "mod3.block1", 2), SLOPE)
    mod3_pre = by_hand_basic_block(h, state, "mod3.block2", 1)
    torch.testing.assert_close(features["attentions"][1], mod3_pre, rtol=1e-5, atol=1e-5)
    body = model.body.state_dict()
    assert torch.equal(body["mod3.block1.proj_bn.running_var"], state["mod3.block1.proj_bn.running_var"])
    assert int(body["mod1.bn1.num_batches_tracked"]) == 0


def test_imagenet_weights_are_read_from_the_hub_cache(tmp_path, monkeypatch):
    state = random_reference_state()
    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}},
               tmp_path / "checkpoints" / "resnet18_iabn_sync.pth.tar")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    model = build_mib_model([3], "resnet18", pretrained="imagenet")
    assert torch.equal(model.body.mod5.block2.convs.conv2.weight, state["mod5.block2.convs.conv2.weight"])


def test_missing_imagenet_file_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UserError) as err:
        build_mib_model([3], "resnet101", pretrained="imagenet")
    message = str(err.value)
    assert IABN_IMAGENET_URL in message and "resnet101_iabn_sync.pth.tar" in message and "\n" not in message
    with pytest.raises(UserError, match="does not exist"):
        build_mib_model([3], "resnet18", pretrained=str(tmp_path / "nope.pth.tar"))


def test_mismatched_reference_weights_name_the_keys(tmp_path):
    state = random_reference_state()
    del state["mod3.block1.proj_bn.running_mean"]
    state["mod4.block2.convs.conv1.weight"] = torch.zeros(256, 256, 1, 1)
    state["mod6.block1.convs.conv1.weight"] = torch.zeros(1)
    path = save_reference(tmp_path, state)
    with pytest.raises(UserError) as err:
        build_mib_model([3], "resnet18", pretrained=path)
    message = str(err.value)
    assert path in message and "\n" not in message
    assert "missing: mod3.block1.proj_bn.running_mean" in message
    assert "unexpected: mod6.block1.convs.conv1.weight" in message
    assert "mod4.block2.convs.conv1.weight [256, 256, 1, 1] (expected [256, 256, 3, 3])" in message
