"""RCIL's network (dual-branch blocks and ASPP, gates, ImageNet loading), its branch merge and the method's hooks
(RCIL modules/residual.py, run.py::convert_model), against computations by hand from RCIL's formulas."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods import get_method, losses
from methods.base import Batch, ModelSpec, StepContext
from methods.rcil import GATE_STATE_KEY, RCIL_VAL_INTERVAL, gate_seed
from network import FAMILIES
from network.mib import build_mib_model
from network.rcil import (BranchGates, DualBranchBlock, DualDeeplabV3Head, add_merge_biases, build_rcil_model,
                          gate_weights)
from network.rcil_merge import fold_branch, merge_branches
from helpers import randomise_norm_layers as randomise
from test_rcil_losses import channel_numpy, spatial_numpy

EPS = 1e-5
SLOPE = 0.01
SPEC = ModelSpec("rcil", "resnet18")
STEPS = ((0, 1, 2), (3, 4))  # K_old = 3, N_new = 2


@pytest.fixture(autouse=True)
def rcil_family(monkeypatch):
    """The ``rcil`` family, until ``network/__init__.py`` registers it."""
    if "rcil" not in FAMILIES:
        monkeypatch.setitem(FAMILIES, "rcil", build_rcil_model)


def images(shape=(2, 3, 33, 33), seed=7):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_relative(actual, expected, tol=1e-5):
    """|actual − expected| ≤ tol · max|expected| everywhere."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


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


# ---- merge ---------------------------------------------------------------------------------------------------


def test_fold_branch_by_hand():
    weight, bias = torch.tensor([[[[2.0]]]]), torch.tensor([1.0])
    # γ' = (|−3| + 1) / 2 = 2, β' = 0.2, s = √(3 + 1) = 2, t = 1: W' = 2, b' = 0.2 − 0.5·2/2 + 1·1 = 0.7
    w, b = fold_branch(weight, bias, torch.tensor([-3.0]), torch.tensor([0.4]), torch.tensor([0.5]),
                       torch.tensor([3.0]), 1.0)
    assert w.flatten().tolist() == [2.0] and b.tolist() == pytest.approx([0.7])
    w, b = fold_branch(weight, None, torch.tensor([-3.0]), torch.tensor([0.4]), torch.tensor([0.5]),
                       torch.tensor([3.0]), 1.0)
    assert b.tolist() == pytest.approx([-0.3])


def eval_outputs(model, x, first_only=False):
    """Eval-mode logits and taps; ``first_only``: every gate at (w1, w2) = (2, 0), i.e. the first (merged)
    branch alone."""
    model.eval()
    if first_only:
        model.gates.weights = lambda channels, training: (torch.full((1, channels, 1, 1), 2.0),
                                                          torch.zeros(1, channels, 1, 1))
    try:
        with torch.no_grad():
            logits, features = model(x)
    finally:
        model.gates.__dict__.pop("weights", None)
    return [logits] + list(features["attentions"])


def check_merged_layers(model):
    for block in (m for m in model.modules() if isinstance(m, DualBranchBlock)):
        bn = block.convs.bn2
        assert bn.eps == 0 and torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var)) and not bn.running_mean.any()
        assert not bn.bias.any() and not bn.training
        assert not any(p.requires_grad for p in (block.convs.conv2.weight, block.convs.conv2.bias, bn.weight))
        assert block.convs.conv2_new.weight.requires_grad and block.convs.bn2_new.weight.requires_grad
    head = model.head
    assert head.map_bn.eps == 0 and not head.map_bn.training
    assert all(not p.requires_grad for p in head.map_convs.parameters())
    assert all(p.requires_grad for p in head.map_convs_new.parameters())


def test_merge_reproduces_the_two_branch_mixture():
    """The merged branch alone (gates (2, 0)) computes what the unmerged model computed in eval, ½(b1 + b2); the
    merged model's own eval output is ½(merged + new branch) (RCIL run.py::convert_model), so it differs."""
    model = randomise(build_rcil_model([3], "resnet18"))
    x = images()
    before = eval_outputs(model, x)
    new_branch = model.body.mod3.block2.convs.conv2_new.weight.clone()
    merge_branches(model)
    after = eval_outputs(model, x, first_only=True)
    for a, b in zip(after, before):
        assert_relative(a, b)
    mixed = eval_outputs(model, x)[0]
    assert not torch.allclose(mixed, before[0], rtol=1e-3)
    check_merged_layers(model)
    assert torch.equal(model.body.mod3.block2.convs.conv2_new.weight, new_branch)  # the new branch is kept
    assert model.merged and model.body.mod2.block1.merged

    # step >= 2: the merged checkpoint loads into a model built with the biases; its new branch has moved on
    state = model.state_dict()
    student = build_rcil_model([3], "resnet18", merged=True)
    student.load_state_dict(state)
    assert student.body.mod2.block1.convs.bn2.eps == EPS  # quirk (RCIL run.py::convert_model): a reload keeps eps 1e-5
    assert_relative(eval_outputs(student, x)[0], mixed, tol=1e-4)
    randomise(student, seed=4)  # different branches and statistics everywhere, merged biases kept
    with torch.no_grad():
        for block in (m for m in student.modules() if isinstance(m, DualBranchBlock)):
            block.convs.conv2.bias.normal_(0, 0.1)
    before = eval_outputs(student, x)
    merge_branches(student)
    for a, b in zip(eval_outputs(student, x, first_only=True), before):
        assert_relative(a, b)
    check_merged_layers(student)


def test_merge_of_bottleneck_block_and_head_slices():
    gates = BranchGates()
    block = randomise(DualBranchBlock(6, (8, 8, 12), stride=1, dilation=2, gates=gates), seed=5)
    head = randomise(DualDeeplabV3Head(12, 16, gates, hidden_channels=4, out_channels=8), seed=6)
    x = images((2, 6, 7, 7))
    for module in (block, head):
        module.eval()
    with torch.no_grad():
        before = head(block(x))
        merge_branches(block)
        merge_branches(head)
        gates.weights = lambda channels, training: (torch.full((1, channels, 1, 1), 2.0),
                                                    torch.zeros(1, channels, 1, 1))
        after = head(block(x))
    assert_relative(after, before)
    assert head.map_convs[2].bias.shape == (4,) and head.map_bn.eps == 0


def test_merge_biases_give_the_checkpoint_layout():
    model = build_rcil_model([3], "resnet18")
    keys = set(build_rcil_model([3], "resnet18", merged=True).state_dict())
    assert keys - set(model.state_dict()) == {f"body.mod{m}.block{b}.convs.conv2.bias" for m in range(2, 6)
                                              for b in (1, 2)} | {f"head.map_convs.{i}.bias" for i in range(4)}
    merge_branches(model)
    assert set(model.state_dict()) == keys
    assert add_merge_biases(build_rcil_model([3], "resnet18")).merged


# ---- the method ----------------------------------------------------------------------------------------------


def step_models(method, ctx):
    """The step-1 student and the step-0 model, as engine.models builds them (layout of step 0)."""
    torch.manual_seed(0)
    previous = randomise(method.build_network(SPEC, [3], layout_step=0))
    student = method.build_network(SPEC, [3, 2], layout_step=0)
    student.load_state_dict(previous.state_dict(), strict=False)
    return student, previous


def test_hyper_parameters_per_dataset():
    voc, ade = get_method("rcil", "voc").hp, get_method("rcil", "ade").hp
    assert (voc.loss_kd, voc.alpha, voc.init_balanced) == (100.0, 1.0, True)
    assert (voc.pckd_factor, voc.pckd_last_factor) == (0.01, 0.0005)
    assert (ade.pckd_factor, ade.pckd_last_factor) == (5e-6, 5e-7)
    method = get_method("rcil")
    assert method.default_protocol == "plop" and method.model_families == ("rcil",)
    assert [method.validation_due(i, 2, 60, None) for i in (2, 28, 30, 60)] == [False, False, True, True]
    assert method.validation_due(2, 2, 60, 1) and not method.validation_due(30, 2, 60, 0)
    assert RCIL_VAL_INTERVAL == 15


def test_build_network_layouts():
    method = get_method("rcil")
    assert not method.build_network(SPEC, [3]).merged
    assert not method.build_network(SPEC, [3, 2], layout_step=0).merged
    assert method.build_network(SPEC, [3, 2], layout_step=1).merged


def test_step_start_surgery_freezing_groups_and_train_mode():
    method, ctx = get_method("rcil"), StepContext("voc", STEPS, 1)
    student, previous = step_models(method, ctx)
    bias_before = [c.bias.detach().clone() for c in student.cls]
    x = images()
    mixture = eval_outputs(previous, x)[1:]  # the step-0 model's eval-time features
    method.prepare_student(student, previous, ctx)
    # weight-only background init (RCIL segmentation_module.py::init_new_classifier): W_new <- W_bg, biases untouched
    assert torch.equal(student.cls[1].weight, student.cls[0].weight[0:1].expand_as(student.cls[1].weight))
    for conv, before in zip(student.cls, bias_before):
        assert torch.equal(conv.bias, before)
    for a, b in zip(eval_outputs(student, x, first_only=True)[1:], mixture):
        assert_relative(a, b)  # the merged branch: the previous model's eval-time mixture
    method.configure(student, ctx)
    groups = method.param_groups(student, ctx, 0.001)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert id(student.body.mod2.block1.convs.conv2_new.weight) in grouped
    assert id(student.cls[1].weight) in grouped and id(student.head.map_bn_new.weight) in grouped
    assert not grouped & {id(p) for p in (student.body.mod2.block1.convs.conv2.weight,
                                          student.body.mod2.block1.convs.conv2.bias,
                                          student.body.mod2.block1.convs.bn2.weight, student.head.map_bn.bias,
                                          student.head.map_convs[0].bias)}
    method.set_train_mode(student, ctx)
    assert student.training and student.body.mod2.block1.convs.bn2_new.training
    assert not student.body.mod2.block1.convs.bn2.training and not student.head.map_bn.training
    check_merged_layers(student)


def test_gate_generator_seeded_per_step_and_carried_in_the_state():
    method, ctx = get_method("rcil"), StepContext("voc", STEPS, 0)
    model = method.build_network(SPEC, [3])
    method.configure(model, ctx)
    method.before_step(model, None, SimpleNamespace(seed=7), ctx)
    expected = torch.Generator().manual_seed(gate_seed(7, 0)).get_state()
    assert torch.equal(model.gates.get_state(), expected)
    assert gate_seed(7, 0) != gate_seed(7, 1) and gate_seed(7, 0) != gate_seed(8, 0)
    model.train()
    model(images())  # draws advance the generator
    state = method.state_dict()
    assert not torch.equal(state[GATE_STATE_KEY], expected)

    resumed = get_method("rcil")
    resumed.load_state_dict(state)  # --resume: restored before the model is configured, applied when it is
    other = resumed.build_network(SPEC, [3])
    resumed.configure(other, ctx)
    assert torch.equal(other.gates.get_state(), state[GATE_STATE_KEY])
    resumed.load_state_dict(state)  # and after it
    assert torch.equal(other.gates.get_state(), state[GATE_STATE_KEY])

    following = get_method("rcil")
    following.load_previous_state(state, StepContext("voc", STEPS, 1))  # step t-1's gates are not carried
    fresh = following.build_network(SPEC, [3, 2])
    following.configure(fresh, StepContext("voc", STEPS, 1))
    assert torch.equal(fresh.gates.get_state(), BranchGates().get_state())


def fake_outputs(n_channels, seed, requires_grad=False):
    """(logits, features) with RCIL's taps at small sizes."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(2, 4, 8, 8), (2, 6, 4, 4), (2, 8, 3, 3), (2, 8, 3, 3), (2, 5, 3, 3)]
    maps = [torch.randn(*s, generator=generator).requires_grad_(requires_grad) for s in shapes]
    logits = torch.randn(2, n_channels, 3, 3, generator=generator).requires_grad_(requires_grad)
    return logits, {"attentions": maps, "sem_logits_small": logits, "pre_logits": maps[-1]}


@pytest.mark.parametrize("dataset", ["voc", "ade"])
def test_loss_terms_and_their_maps(dataset):
    method, ctx = get_method("rcil", dataset), StepContext(dataset, STEPS, 1)
    student, teacher = fake_outputs(5, 1, requires_grad=True), fake_outputs(3, 2)
    labels = torch.randint(0, 5, (2, 9, 9), generator=torch.Generator().manual_seed(3))
    labels[0, :2] = 255
    terms = method.loss(student, teacher, Batch(torch.zeros(2, 3, 9, 9), labels), ctx)

    up = F.interpolate(student[0], size=(9, 9), mode="bilinear", align_corners=False)
    up_old = F.interpolate(teacher[0], size=(9, 9), mode="bilinear", align_corners=False)
    torch.testing.assert_close(terms["unce"], losses.unbiased_ce(up, labels, 3))
    torch.testing.assert_close(terms["unkd"], losses.unbiased_kd(up, up_old))
    lam, last = (0.01, 0.0005) if dataset == "voc" else (5e-6, 5e-7)
    old = [m.numpy() for m in teacher[1]["attentions"]]
    new = [m.detach().numpy() for m in student[1]["attentions"]]
    z = student[0].detach().numpy()
    collapsed = np.concatenate([z[:, :1] + z[:, 3:].sum(axis=1, keepdims=True), z[:, 1:3]], axis=1)
    spatial = spatial_numpy(old + [teacher[0].numpy()], new + [collapsed], [lam] * 5 + [last], 5, 2,
                            (4, 8, 12, 16, 20, 24))
    channel = channel_numpy(old, new, [lam] * 4 + [last], 5, 2)
    assert terms["pckd_spatial"].item() == pytest.approx(spatial, rel=1e-5)
    assert terms["pckd_channel"].item() == pytest.approx(channel, rel=1e-5)
    expected = terms["unce"] + 100 * terms["unkd"] + spatial + channel
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    terms["total"].backward()
    assert student[0].grad is not None and student[1]["attentions"][0].grad.abs().sum() > 0

    ce = method.loss(student, None, Batch(torch.zeros(2, 3, 9, 9), labels), StepContext(dataset, STEPS[:1], 0))
    assert set(ce) == {"total", "ce"}
    torch.testing.assert_close(ce["total"], losses.ce_all_pixels(up, labels))
