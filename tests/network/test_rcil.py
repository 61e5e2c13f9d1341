"""network/rcil.py: RCIL's network (RCIL modules/residual.py): gates, dual-branch blocks, stem and head, taps,
ImageNet weights in both branches, against computations by hand from RCIL's formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from network import FAMILIES
from network.mib import build_mib_model
from network.rcil import BranchGates, DualBranchBlock, build_rcil_model, gate_weights
from tests.helpers import images, randomise_norm_layers as randomise


EPS = 1e-5
SLOPE = 0.01


@pytest.fixture(autouse=True)
def rcil_family(monkeypatch):
    """The ``rcil`` family, until ``network/__init__.py`` registers it."""
    if "rcil" not in FAMILIES:
        monkeypatch.setitem(FAMILIES, "rcil", build_rcil_model)


# ---- gates ---------------------------------------------------------------------------------------------------


def test_gate_weights_by_hand():
    r = torch.tensor([0.0, 0.2, 0.3299, 0.33, 0.5, 0.6599, 0.66, 0.9, 1.0])
    w1, w2 = gate_weights(r)
    assert w1.tolist() == [2, 2, 2, 0, 0, 0, 1, 1, 1]
    assert w2.tolist() == [0, 0, 0, 2, 2, 2, 1, 1, 1]


def by_hand_abn(x, module, training):
    """InPlace-ABN by hand (slope 1 = identity): batch statistics (biased variance) in training."""
    if training:
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = module.running_mean, module.running_var
    scale = module.weight.abs() + module.eps
    return (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + module.eps) * scale.view(1, -1, 1, 1) \
        + module.bias.view(1, -1, 1, 1)


def by_hand_bottleneck(block, x, w1, w2, training):
    """RCIL's bottleneck (RCIL modules/residual.py): u = LReLU(bn1 conv1 x);
    m = ½(w1·bn2 conv2 u + w2·bn2_new conv2_new u); out = LReLU(bn3 conv3 LReLU(m) + proj_bn proj_conv x)."""
    c = block.convs
    u = F.leaky_relu(by_hand_abn(F.conv2d(x, c.conv1.weight), c.bn1, training), SLOPE)
    conv = dict(stride=block.stride, padding=block.dilation, dilation=block.dilation)
    b1 = by_hand_abn(F.conv2d(u, c.conv2.weight, **conv), c.bn2, training)
    b2 = by_hand_abn(F.conv2d(u, c.conv2_new.weight, **conv), c.bn2_new, training)
    m = 0.5 * (w1.view(1, -1, 1, 1) * b1 + w2.view(1, -1, 1, 1) * b2)
    main = by_hand_abn(F.conv2d(F.leaky_relu(m, SLOPE), c.conv3.weight), c.bn3, training)
    shortcut = by_hand_abn(F.conv2d(x, block.proj_conv.weight, stride=block.stride), block.proj_bn, training)
    return F.leaky_relu(main + shortcut, SLOPE)


def rule(r):
    """The gate rule written out per channel."""
    pairs = [(2.0, 0.0) if v < 0.33 else (0.0, 2.0) if v < 0.66 else (1.0, 1.0) for v in r.flatten().tolist()]
    return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


def test_bottleneck_block_forward_by_hand_in_training_and_eval():
    block = randomise(DualBranchBlock(6, (16, 16, 12), stride=2, dilation=1, gates=BranchGates(seed=11)))
    x = images((3, 6, 9, 9))
    block.train()
    r = torch.rand(1, 16, 1, 1, generator=torch.Generator().manual_seed(11))  # the block's first draw
    w1, w2 = rule(r)
    assert 0 < (w1 == 2).sum() < 16 and 0 < (w2 == 2).sum() < 16 and 0 < (w1 == 1).sum() < 16
    expected = by_hand_bottleneck(block, x, w1, w2, training=True)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    block.eval()
    state = block.gates.get_state()
    expected = by_hand_bottleneck(block, x, torch.ones(16), torch.ones(16), training=False)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(block.gates.get_state(), state)  # eval draws nothing


def test_gates_leave_the_global_rng_untouched_and_are_reproducible_under_a_seed():
    model = randomise(build_rcil_model([3], "resnet18")).train()
    x = images()
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    model.gates.seed(5)
    first, _ = model(x)
    assert torch.equal(torch.get_rng_state(), global_state)
    model.gates.seed(5)
    again, _ = model(x)
    assert torch.equal(first, again)
    model.gates.seed(6)
    other, _ = model(x)
    assert not torch.allclose(first, other)
    # one generator for the model: the blocks' and the head's draws follow each other
    assert all(block.gates is model.gates for block in model.body.modules() if isinstance(block, DualBranchBlock))
    assert model.head.gates is model.gates


# ---- network -------------------------------------------------------------------------------------------------


def test_stem_has_no_activation_and_head_gain_is_one():
    torch.manual_seed(0)
    model = build_rcil_model([3], "resnet18")
    assert model.body.mod1.bn1.activation_param == 1.0  # a linear norm layer, no LeakyReLU follows
    x = images()
    stem = model.body.mod1.pool1(F.batch_norm(model.body.mod1.conv1(x), None, None, training=True,
                                              weight=model.body.mod1.bn1.weight.abs() + EPS,
                                              bias=model.body.mod1.bn1.bias))
    model.train()
    assert (stem < 0).any()  # where a LeakyReLU would have shrunk the values 100×
    torch.testing.assert_close(model.body.mod1(x), stem)
    # xavier normal with gain 1: std √(2 / (fan_in + fan_out)); red_conv is 1024 -> 256, 1x1
    for conv in (model.head.red_conv, model.head.map_convs_new[0]):
        fan_out, fan_in = conv.weight.shape[0], conv.weight.shape[1]
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.05)
    assert not torch.equal(model.head.map_convs[1].weight, model.head.map_convs_new[1].weight)


def test_attentions_are_block_outputs_and_x_pl():
    model = randomise(build_rcil_model([3, 2], "resnet18")).eval()
    x = images()
    logits, features = model(x)
    stages, h = [], model.body.mod1(x)
    for name in ("mod2", "mod3", "mod4", "mod5"):
        h = getattr(model.body, name)(h)
        stages.append(h)
    assert len(features["attentions"]) == 5
    for tap, stage in zip(features["attentions"][:4], stages):
        torch.testing.assert_close(tap, stage, rtol=0, atol=0)  # post-activation outputs (RCIL modules/residual.py)
    assert features["attentions"][4] is features["pre_logits"]
    assert features["sem_logits_small"] is logits and logits.shape[1] == 5
    assert features["attentions"][4].min() >= -SLOPE * features["attentions"][4].abs().max()  # after a LeakyReLU


def save_imagenet_like(tmp_path):
    """A mapillary-style file (``state_dict`` with ``module.`` keys and the ImageNet classifier) of a random
    MiB ResNet-18 body."""
    body = randomise(build_mib_model([3], "resnet18").body, seed=9)
    state = {f"module.{k}": v for k, v in body.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["module.classifier.fc.weight"] = torch.zeros(1000, 512)
    state["module.classifier.fc.bias"] = torch.zeros(1000)
    path = tmp_path / "resnet18_iabn_sync.pth.tar"
    torch.save({"state_dict": state}, path)
    return str(path), body.state_dict()


@pytest.mark.slow  # ~1 s: builds and saves a MiB ResNet-18, loads it into an RCIL model
def test_imagenet_weights_fill_both_branches(tmp_path):
    path, reference = save_imagenet_like(tmp_path)
    model = build_rcil_model([3], "resnet18", pretrained=path)
    body = model.body.state_dict()
    blocks = 0
    for key, value in reference.items():
        if key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(body[key], value), key
        if ".convs.conv2." in key or ".convs.bn2." in key:
            twin = key.replace(".conv2.", ".conv2_new.").replace(".bn2.", ".bn2_new.")
            assert torch.equal(body[twin], value), twin
            blocks += 1
    assert blocks == 8 * 5  # 8 blocks: conv2.weight and four bn2 tensors each
    fresh = build_rcil_model([3], "resnet18")
    assert not torch.equal(fresh.body.mod2.block1.convs.conv2.weight, fresh.body.mod2.block1.convs.conv2_new.weight)
