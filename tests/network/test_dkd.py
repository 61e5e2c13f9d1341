"""network/dkd.py: DKD's head (DKD models/model.py): channels and keys, initialisation, the auxiliary
classifier, positive and negative parts, the novel classifier's initialisation, reference state dicts."""
import math

import pytest
import torch
from torchvision import models

from network.aspp import ATROUS_RATES
from network.dkd import DKDHead, build_dkd_model, convert_reference_state_dict, init_novel_classifier
from utils.errors import UserError


BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def voc_15_1():
    """VOC 15-1 at step 1 (16 + 1 classes) on ResNet-18, in eval mode."""
    torch.manual_seed(0)
    return build_dkd_model([16, 1], backbone="resnet18").eval()


def expected_head_keys(n_cls):
    keys = [f"aspp.convs.{i}.0.weight" for i in range(4)]
    keys += [f"aspp.convs.{i}.1.{k}" for i in range(4) for k in BN_KEYS]
    keys += ["aspp.convs.4.1.weight"] + [f"aspp.convs.4.2.{k}" for k in BN_KEYS]
    keys += ["aspp.project.0.weight"] + [f"aspp.project.1.{k}" for k in BN_KEYS]
    keys += ["last_conv.0.weight"] + [f"last_conv.1.{k}" for k in BN_KEYS]
    keys += [f"cls.{i}.{k}" for i in range(n_cls) for k in ("weight", "bias")]
    return {"classifier." + k for k in keys}


# ---------------------------------------------------------------- network


def test_head_channels_and_keys_voc_15_1():
    torch.manual_seed(0)
    model = build_dkd_model([16], backbone="resnet18").eval()
    state = model.state_dict()
    backbone_keys = {"backbone." + k for k in models.resnet18().state_dict() if not k.startswith("fc.")}
    assert set(state) == expected_head_keys(2) | backbone_keys
    assert state["classifier.cls.0.weight"].shape == (1, 256, 1, 1)
    assert state["classifier.cls.1.weight"].shape == (15, 256, 1, 1)  # step 0 without the background
    assert state["classifier.last_conv.0.weight"].shape == (256, 256, 3, 3)
    assert (model.classes_per_step, model.num_classes, model.classifier.num_outputs) == ([16], 16, 16)
    x = torch.randn(1, 3, 32, 32)
    logits, features = model(x)
    assert logits.shape == (1, 16, 2, 2)  # aux + 15 classes, output stride 16
    assert features["pre_logits"].shape == (1, 256, 2, 2)
    assert features["pos_logits"].shape == features["neg_logits"].shape == (1, 15, 2, 2)

    model.add_step(1)  # step 1 of 15-1
    state = model.state_dict()
    assert set(state) == expected_head_keys(3) | backbone_keys
    assert state["classifier.cls.2.weight"].shape == (1, 256, 1, 1)
    assert (model.classes_per_step, model.num_classes, model.classifier.num_outputs) == ([16, 1], 17, 17)
    logits, features = model(x)
    assert logits.shape == (1, 17, 2, 2)
    assert features["pos_logits"].shape == (1, 16, 2, 2)
    # a model built directly for step 1 has the same layout
    assert set(build_dkd_model([16, 1], backbone="resnet18").state_dict()) == set(state)


def test_head_rejects_a_step_0_without_real_classes():
    with pytest.raises(UserError, match="classes_per_step"):
        DKDHead(512, [1], ATROUS_RATES[16])
    with pytest.raises(UserError):
        DKDHead(512, [16, 0], ATROUS_RATES[16])


def test_initialisation():
    torch.manual_seed(0)
    head = DKDHead(512, [16, 5], ATROUS_RATES[16])
    for m in head.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # kaiming_normal_ (fan_in, gain sqrt 2): std sqrt(2 / fan_in)
    w = torch.cat([c.weight.flatten() for c in head.cls])
    assert w.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.1)
    assert head.last_conv[0].weight.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.05)
    # biases keep PyTorch's default U(−1/sqrt(fan_in), 1/sqrt(fan_in)) = U(−1/16, 1/16)
    b = torch.cat([c.bias for c in head.cls])
    assert b.abs().max().item() <= 1 / 16 and b.abs().max().item() > 1 / 32
    assert head.last_conv[0].bias is None


def test_aux_classifier_gives_no_gradient_to_the_features(voc_15_1):
    model = voc_15_1
    model.zero_grad(set_to_none=True)
    logits, _ = model(torch.randn(1, 3, 32, 32))
    logits[:, 0].sum().backward()
    head = model.classifier
    assert head.cls[0].weight.grad is not None and head.cls[0].weight.grad.abs().sum() > 0
    # the other channels get zero gradients through the concatenation: nothing reaches the features
    for param in (head.last_conv[0].weight, head.aspp.project[0].weight, model.backbone.conv1.weight):
        assert param.grad is None or not param.grad.any()
    model.zero_grad(set_to_none=True)
    logits, _ = model(torch.randn(1, 3, 32, 32))
    logits[:, 1].sum().backward()
    assert head.last_conv[0].weight.grad.any() and not head.cls[0].weight.grad.any()
    model.zero_grad(set_to_none=True)


def test_positive_and_negative_parts(voc_15_1):
    model = voc_15_1
    with torch.no_grad():
        logits, features = model(torch.randn(2, 3, 32, 32))
    pos, neg = features["pos_logits"], features["neg_logits"]
    bias = torch.cat([c.bias for c in model.classifier.cls[1:]]).view(1, -1, 1, 1)
    torch.testing.assert_close(pos + neg + bias, logits[:, 1:], rtol=1e-5, atol=1e-5)
    # explicit sums at a few positions
    x_pl = features["pre_logits"].double().numpy()
    weights = torch.cat([c.weight[:, :, 0, 0] for c in model.classifier.cls[1:]]).detach().double().numpy()
    for b, c, y, x in [(0, 0, 0, 0), (1, 7, 1, 0), (0, 15, 1, 1)]:
        p = sum(x_pl[b, k, y, x] * max(weights[c, k], 0.0) for k in range(256))
        n = sum(x_pl[b, k, y, x] * min(weights[c, k], 0.0) for k in range(256))
        assert pos[b, c, y, x].item() == pytest.approx(p, rel=1e-5, abs=1e-6)
        assert neg[b, c, y, x].item() == pytest.approx(n, rel=1e-5, abs=1e-6)
    assert (pos >= 0).all() and (neg <= 0).all()  # x_pl is post-ReLU


def test_part_gradient_reaches_only_the_weights_of_its_sign():
    torch.manual_seed(0)
    head = DKDHead(8, [3], ATROUS_RATES[16]).eval()
    with torch.no_grad():
        head.cls[1].weight[0, :4] = 0.0  # w == 0 belongs to neither part
    _, features = head(torch.randn(1, 8, 3, 3))
    features["pos_logits"].sum().backward()
    w = head.cls[1].weight[:, :, 0, 0].detach()
    x_sum = features["pre_logits"].detach().sum(dim=(0, 2, 3))  # Σ_{b,y,x} x_pl,k
    expected = torch.where(w > 0, x_sum.expand_as(w), torch.zeros_like(w))
    torch.testing.assert_close(head.cls[1].weight.grad[:, :, 0, 0], expected)


def test_parts_can_be_switched_off():
    head = DKDHead(8, [3], ATROUS_RATES[16], return_parts=False).eval()
    _, features = head(torch.randn(1, 8, 3, 3))
    assert set(features) == {"pre_logits"}


def test_init_novel_classifier():
    torch.manual_seed(0)
    model = build_dkd_model([16], backbone="resnet18")
    with pytest.raises(ValueError):
        init_novel_classifier(model)
    model.add_step(3)
    head = model.classifier
    old = head.cls[1].weight.clone(), head.cls[1].bias.clone()
    init_novel_classifier(model)
    for row in range(3):
        assert torch.equal(head.cls[2].weight[row], head.cls[0].weight[0])
        assert head.cls[2].bias[row].item() == head.cls[0].bias[0].item()
    assert torch.equal(head.cls[1].weight, old[0]) and torch.equal(head.cls[1].bias, old[1])
    init_novel_classifier(head)  # the head itself is accepted too
    with pytest.raises(TypeError):
        init_novel_classifier(torch.nn.Conv2d(1, 1, 1))


def test_builder_loads_a_local_backbone_file(tmp_path):
    torch.manual_seed(1)
    reference = models.resnet18().state_dict()
    path = tmp_path / "r18.pth"
    torch.save(reference, path)
    model = build_dkd_model([6, 2], backbone="resnet18", pretrained=str(path))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, reference["layer4.1.conv2.weight"])
    with pytest.raises(UserError):
        build_dkd_model([6], backbone="resnet34")


def test_convert_reference_state_dict():
    model = build_dkd_model([4, 1], backbone="resnet18")
    ours = model.state_dict()

    def reference_name(key):  # DKD keeps last_conv inside its ASPP and has no "classifier." level
        key = key.replace("classifier.last_conv.", "aspp.last_conv.").replace("classifier.", "")
        return "module." + key

    reference = {reference_name(k): v for k, v in ours.items()}
    assert "module.aspp.last_conv.1.running_var" in reference and "module.cls.2.bias" in reference
    converted = convert_reference_state_dict(reference)
    assert set(converted) == set(ours)
    model.load_state_dict(converted, strict=True)
    assert convert_reference_state_dict({"cls.0.weight": 1})["classifier.cls.0.weight"] == 1
    with pytest.raises(UserError, match="decoder.x"):
        convert_reference_state_dict({"decoder.x": torch.zeros(1)})
