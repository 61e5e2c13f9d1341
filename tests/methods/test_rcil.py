"""methods/rcil.py: RCIL's pooled-cube KD terms (RCIL train.py::features_distillation_spatial,
features_distillation_channel) against hand computations and explicit numpy loops, and the method's hooks (RCIL
run.py::convert_model, segmentation_module.py::init_new_classifier)."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods import get_method, losses, rcil
from methods.base import Batch, ModelSpec, StepContext
from methods.rcil import GATE_STATE_KEY, RCIL_VAL_INTERVAL, gate_seed
from network import FAMILIES
from network.rcil import BranchGates, build_rcil_model
from tests.helpers import assert_relative, check_merged_layers, eval_outputs, images, randomise_norm_layers as randomise


def avg_pool_numpy(x, k):
    """avg_pool2d of (B, C, H, W) with a k×k window, stride 1, k // 2 zeros on every side, divided by k²."""
    p = k // 2
    batch, channels, height, width = x.shape
    padded = np.zeros((batch, channels, height + 2 * p, width + 2 * p))
    padded[:, :, p:p + height, p:p + width] = x
    out_h, out_w = height + 2 * p - k + 1, width + 2 * p - k + 1
    out = np.zeros((batch, channels, out_h, out_w))
    for y in range(out_h):
        for x_ in range(out_w):
            out[:, :, y, x_] = padded[:, :, y:y + k, x_:x_ + k].sum(axis=(2, 3)) / (k * k)
    return out


def channel_pool_numpy(x):
    """Mean over channels c−1, c, c+1 (missing neighbours count as 0), always divided by 3."""
    out = np.zeros_like(x)
    channels = x.shape[1]
    for c in range(channels):
        for n in (c - 1, c, c + 1):
            if 0 <= n < channels:
                out[:, c] += x[:, n]
    return out / 3


def batch_mean_norm(a, b):
    return np.mean([math.sqrt(((a[i] - b[i]) ** 2).sum()) for i in range(a.shape[0])])


def spatial_numpy(old_maps, new_maps, factors, n_total, n_new, kernels):
    total = 0.0
    for old, new, factor in zip(old_maps, new_maps, factors):
        old, new = old.astype(np.float64) ** 2, new.astype(np.float64) ** 2
        d = sum(batch_mean_norm(avg_pool_numpy(old, k), avg_pool_numpy(new, k)) for k in kernels) / len(kernels)
        total += factor * math.sqrt(n_total / n_new) * d
    return total / len(old_maps)


def channel_numpy(old_maps, new_maps, factors, n_total, n_new):
    total = 0.0
    for old, new, factor in zip(old_maps, new_maps, factors):
        old, new = old.astype(np.float64) ** 2, new.astype(np.float64) ** 2
        total += factor * math.sqrt(n_total / n_new) * batch_mean_norm(channel_pool_numpy(old),
                                                                       channel_pool_numpy(new))
    return total / len(old_maps)


def random_maps(shapes, seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape).astype(np.float32) for shape in shapes]


def test_spatial_tiny_by_hand():
    old = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # squared: [[1, 4], [9, 16]]
    # kernel 2, padding 1 -> 3x3 outputs: window sums 1 5 4 / 10 30 20 / 9 25 16, divided by 4
    sums = [1, 5, 4, 10, 30, 20, 9, 25, 16]
    expected = math.sqrt(4 / 1) * math.sqrt(sum(s * s for s in sums)) / 4  # √(K_t/N_new) = 2
    result = rcil.pooled_cube_spatial([old], [torch.zeros_like(old)], [1.0], n_classes_total=4, n_new=1,
                                      kernels=(2,))
    assert result.item() == pytest.approx(expected, rel=1e-6)


def test_channel_tiny_by_hand():
    old = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)  # squared: 1, 4, 9
    # windows (0, 1, 4), (1, 4, 9), (4, 9, 0), always / 3
    expected = math.sqrt(2 / 1) * math.sqrt(5 ** 2 + 14 ** 2 + 13 ** 2) / 3
    result = rcil.pooled_cube_channel([old], [torch.zeros_like(old)], [1.0], n_classes_total=2, n_new=1)
    assert result.item() == pytest.approx(expected, rel=1e-6)


def test_spatial_against_explicit_loops_with_kernels_larger_than_the_map():
    # 8x8 and 5x5 maps: kernels 12..24 (and 8 for the 5x5 map) exceed the map; the output is still (W+1)²
    shapes = [(2, 3, 8, 8), (2, 2, 5, 5)]
    old_maps, new_maps = random_maps(shapes, 1), random_maps(shapes, 2)
    factors = [rcil.PCKD_FACTOR_VOC, rcil.PCKD_LAST_FACTOR_VOC]
    expected = spatial_numpy(old_maps, new_maps, factors, 6, 1, rcil.PCKD_SPATIAL_KERNELS)
    new_tensors = [torch.from_numpy(m).requires_grad_() for m in new_maps]
    result = rcil.pooled_cube_spatial([torch.from_numpy(m) for m in old_maps], new_tensors, factors,
                                      n_classes_total=6, n_new=1)
    assert result.dtype == torch.float32
    assert result.item() == pytest.approx(expected, rel=1e-5)
    result.backward()
    assert all(torch.isfinite(t.grad).all() for t in new_tensors)


def test_channel_against_explicit_loops():
    shapes = [(2, 3, 8, 8), (2, 5, 4, 4), (2, 1, 3, 3)]  # one map with a single channel: (0 + x + 0) / 3
    old_maps, new_maps = random_maps(shapes, 3), random_maps(shapes, 4)
    factors = [0.01, 0.01, 0.0005]
    expected = channel_numpy(old_maps, new_maps, factors, 7, 2)
    result = rcil.pooled_cube_channel([torch.from_numpy(m) for m in old_maps],
                                      [torch.from_numpy(m) for m in new_maps], factors, n_classes_total=7, n_new=2)
    assert result.item() == pytest.approx(expected, rel=1e-5)


def test_spatial_on_collapsed_logits_in_half_precision():
    # the logits map: the student (K_t = 5) is collapsed to K_old = 3 channels as in PLOP
    rng = np.random.default_rng(5)
    old = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    new = rng.normal(size=(2, 5, 4, 4)).astype(np.float32)
    collapsed = np.concatenate([new[:, :1] + new[:, 3:].sum(axis=1, keepdims=True), new[:, 1:3]], axis=1)
    expected = spatial_numpy([old], [collapsed], [0.0005], 5, 2, rcil.PCKD_SPATIAL_KERNELS)
    student = losses.collapse_logits(torch.from_numpy(new), n_old=3)
    result = rcil.pooled_cube_spatial([torch.from_numpy(old)], [student], [0.0005], 5, 2)
    assert result.item() == pytest.approx(expected, rel=1e-5)
    # bfloat16 inputs are computed in float32
    result = rcil.pooled_cube_spatial([torch.from_numpy(old).bfloat16()], [student.bfloat16()], [0.0005], 5, 2)
    assert result.dtype == torch.float32


@pytest.mark.parametrize("channels_last", [False, True])
def test_spatial_pool_equals_avg_pool_values_and_gradients(channels_last):
    # the separable depthwise filter against the reference's avg_pool2d (zero padding counted), every kernel
    # of the spatial term, maps smaller and larger than the kernels, both memory formats
    import torch.nn.functional as F
    generator = torch.Generator().manual_seed(6)
    for shape in [(2, 3, 9, 7), (1, 4, 30, 30)]:
        x = torch.rand(shape, generator=generator)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for kernel in rcil.PCKD_SPATIAL_KERNELS:
            weights = torch.rand(1, generator=generator)
            ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
            result = rcil._spatial_pool(ours, kernel)
            expected = F.avg_pool2d(ref, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
            assert result.shape == expected.shape
            torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-7)
            (weights * result.pow(2)).sum().backward()
            (weights * expected.pow(2)).sum().backward()
            torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-7)


def test_factors_per_dataset():
    assert rcil.pckd_factors("voc", rcil.PCKD_SPATIAL_MAPS) == [0.01] * 5 + [0.0005]  # logits get 0.0005
    assert rcil.pckd_factors("voc", rcil.PCKD_CHANNEL_MAPS) == [0.01] * 4 + [0.0005]  # x_pl gets 0.0005
    assert rcil.pckd_factors("ade", rcil.PCKD_SPATIAL_MAPS) == [5e-6] * 5 + [5e-7]
    assert rcil.pckd_factors("ade", rcil.PCKD_CHANNEL_MAPS) == [5e-6] * 4 + [5e-7]
    assert losses.collapse_logits is losses.collapse_logits


def test_rejects_mismatched_maps():
    with pytest.raises(ValueError, match="factors"):
        rcil.pooled_cube_channel([torch.zeros(1, 3, 2, 2)], [torch.zeros(1, 3, 2, 2)], [1.0, 1.0], 4, 1)


# ---- the method ----------------------------------------------------------------------------------------------

SPEC = ModelSpec("rcil", "resnet18")
STEPS = ((0, 1, 2), (3, 4))  # K_old = 3, N_new = 2


@pytest.fixture(autouse=True)
def rcil_family(monkeypatch):
    """The ``rcil`` family, until ``network/__init__.py`` registers it."""
    if "rcil" not in FAMILIES:
        monkeypatch.setitem(FAMILIES, "rcil", build_rcil_model)


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


@pytest.mark.slow  # ~1 s: builds three RCIL ResNet-18 models
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


@pytest.mark.slow  # ~1 s: builds three RCIL ResNet-18 models and runs one
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
