"""network/mib.py: MiB/PLOP network (MiB segmentation_module.py::IncrementalSegmentationModule): key layout,
shapes, dilations, initialisation, eval pooling, add_step, PLOP taps, step checkpoints and builder arguments."""
import math

import pytest
import torch
from torch.nn import functional as F
from torchvision import models

from network.abn import ABN
from network.mib import build_mib_model, image_pooling, load_mib_checkpoint
from tests.helpers import randomise_norm_layers
from utils.errors import UserError


SLOPE = 0.01


# ------------------------------------------------------------------------------------------------
# Key layout (MiB models/resnet.py::ResNet, segmentation_module.py::IncrementalSegmentationModule)
# ------------------------------------------------------------------------------------------------

# Written from MiB models/resnet.py::ResNet, modules/deeplab.py and segmentation_module.py for ResNet-101 and
# VOC 15-1 (16 classes at step 0, 1 at step 1).
KEY_TABLE = {
    "body.mod1.conv1.weight": (64, 3, 7, 7),
    "body.mod1.bn1.running_var": (64,),
    "body.mod2.block1.convs.conv1.weight": (64, 64, 1, 1),
    "body.mod2.block1.convs.bn1.weight": (64,),
    "body.mod2.block1.proj_conv.weight": (256, 64, 1, 1),
    "body.mod2.block1.proj_bn.bias": (256,),
    "body.mod3.block1.convs.conv2.weight": (128, 128, 3, 3),
    "body.mod3.block1.proj_conv.weight": (512, 256, 1, 1),
    "body.mod4.block23.convs.conv3.weight": (1024, 256, 1, 1),
    "body.mod5.block1.proj_conv.weight": (2048, 1024, 1, 1),
    "body.mod5.block3.convs.bn3.running_mean": (2048,),
    "head.map_convs.0.weight": (256, 2048, 1, 1),
    "head.map_convs.3.weight": (256, 2048, 3, 3),
    "head.map_bn.weight": (1024,),
    "head.global_pooling_conv.weight": (256, 2048, 1, 1),
    "head.global_pooling_bn.running_var": (256,),
    "head.red_conv.weight": (256, 1024, 1, 1),
    "head.pool_red_conv.weight": (256, 256, 1, 1),
    "head.red_bn.bias": (256,),
    "cls.0.weight": (16, 256, 1, 1),
    "cls.0.bias": (16,),
}
ABSENT = ("body.mod4.block24.convs.conv1.weight", "body.mod2.block2.proj_conv.weight", "body.mod1.pool1.weight",
          "head.red_conv.bias", "body.mod2.block1.convs.conv1.bias")
# Counts by hand: a bottleneck block has 3 convs + 3 norms, the first block of a module also proj_conv +
# proj_bn; a norm has 4 tensors (+ num_batches_tracked). ResNet-101: 33 blocks, 4 with a projection,
# stem conv + norm; head: 7 convs + 3 norms; one weight + bias per classifier.
N_NORMS = 1 + 33 * 3 + 4 + 3
N_TENSORS_WITHOUT_COUNTERS = 1 + 33 * 3 + 4 + 7 + 4 * N_NORMS + 2  # 541 with cls.0.{weight,bias}
# torchvision's resnet101 has 44,549,160 parameters, of which fc = 2048 * 1000 + 1000.
RESNET101_BODY_PARAMETERS = 44_549_160 - 2048 * 1000 - 1000


def to_torchvision_key(key):
    """Renaming of the InPlace-ABN ResNet keys (MiB models/resnet.py::ResNet names) to torchvision's."""
    parts = key.split(".")
    if parts[0] == "mod1":
        return ".".join(parts[1:])
    stage, block = int(parts[0][3:]) - 1, int(parts[1][5:]) - 1
    rest = parts[2:]
    if rest[0] == "convs":
        rest = rest[1:]
    elif rest[0] == "proj_conv":
        rest = ["downsample", "0"] + rest[1:]
    elif rest[0] == "proj_bn":
        rest = ["downsample", "1"] + rest[1:]
    return ".".join([f"layer{stage}", str(block)] + rest)


@pytest.mark.slow  # builds ResNet-101 models
def test_resnet101_voc15_1_key_table_and_counts():
    torch.manual_seed(0)
    model = build_mib_model([16], "resnet101")
    state = model.state_dict()
    assert model.arch == "resnet101"
    for key, shape in KEY_TABLE.items():
        assert tuple(state[key].shape) == shape, key
    for key in ABSENT:
        assert key not in state
    without_counters = [k for k in state if not k.endswith("num_batches_tracked")]
    assert len(without_counters) == N_TENSORS_WITHOUT_COUNTERS == 541
    assert len(state) == N_TENSORS_WITHOUT_COUNTERS + N_NORMS == 648
    assert sum(p.numel() for p in model.body.parameters()) == RESNET101_BODY_PARAMETERS
    model.add_step(1)
    state = model.state_dict()
    assert tuple(state["cls.1.weight"].shape) == (1, 256, 1, 1) and tuple(state["cls.1.bias"].shape) == (1,)
    assert len(state) == 650
    # The body (MiB models/resnet.py::ResNet) maps one-to-one onto torchvision's ResNet-101 (without fc), same shapes.
    torchvision = {k: v.shape for k, v in models.resnet101(weights=None).state_dict().items()
                   if not k.startswith("fc.")}
    body = model.body.state_dict()
    renamed = {to_torchvision_key(k): v.shape for k, v in body.items()}
    assert renamed == torchvision


# ------------------------------------------------------------------------------------------------
# Shapes, dilations, head, classifiers
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("output_stride, sizes", [
    # 65 -> stem conv 33 -> pool 17 (mod2) -> mod3 9 -> mod4 5 (OS16) or 9 (OS8) -> mod5 same as mod4
    (16, [17, 9, 5, 5]),
    (8, [17, 9, 9, 9]),
])
def test_output_shapes(output_stride, sizes):
    torch.manual_seed(0)
    model = build_mib_model([16, 1], "resnet18", output_stride=output_stride).eval()
    model.return_attentions = True
    logits, features = model(torch.randn(2, 3, 65, 65))
    assert logits.shape == (2, 17, sizes[-1], sizes[-1])
    assert [tuple(a.shape) for a in features["attentions"]] == [
        (2, c, s, s) for c, s in zip((64, 128, 256, 512, 256), sizes + [sizes[-1]])]
    assert features["body"].shape == (2, 512, sizes[-1], sizes[-1])
    assert features["pre_logits"].shape == (2, 256, sizes[-1], sizes[-1])
    assert features["sem_logits_small"] is logits
    assert features["attentions"][-1] is features["pre_logits"]


@pytest.mark.parametrize("output_stride, dilations, strides, head", [
    (16, {"mod3": 1, "mod4": 1, "mod5": 2}, {"mod3": 2, "mod4": 2, "mod5": 1}, (6, 12, 18)),
    # OS8 rates (12, 24, 32), not 36 (MiB modules/deeplab.py)
    (8, {"mod3": 1, "mod4": 2, "mod5": 4}, {"mod3": 2, "mod4": 1, "mod5": 1}, (12, 24, 32)),
])
def test_dilations_and_strides(output_stride, dilations, strides, head):
    torch.manual_seed(0)
    body = build_mib_model([2], "resnet50", output_stride=output_stride)
    for name, module in body.body.named_children():
        if name == "mod1":
            continue
        for index, block in enumerate(module.children()):
            conv2 = block.convs.conv2  # the 3x3 conv carries stride and dilation
            d = dilations.get(name, 1)
            assert conv2.dilation == (d, d) and conv2.padding == (d, d), (name, index)
            assert conv2.stride == ((strides.get(name, 1),) * 2 if index == 0 else (1, 1)), (name, index)
            assert block.convs.conv1.stride == (1, 1)
    assert [c.dilation[0] for c in body.head.map_convs[1:]] == list(head)
    assert [c.padding[0] for c in body.head.map_convs[1:]] == list(head)


def test_identity_norm_act_is_linear_in_the_norm_layers():
    torch.manual_seed(0)
    model = build_mib_model([2], "resnet18", norm_act="identity")
    slopes = {m.activation_param for m in model.modules() if isinstance(m, ABN) and m.activation == "leaky_relu"}
    assert slopes == {1.0}
    std = model.head.map_convs[1].weight.std().item()
    fan_in, fan_out = 512 * 9, 256 * 9
    # RCIL: head init gain 1 (RCIL modules/deeplab.py)
    assert std == pytest.approx(1.0 * math.sqrt(2 / (fan_in + fan_out)), rel=0.02)


def test_head_and_classifier_initialisation():
    torch.manual_seed(0)
    model = build_mib_model([16, 1], "resnet18")
    gain = math.sqrt(2 / (1 + SLOPE ** 2))  # calculate_gain('leaky_relu', 0.01) = 1.41414
    fan_in, fan_out = 512 * 9, 256 * 9
    assert model.head.map_convs[1].weight.std().item() == pytest.approx(gain * math.sqrt(2 / (fan_in + fan_out)),
                                                                       rel=0.02)
    assert model.head.red_conv.weight.std().item() == pytest.approx(gain * math.sqrt(2 / (1024 + 256)), rel=0.02)
    for norm in (model.head.map_bn, model.head.global_pooling_bn, model.head.red_bn):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
    bound = 1 / 16  # PyTorch default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 256
    for conv in model.cls:
        assert conv.weight.abs().max() <= bound and conv.bias.abs().max() <= bound
    assert model.cls[0].weight.abs().max() > 0.9 * bound


def windowed_mean_with_replicate_padding(x, k_h, k_w):
    """MiB's eval pooling (MiB modules/deeplab.py) written as a loop: the pooled map (h-k+1)x(w-k+1) is
    replicate-padded by (k-1)//2 before and the rest after, so output pixel (i, j) is the mean of the k_h x k_w
    window starting at (clamp(i - (k_h-1)//2), clamp(j - (k_w-1)//2))."""
    b, c, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(h):
        for j in range(w):
            r = min(max(i - (k_h - 1) // 2, 0), h - k_h)
            s = min(max(j - (k_w - 1) // 2, 0), w - k_w)
            out[:, :, i, j] = x[:, :, r:r + k_h, s:s + k_w].mean(dim=(2, 3))
    return out


def test_eval_pooling_on_small_maps_is_the_global_mean():
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(4))
    mean = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    torch.testing.assert_close(image_pooling(x, 32, training=False), mean)
    torch.testing.assert_close(image_pooling(x, (5, 7), training=False), mean)  # equal to the map size
    assert image_pooling(x, 32, training=True).shape == (2, 3, 1, 1)
    torch.testing.assert_close(image_pooling(x, 2, training=True), x.mean(dim=(2, 3), keepdim=True))


@pytest.mark.parametrize("pooling_size, k_h, k_w", [(4, 4, 4), (3, 3, 3), ((4, 3), 4, 3), (6, 6, 6)])
def test_eval_pooling_on_large_maps_is_windowed_with_replicate_padding(pooling_size, k_h, k_w):
    x = torch.randn(2, 3, 6, 9, generator=torch.Generator().manual_seed(5))
    expected = windowed_mean_with_replicate_padding(x, k_h, k_w)
    torch.testing.assert_close(image_pooling(x, pooling_size, training=False), expected)


def test_head_eval_pooling_window_matters_only_beyond_its_size():
    torch.manual_seed(0)
    model = build_mib_model([3], "resnet18").eval()
    randomise_norm_layers(model)
    x = torch.randn(1, 512, 6, 6)
    full = model.head(x)
    model.head.pooling_size = None  # global mean
    torch.testing.assert_close(model.head(x), full)
    model.head.pooling_size = 3
    assert not torch.allclose(model.head(x), full)


def test_add_step_appends_a_classifier_like_the_model():
    torch.manual_seed(0)
    model = build_mib_model([4], "resnet18").double().eval()
    x = torch.randn(1, 3, 33, 33, dtype=torch.float64)
    before, _ = model(x)
    model.add_step(2)
    assert model.classes_per_step == [4, 2] and model.num_classes == model.num_outputs == 6
    new = model.cls[1]
    assert new.weight.dtype == torch.float64 and not new.training and new.bias.shape == (2,)
    after, _ = model(x)
    assert after.shape[1] == 6 and torch.equal(after[:, :4], before)
    model.train()
    model.add_step(1)
    assert model.cls[2].training and model.num_classes == 7
    with pytest.raises(UserError, match="number of new classes"):
        model.add_step(0)


def test_add_step_keeps_channels_last():
    torch.manual_seed(0)
    model = build_mib_model([4], "resnet18").to(memory_format=torch.channels_last)
    model.add_step(2)
    logits, _ = model(torch.randn(2, 3, 33, 33).contiguous(memory_format=torch.channels_last))
    assert logits.shape == (2, 6, 3, 3)


# ------------------------------------------------------------------------------------------------
# PLOP pre-activation taps (PLOP modules/residual.py::ResidualBlock, models/resnet.py::ResNet.forward)
# ------------------------------------------------------------------------------------------------

def test_attentions_are_last_block_sums_before_the_activation():
    torch.manual_seed(0)
    model = build_mib_model([3], "resnet18").eval()
    randomise_norm_layers(model)
    x = torch.randn(2, 3, 33, 33)
    plain, features = model(x)
    assert "attentions" not in features
    inputs = {}
    hooks = [getattr(model.body, f"mod{m}").block1.register_forward_hook(  # block1's output = block2's input
        lambda module, args, out, m=m: inputs.__setitem__(m, out.clone())) for m in range(2, 6)]
    model.return_attentions = True
    logits, features = model(x)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(logits, plain, rtol=0, atol=0)
    assert len(features["attentions"]) == 5
    for m, tap in zip(range(2, 6), features["attentions"]):
        block = getattr(model.body, f"mod{m}").block2  # identity shortcut: sum = bn2(conv2(...)) + input
        u = block.convs.bn1(block.convs.conv1(inputs[m]))
        expected = block.convs.bn2(block.convs.conv2(u)) + inputs[m]
        torch.testing.assert_close(tap, expected)
        assert (tap < 0).any()  # before the activation
    torch.testing.assert_close(F.leaky_relu(features["attentions"][3], SLOPE), features["body"])


def test_attentions_backward_in_training_mode():
    torch.manual_seed(0)
    model = build_mib_model([3], "resnet18").train()
    model.return_attentions = True
    logits, features = model(torch.randn(2, 3, 33, 33))
    (logits.sum() + sum(a.square().mean() for a in features["attentions"])).backward()
    assert model.body.mod2.block1.convs.conv1.weight.grad is not None


# ------------------------------------------------------------------------------------------------
# Step checkpoints and builder arguments
# ------------------------------------------------------------------------------------------------

def test_mib_step_checkpoint_loads_strictly(tmp_path):
    torch.manual_seed(0)
    source = build_mib_model([3, 2], "resnet18")
    randomise_norm_layers(source)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "step1.pth"
    torch.save({"epoch": 30, "model_state": {"module." + k: v for k, v in state.items()}, "best_score": 0.5}, path)
    torch.manual_seed(1)
    target = build_mib_model([3, 2], "resnet18").eval()
    load_mib_checkpoint(target, str(path))
    x = torch.randn(1, 3, 33, 33)
    torch.testing.assert_close(target(x)[0], source.eval()(x)[0], rtol=0, atol=0)

    smaller = build_mib_model([3], "resnet18")
    with pytest.raises(UserError) as err:
        load_mib_checkpoint(smaller, str(path))
    message = str(err.value)
    assert str(path) in message and "unexpected: cls.1.bias, cls.1.weight" in message and "[3]" in message
    assert "\n" not in message


@pytest.mark.parametrize("kwargs, match", [
    ({"backbone": "resnet34"}, "unknown backbone"),
    ({"output_stride": 32}, "output stride"),
    ({"norm_act": "relu"}, "norm_act"),
    ({"classes_per_step": []}, "classes_per_step"),
    ({"classes_per_step": [16, 0]}, r"classes_per_step\[1\]"),
])
def test_builder_arguments_are_checked(kwargs, match):
    arguments = {"classes_per_step": [16], "backbone": "resnet18", **kwargs}
    with pytest.raises(UserError, match=match):
        build_mib_model(**arguments)
