"""DKD's network head, loss terms and method hooks (DKD models/model.py, models/loss.py) against hand
computations and explicit loops."""
import collections
import json
import math

import numpy as np
import pytest
import torch
from torchvision import models

from methods import dkd, dkd_losses, get_method
from methods.base import Batch, MemoryUse, StepContext
from methods.memory import collect_candidates
from network.aspp import ATROUS_RATES
from network.dkd import (DKDHead, build_dkd_model, convert_reference_state_dict, init_novel_classifier,
                         reference_checkpoint_state)
from engine.cli import parse_args
from utils.errors import UserError
from utils.schedulers import build_scheduler
from utils.tasks import get_task

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def bce(x, t, w=1.0):
    """−[w·t·log σ(x) + (1 − t)·log(1 − σ(x))], straight from the formula."""
    return -(w * t * math.log(sigmoid(x)) + (1 - t) * math.log(1 - sigmoid(x)))


def per_class_mean_sum(x, target_of, w_of=lambda c: 1.0):
    """Σ_c (1/(B·H·W)) Σ_{b,y,x} bce(x[b,c,y,x], target_of(b, c, y, x), w_c) as explicit loops."""
    batch, channels, height, width = x.shape
    total = 0.0
    for c in range(channels):
        acc = 0.0
        for b in range(batch):
            for y in range(height):
                for x_ in range(width):
                    acc += bce(float(x[b, c, y, x_]), target_of(b, c, y, x_), w_of(c))
        total += acc / (batch * height * width)
    return total


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


# ---------------------------------------------------------------- losses


def test_mbce_counts_void_old_and_background_as_negatives():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(2, 2, 3, 3)), dtype=torch.float32)
    labels = torch.tensor([[[0, 5, 255], [6, 6, 3], [255, 0, 5]],
                           [[5, 5, 5], [1, 255, 6], [0, 0, 0]]])
    ids = [5, 6]

    def target(b, c, y, x):
        return 1.0 if int(labels[b, y, x]) == ids[c] else 0.0

    for pos_weight, w_of in [(1.0, lambda c: 1.0), (2.5, lambda c: 2.5),
                             (torch.tensor([2.0, 0.5]), lambda c: [2.0, 0.5][c])]:
        expected = per_class_mean_sum(logits, target, w_of)
        got = dkd_losses.mbce_loss(logits, labels, ids, pos_weight)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(expected, rel=1e-5)
    # void pixels are not skipped: leaving them out would change the value
    valid = labels != 255
    masked = sum(
        (torch.nn.functional.binary_cross_entropy_with_logits(
            logits[:, c], (labels == ids[c]).float(), reduction="none") * valid).sum() / valid.sum()
        for c in range(2))
    assert abs(dkd_losses.mbce_loss(logits, labels, ids, 1.0).item() - masked.item()) > 1e-3


def test_mbce_by_hand_single_pixel():
    logits = torch.tensor([[[[0.3]], [[-1.2]]]])
    labels = torch.tensor([[[7]]])
    # class 7 positive with weight 3, class 8 negative
    expected = 3 * math.log1p(math.exp(-0.3)) + math.log1p(math.exp(-1.2))
    assert dkd_losses.mbce_loss(logits, labels, range(7, 9), 3.0).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError):
        dkd_losses.mbce_loss(logits, labels, [7], 1.0)


def test_kd_and_dkd_losses_against_loops():
    rng = np.random.default_rng(1)
    student = torch.tensor(rng.normal(size=(2, 3, 2, 3)) * 2, dtype=torch.float32)
    teacher = torch.tensor(rng.normal(size=(2, 3, 2, 3)) * 2, dtype=torch.float32)
    expected = per_class_mean_sum(student, lambda b, c, y, x: sigmoid(float(teacher[b, c, y, x])))
    assert dkd_losses.kd_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert dkd_losses.dkd_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert dkd_losses.kd_loss(student.half(), teacher.half()).dtype == torch.float32
    with pytest.raises(ValueError):
        dkd_losses.dkd_loss(student, teacher[:, :2])


def test_ac_loss_by_hand():
    aux = torch.tensor([[[[0.0, 2.0]], ], [[[-1.0, 0.5]], ]])  # (2, 1, 1, 2)
    values = [-math.log(1 - sigmoid(v)) for v in (0.0, 2.0, -1.0, 0.5)]
    assert dkd_losses.ac_loss(aux).item() == pytest.approx(sum(values) / 4, rel=1e-6)


def test_loss_terms_step_0_and_step_1():
    rng = np.random.default_rng(2)
    # spatially constant logits (h = w = 1): upsampling to the 2×3 labels keeps the values
    logits = torch.tensor(rng.normal(size=(2, 5, 1, 1)), dtype=torch.float32)
    labels = torch.tensor([[[0, 3, 4], [255, 1, 3]], [[4, 4, 0], [2, 255, 0]]])

    def z(b, c):
        return float(logits[b, c, 0, 0])

    # step 0 of a 5-class model: classes 1..4 current, aux channel 0
    terms = dkd_losses.dkd_loss_terms(logits, {}, labels, 1, pos_weight=2.0)
    mbce = sum(sum(bce(z(b, c), float(labels[b, y, x] == c), 2.0) for b in range(2) for y in range(2)
                   for x in range(3)) / 12 for c in range(1, 5))
    ac = sum(bce(z(b, 0), 0.0) for b in range(2)) / 2
    assert set(terms) == {"mbce", "ac", "total"}
    assert terms["mbce"].item() == pytest.approx(mbce, rel=1e-5)
    assert terms["ac"].item() == pytest.approx(ac, rel=1e-5)
    assert terms["total"].item() == pytest.approx(mbce + ac, rel=1e-5)

    # step 1: K_old = 3 (aux + classes 1, 2), new classes 3, 4
    old = torch.tensor(rng.normal(size=(2, 3, 1, 1)), dtype=torch.float32)
    parts = {k: torch.tensor(rng.normal(size=(2, 4, 2, 2)), dtype=torch.float32)
             for k in ("pos_logits", "neg_logits")}
    parts_old = {k: torch.tensor(rng.normal(size=(2, 2, 2, 2)), dtype=torch.float32)
                 for k in ("pos_logits", "neg_logits")}
    terms = dkd_losses.dkd_loss_terms(logits, parts, labels, 3, old, parts_old, pos_weight=1.0)
    mbce = sum(sum(bce(z(b, c), float(labels[b, y, x] == c)) for b in range(2) for y in range(2)
                   for x in range(3)) / 12 for c in (3, 4))
    kd = sum(sum(bce(z(b, c), sigmoid(float(old[b, c, 0, 0]))) for b in range(2)) / 2 for c in (1, 2))
    dkd_pos = per_class_mean_sum(parts["pos_logits"][:, :2],
                                 lambda b, c, y, x: sigmoid(float(parts_old["pos_logits"][b, c, y, x])))
    dkd_neg = per_class_mean_sum(parts["neg_logits"][:, :2],
                                 lambda b, c, y, x: sigmoid(float(parts_old["neg_logits"][b, c, y, x])))
    for name, value in [("mbce", mbce), ("ac", ac), ("kd", kd), ("dkd_pos", dkd_pos), ("dkd_neg", dkd_neg)]:
        assert terms[name].item() == pytest.approx(value, rel=1e-5), name
    total = mbce + 5 * kd + 5 * dkd_pos + 5 * dkd_neg + ac
    assert terms["total"].item() == pytest.approx(total, rel=1e-5)
    with pytest.raises(ValueError):
        dkd_losses.dkd_loss_terms(logits, parts, labels, 3)  # a step ≥ 1 without a teacher


def test_reference_constants():
    assert (dkd.W_MBCE, dkd.W_KD, dkd.W_DKD_POS, dkd.W_DKD_NEG, dkd.W_AC) == (1, 5, 5, 5, 1)
    assert [dkd.default_pos_weight("voc", s) for s in (0, 1, 2)] == [2, 1, 1]
    assert [dkd.default_pos_weight("ade", s) for s in (0, 1)] == [35, 35]
    assert [dkd.backbone_lr("voc", s) for s in (0, 3)] == [1e-3, 1e-4]
    assert [dkd.backbone_lr("ade", s) for s in (0, 1)] == [2.5e-3, 2.5e-4]
    assert dkd.HEAD_LR_FACTOR == 10 and dkd.WARMUP_FRACTION["ade"] == 0.2
    assert dkd.MEMORY_SIZE == {"voc": 100, "ade": 300} and dkd.MEMORY_PSEUDO_THRESHOLD == 0.9


# ---------------------------------------------------------------- prediction


def test_prediction_rule_by_hand():
    #                 pixel:   0      1     2     3     4
    logits = torch.tensor([[[10.0, 10.0, -1.0, -9.0, 99.0],   # aux: ignored even when largest
                            [-1.0, 1.0, 2.0, -3.0, -3.0],     # class 1
                            [0.0, 3.0, -5.0, 20.0, -3.0],     # class 2
                            [-0.5, -2.0, 2.0, 40.0, 0.1]]])   # class 3
    logits = logits.view(1, 4, 1, 5)
    # 0: no s > 0.5 (σ(0) = 0.5 is not > 0.5) -> background; 1: class 2; 2: tie 1/3 -> 1;
    # 3: σ(20) and σ(40) both round to 1.0 in float32 -> tie -> 2 (argmax of the logits would say 3);
    # 4: only class 3 above 0.5
    assert dkd_losses.dkd_predict(logits).tolist() == [[[0, 2, 1, 2, 3]]]


def test_prediction_upsamples_logits_before_the_sigmoid():
    logits = torch.tensor([[[[-10.0, -10.0]], [[-10.0, 2.0]]]])  # (1, 2, 1, 2): aux, class 1
    # bilinear ×2 (align_corners=False) of class 1 along x: -10, -7, -1, 2 -> only the last one is > 0;
    # upsampling σ instead would give σ(-10)/4 + 3σ(2)/4 ≈ 0.66 > 0.5 at the third position
    pred = dkd_losses.dkd_predict(logits, size=(1, 4))
    assert pred.shape == (1, 1, 4) and pred.dtype == torch.int64
    assert pred.tolist() == [[[0, 0, 0, 1]]]


# --------------------------------------- the method class (DKD train_voc.py, utils/memory.py::memory_sampling_balanced)


VOC_15_1 = tuple(tuple(s) for s in get_task("voc", "15-1"))
ADE_100_50 = tuple(tuple(s) for s in get_task("ade", "100-50"))


def ids(params):
    return {id(p) for p in params}


def test_method_registry_defaults_and_flags():
    voc, ade = get_method("dkd"), get_method("dkd", dataset="ade")
    assert (voc.hp.pos_weight_base, voc.hp.pos_weight, ade.hp.pos_weight_base, ade.hp.pos_weight) == (2, 1, 35, 35)
    assert (voc.hp.w_mbce, voc.hp.w_kd, voc.hp.w_dkd_pos, voc.hp.w_dkd_neg, voc.hp.w_ac) == (1, 5, 5, 5, 1)
    assert voc.hp.head_lr_factor == 10 and voc.hp.mem_size == 0 and voc.hp.mem_pseudo_thresh == 0.9
    assert (voc.model_families, voc.test_split) == (("dkd",), "test_seen")
    args = parse_args(["--data_root", "x", "--method", "dkd", "--dataset", "ade", "--mem_size", "300",
                       "--pos_weight", "3"])
    assert (args.mem_size, args.pos_weight, args.pos_weight_base) == (300, 3.0, 35.0)


def test_label_tables_voc():
    method = get_method("dkd")
    lut = method.label_policy(VOC_15_1, 1, "train")
    assert lut[16] == 16 and lut[255] == 255 and lut[0] == 0
    assert all(lut[c] == 0 for c in list(range(1, 16)) + list(range(17, 21)))  # old and future → background
    assert np.array_equal(method.label_policy(VOC_15_1, 1, "val"), lut)  # VOC val: masking value 0 as well
    assert np.array_equal(method.label_policy(VOC_15_1, 1, "memory"), lut)  # memory labels masked like current data
    test = method.label_policy(VOC_15_1, 1, "test")
    assert [int(test[c]) for c in range(21)] == list(range(17)) + [0, 0, 0, 0]  # VOC future → 0
    assert test[255] == 255
    step0 = method.label_policy(VOC_15_1, 0, "train")
    assert [int(step0[c]) for c in range(21)] == list(range(16)) + [0] * 5


def test_label_tables_ade():
    method = get_method("dkd", dataset="ade")
    train = method.label_policy(ADE_100_50, 1, "train")
    assert [int(train[c]) for c in (0, 1, 100, 101, 150)] == [0, 0, 0, 101, 150]
    val = method.label_policy(ADE_100_50, 1, "val")
    assert [int(val[c]) for c in (0, 1, 100, 101, 150)] == [0, 255, 255, 101, 150]  # ADE: old → 255, ADE 0 kept
    test0 = method.label_policy(ADE_100_50, 0, "test")
    assert [int(test0[c]) for c in (0, 1, 100, 101, 150)] == [0, 1, 100, 255, 255]  # ADE future → 255
    test1 = method.label_policy(ADE_100_50, 1, "test")
    assert [int(test1[c]) for c in range(151)] == list(range(151))


def test_label_tables_follow_a_shuffled_order():
    steps = tuple(tuple(s) for s in get_task("voc", "15-1_b"))  # step 0: 0, 12, 9, 20, ...; step 1: [17]
    method = get_method("dkd")
    train = method.label_policy(steps, 1, "train")
    assert train[17] == 16 and train[12] == 0 and train[3] == 0  # position 16 of the concatenated order
    test = method.label_policy(steps, 1, "test")
    assert (test[12], test[9], test[20], test[11], test[17], test[3]) == (1, 2, 3, 15, 16, 0)


def model_for(classes_per_step, seed=0):
    torch.manual_seed(seed)
    return build_dkd_model(classes_per_step, backbone="resnet18")


def test_parameter_groups_and_weight_decay_step_0():
    method, model = get_method("dkd"), model_for([16])
    ctx = StepContext("voc", VOC_15_1, 0)
    method.configure(model, ctx)
    groups = method.param_groups(model, ctx, lr=1e-3)
    head = model.classifier
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-2), pytest.approx(1e-2)]
    assert all("weight_decay" not in g for g in groups)  # the trainer's --weight_decay (1e-4) everywhere
    assert ids(groups[0]["params"]) == ids(model.backbone.parameters())  # BN parameters included at step 0
    assert ids(groups[1]["params"]) == ids(list(head.aspp.parameters()) + list(head.last_conv.parameters()))
    assert ids(groups[2]["params"]) == ids(head.cls.parameters())
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_parameter_groups_weight_decay_and_frozen_bn_at_t1():
    method, model = get_method("dkd"), model_for([16, 1])
    ctx = StepContext("voc", VOC_15_1, 1)
    method.configure(model, ctx)
    groups = method.param_groups(model, ctx, lr=1e-4)
    head = model.classifier

    def conv_params(module):
        return [p for m in module.modules() if isinstance(m, torch.nn.Conv2d) for p in m.parameters()]

    assert [g["lr"] for g in groups] == [1e-4, pytest.approx(1e-3), pytest.approx(1e-3), pytest.approx(1e-3)]
    assert [g.get("weight_decay") for g in groups] == [0.0, 0.0, 0.0, None]  # only the new classifier decays
    assert ids(groups[0]["params"]) == ids(conv_params(model.backbone))  # BN parameters out of the optimizer
    assert ids(groups[1]["params"]) == ids(conv_params(head.aspp) + conv_params(head.last_conv))
    assert ids(groups[2]["params"]) == ids(list(head.cls[0].parameters()) + list(head.cls[1].parameters()))
    assert ids(groups[3]["params"]) == ids(head.cls[2].parameters())
    bn = [p for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()]
    assert bn and not any(p.requires_grad for p in bn)
    assert sum(len(g["params"]) for g in groups) + len(bn) == len(list(model.parameters()))


def test_train_mode_freezes_bn_and_dropout_at_t1_only():
    method = get_method("dkd")
    for step, frozen in ((0, False), (1, True)):
        model = model_for([16] + [1] * step)
        ctx = StepContext("voc", VOC_15_1, step)
        method.configure(model, ctx)
        method.set_train_mode(model, ctx)
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        assert bns and drops
        assert all(m.training != frozen and m.weight.requires_grad != frozen for m in bns)
        assert all(m.training != frozen for m in drops)
        assert model.classifier.cls[0].training  # the rest stays in training mode
    assert method.bn_frozen(StepContext("voc", VOC_15_1, 1)) and not method.bn_frozen(StepContext("voc", VOC_15_1, 0))


def test_prepare_student_copies_the_aux_classifier_only_when_w_ac_is_positive():
    ctx = StepContext("voc", VOC_15_1, 1)
    model = model_for([16, 1], seed=3)
    get_method("dkd").prepare_student(model, None, ctx)
    head = model.classifier
    assert torch.equal(head.cls[2].weight, head.cls[0].weight) and torch.equal(head.cls[2].bias, head.cls[0].bias)
    model = model_for([16, 1], seed=3)
    before = model.classifier.cls[2].weight.clone()
    get_method("dkd", w_ac=0.0).prepare_student(model, None, ctx)  # DKD: random init when ac = 0
    assert torch.equal(model.classifier.cls[2].weight, before)


def scheduled_lrs(method, ctx, policy, total):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_scheduler(policy, optimizer, total, **method.schedule_options(ctx))
    seen = [optimizer.param_groups[0]["lr"]]
    for _ in range(total):
        optimizer.step()
        scheduler.step()
        seen.append(optimizer.param_groups[0]["lr"])
    return seen


def test_schedules_voc_poly_without_floor_and_ade_unrounded_warmup():
    ctx = StepContext("voc", VOC_15_1, 1)
    seen = scheduled_lrs(get_method("dkd"), ctx, "poly", 7)
    assert seen == [pytest.approx((1 - i / 7) ** 0.9, rel=1e-12, abs=0) for i in range(8)]
    assert seen[-1] == 0.0  # DKD's PolyLR has no 1e-6 floor
    seen = scheduled_lrs(get_method("dkd", dataset="ade"), StepContext("ade", ADE_100_50, 1), "warm_poly", 7)
    warm = 0.2 * 7  # 1.4 warm-up iterations: not rounded down to 1 (DKD's WarmupPolyLR)
    expected = [(0.001 * (1 - i / warm) + i / warm if i < warm else 1.0) * (1 - i / 7) ** 0.9 for i in range(8)]
    assert seen == [pytest.approx(e, rel=1e-12, abs=0) for e in expected]
    assert seen[1] == pytest.approx((0.001 * (1 - 1 / 1.4) + 1 / 1.4) * (6 / 7) ** 0.9)


def test_loss_hook_uses_the_step_and_dataset_pos_weight():
    # one pixel row of 2 positions; logits constant over the 1x1 feature map (upsampling keeps them)
    logits = torch.tensor([[[[0.4]], [[-0.3]], [[1.1]]]])  # (1, 3, 1, 1): aux, class 1, class 2
    labels = torch.tensor([[[1, 255]]])
    steps = ((0, 1, 2), (3,))
    for dataset, pw in (("voc", 2.0), ("ade", 35.0)):
        terms = get_method("dkd", dataset=dataset).loss((logits, {}), None, Batch(None, labels),
                                                        StepContext(dataset, steps, 0))
        mbce = (bce(-0.3, 1, pw) + bce(-0.3, 0, pw)) / 2 + (bce(1.1, 0, pw) + bce(1.1, 0, pw)) / 2
        assert set(terms) == {"total", "mbce", "ac"}
        assert terms["mbce"].item() == pytest.approx(mbce, rel=1e-6)
        assert terms["total"].item() == pytest.approx(mbce + bce(0.4, 0), rel=1e-6)
    # step 1 (VOC: pos_weight 1): classes 1, 2 old, 3 new; custom KD weight
    logits = torch.tensor([[[[0.4]], [[-0.3]], [[1.1]], [[0.7]]]])
    parts = {k: torch.randn(1, 3, 1, 1) for k in ("pos_logits", "neg_logits")}
    old = (torch.tensor([[[[0.0]], [[0.5]], [[-2.0]]]]), {k: torch.randn(1, 2, 1, 1) for k in parts})
    labels = torch.tensor([[[3, 0]]])
    terms = get_method("dkd", w_kd=2.0).loss((logits, parts), old, Batch(None, labels),
                                             StepContext("voc", steps, 1))
    assert set(terms) == {"total", "mbce", "ac", "kd", "dkd_pos", "dkd_neg"}
    assert terms["mbce"].item() == pytest.approx((bce(0.7, 1) + bce(0.7, 0)) / 2, rel=1e-6)
    kd = bce(-0.3, sigmoid(0.5)) + bce(1.1, sigmoid(-2.0))
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-6)
    total = terms["mbce"] + 2 * terms["kd"] + 5 * terms["dkd_pos"] + 5 * terms["dkd_neg"] + terms["ac"]
    assert terms["total"].item() == pytest.approx(total.item(), rel=1e-6)


def test_method_prediction_and_evaluation_convention():
    logits = torch.tensor([[[[9.0, 9.0]], [[-1.0, 3.0]], [[0.5, 1.0]]]])  # aux, class 1, class 2 at 2 pixels
    assert get_method("dkd").predict(logits, (1, 2)).tolist() == [[[2, 1]]]
    assert get_method("dkd").eval_convention()["exclude_absent"] is False
    assert get_method("dkd", dataset="ade").eval_convention()["future_classes"] == "ignored"


def test_validation_cadence_and_selection():
    method = get_method("dkd")
    assert not any(method.validation_due(i, 5, 50, None) for i in range(1, 51))  # DKD never validates
    assert [i for i in range(1, 51) if method.validation_due(i, 5, 50, 3)] == [15, 30, 45]
    assert not any(method.validation_due(i, 5, 50, 0) for i in range(1, 51))
    assert not method.selects_best(StepContext("voc", VOC_15_1, 1), None)
    assert method.selects_best(StepContext("voc", VOC_15_1, 1), True)


def test_memory_pseudo_labels_by_hand():
    labels = torch.tensor([[[0, 3], [255, 0]], [[0, 0], [1, 0]]])
    logits = torch.zeros(2, 4, 1, 1)
    logits[0, :, 0, 0] = torch.tensor([9.0, 3.0, 1.0, -1.0])  # aux ignored; class 1: σ(3) = 0.953 ≥ 0.9
    logits[1, :, 0, 0] = torch.tensor([9.0, -1.0, 2.0, 1.0])  # class 2: σ(2) = 0.881 < 0.9
    out = dkd_losses.dkd_memory_pseudo_labels(logits, labels)
    assert out.dtype == torch.int64
    assert out.tolist() == [[[1, 3], [255, 1]], [[0, 0], [1, 0]]]  # only background pixels change
    at = float(torch.sigmoid(torch.tensor(2.0)))  # the comparison is ≥
    assert dkd_losses.dkd_memory_pseudo_labels(logits, labels, at)[1].tolist() == [[2, 2], [1, 2]]


class FakeStepData:
    """What ``DKD.before_step`` uses of :class:`engine.passes.StepData`, over hand-made batches."""

    seed = 5

    def __init__(self, batches):
        self._batches, self.calls = batches, []

    def previous_samples(self):
        return ["previous"]

    def batches(self, samples, split="train", step=None, transform="eval", shard=False, batch_size=None):
        self.calls.append((samples, split, step, transform))
        return iter(self._batches)

    def broadcast(self, obj):
        return obj


class ConstantTeacher(torch.nn.Module):
    """Logits constant in space: ``table[i]`` for image ``i`` of every batch."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, images):
        return self.table[:images.shape[0], :, None, None].expand(-1, -1, 2, 2), {}


def single_class_batches(n_per_class, classes, size=2):
    """Batches of 2 images, each image labelled with one class on one pixel (its id: ``img<class>_<k>``)."""
    records = [(f"img{c}_{k}", c) for k in range(n_per_class) for c in classes]
    batches = []
    for start in range(0, len(records), 2):
        chunk = records[start:start + 2]
        labels = torch.zeros(len(chunk), size, size, dtype=torch.long)
        for i, (_, c) in enumerate(chunk):
            labels[i, 0, 0] = c
        batches.append(Batch(torch.zeros(len(chunk), 3, size, size), labels, ids=tuple(r[0] for r in chunk)))
    return batches


def memory_ids(method):
    """The image ids of the memory the method gives the trainer (its ``memory`` hook)."""
    memory = method.memory(None)
    return list(memory.ids) if memory is not None else []


def test_memory_is_class_balanced_and_terminates():
    steps = ((0, 1, 2, 3), (4,), (5,))
    ctx = StepContext("voc", steps, 1)
    data = FakeStepData(single_class_batches(5, (1, 2, 3)) + [
        Batch(torch.zeros(1, 3, 2, 2), torch.tensor([[[0, 255], [0, 0]]]), ids=("nothing",))])
    method = get_method("dkd", mem_size=6)
    method.before_step(None, None, data, ctx)
    assert data.calls == [(["previous"], "train", 0, "train")]  # step t-1's masked labels, augmented crops
    chosen = memory_ids(method)
    assert method.memory(ctx) == MemoryUse(tuple(chosen), mode="concat", label_split="train")  # joins the set
    assert len(chosen) == 6 and chosen == sorted(chosen)
    counts = collections.Counter(name.split("_")[0] for name in chosen)
    assert counts == {"img1": 2, "img2": 2, "img3": 2}  # round-robin over the old classes
    again = get_method("dkd", mem_size=6)
    again.before_step(None, None, FakeStepData(data._batches), ctx)
    assert memory_ids(again) == chosen  # reproducible for a seed
    big = get_method("dkd", mem_size=100)
    big.before_step(None, None, FakeStepData(data._batches), ctx)  # more than the candidates: stops
    assert len(memory_ids(big)) == 15 and "nothing" not in memory_ids(big)
    assert get_method("dkd").memory(ctx) is None and not get_method("dkd").step_files()  # DKD: no memory


def test_memory_at_t2_starts_from_the_previous_memory_and_uses_teacher_pseudo_labels():
    steps = ((0, 1, 2), (3,), (4,))
    method = get_method("dkd", mem_size=10)
    previous = {"step": 1, "memories": {"step_1": {"memory_list": ["a", "b"],
                                                  "memory_candidates": [["a", [1]], ["b", [2]]]}}}
    method.load_previous_state(previous, StepContext("voc", steps, 2))
    assert memory_ids(method) == []  # step 2's memory is chosen by before_step
    labels = torch.tensor([[[0, 0], [0, 0]], [[3, 0], [0, 255]], [[0, 0], [0, 0]]])
    batch = Batch(torch.zeros(3, 3, 2, 2), labels, ids=("c", "d", "e"))
    # teacher (step 1 model, K_old = 4): image c → class 2 at σ(4) ≥ 0.9; d → class 1 on its background;
    # e → nothing above 0.9
    table = torch.tensor([[0.0, -4.0, 4.0, -4.0], [0.0, 5.0, -4.0, -4.0], [0.0, 1.0, 2.0, 0.0]])
    method.before_step(None, ConstantTeacher(table), FakeStepData([batch]), StepContext("voc", steps, 2))
    state = method.state_dict()["memories"]["step_2"]
    assert state["memory_list"] == ["a", "b", "c", "d"]  # e has no old class: never chosen, no endless loop
    records = dict((name, classes) for name, classes in state["memory_candidates"])
    assert records == {"a": [1], "b": [2], "c": [2], "d": [1, 3]}
    assert method.step_files()["memory.json"].keys() == {"step_1", "step_2"}  # DKD's file keeps every step


def test_memory_state_round_trip():
    steps = ((0, 1, 2, 3), (4,))
    method = get_method("dkd", mem_size=4)
    method.before_step(None, None, FakeStepData(single_class_batches(3, (1, 2, 3))), StepContext("voc", steps, 1))
    state = method.state_dict()
    restored = get_method("dkd", mem_size=4)
    restored.load_state_dict(json.loads(json.dumps(state)))  # JSON-safe
    assert memory_ids(restored) == memory_ids(method) and len(memory_ids(method)) == 4
    assert restored.step_files() == method.step_files()
    assert method.step_files()["memory.json"]["step_1"]["memory_list"] == memory_ids(method)


def test_collect_candidates_with_and_without_relabelling():
    batch = Batch(None, torch.tensor([[[0, 2], [255, 2]], [[0, 0], [0, 0]]]), ids=("x", "y"))
    assert collect_candidates([batch]) == [["x", [2]], ["y", []]]
    relabelled = collect_candidates([batch], relabel=lambda b: torch.where(b.labels == 0, 5, b.labels))
    assert relabelled == [["x", [2, 5]], ["y", [5]]]


def test_reference_checkpoint_state_loads_a_dkd_checkpoint():
    model = build_dkd_model([4, 1], backbone="resnet18")
    ours = model.state_dict()
    reference = {k.replace("classifier.last_conv.", "aspp.last_conv.").replace("classifier.", ""): v
                 for k, v in ours.items()}
    checkpoint = {"arch": "DeepLabV3", "epoch": 60, "state_dict": reference, "monitor_best": 0}
    method = get_method("dkd")
    model.load_state_dict(method.convert_previous_state(checkpoint), strict=True)
    ciss = {"model_state": {"module." + k: v for k, v in ours.items()}, "classes": [[0, 1, 2, 3], [4]]}
    assert method.convert_previous_state(ciss).keys() == ours.keys()  # ciss checkpoints pass through
    assert reference_checkpoint_state(reference).keys() == ours.keys()  # a bare state dict works too
    with pytest.raises(UserError):
        reference_checkpoint_state([1, 2])
