"""The MiB family as methods (MiB run.py::run_step, train.py::Trainer): label policies per repository and split
(MiB dataset/voc.py::VOCSegmentationIncremental, dataset/ade.py::AdeSegmentationIncremental), the shared
protocol of :class:`methods.mib.MiBFamily`, the background initialisation on a real classifier, the loss of every
method against explicit per-pixel loops, the EWC/PI/RW methods' statistics after hand-computed updates and their
state, and PLOP's threshold pass and loss wiring."""
import contextlib
import math

import numpy as np
import pytest
import torch
from torch import nn

from datasets.incremental import label_lut
from datasets.transforms import RandomResizedCrop
from helpers import lse, softmax
from methods import get_method, list_methods
from methods.base import Batch, StepContext
from methods.mib_family import MiBFamily, mib_ade_lut, mib_voc_lut, plop_lut
from network import build_model
from network.abn import ABN, SyncABN
from utils.errors import UserError

FAMILY = ("ft", "mib", "plop", "lwf", "lwf-mc", "ilt", "ewc", "pi", "rw")
REL = 1e-5

# raw label values: background, two old classes (1, 2), the step's classes (3, 4), a future class (5), void
RAW = [0, 1, 2, 3, 4, 5, 255]
STEPS = ((0, 1, 2), (3, 4), (5,))
I = 255


def mapped(policy, split, step=1, steps=STEPS):
    return label_lut([list(s) for s in steps], step, split, policy)[RAW].tolist()


# ---- label policies, one row per repository and split (MiB, PLOP dataset/voc.py, dataset/ade.py) --------------
@pytest.mark.parametrize("split, expected", [
    # MiB VOC train: old/future -> 0, void -> 0 (quirk of MiB dataset/voc.py::VOCSegmentationIncremental)
    ("train", [0, 0, 0, 3, 4, 0, 0]),
    ("val", [0, I, I, 3, 4, I, I]),  # per-epoch val: old and future ignored
    ("test", [0, 1, 2, 3, 4, I, I]),  # test: seen classes, future ignored
    ("memory", [0, 0, 0, 3, 4, 0, 0]),
])
def test_mib_voc_labels(split, expected):
    assert mapped(mib_voc_lut, split) == expected


@pytest.mark.parametrize("split, expected", [
    ("train", [0, 0, 0, 3, 4, 0, I]),  # ADE 0 -> 0 at training
    ("val", [I, I, I, 3, 4, I, I]),  # ADE 0 ignored at evaluation
    ("test", [I, 1, 2, 3, 4, I, I]),
])
def test_mib_ade_labels(split, expected):
    assert mapped(mib_ade_lut, split) == expected


@pytest.mark.parametrize("split, expected", [
    ("train", [0, 0, 0, 3, 4, 0, I]),  # PLOP/RCIL: void stays ignored
    ("val", [0, 0, 0, 3, 4, 0, I]),  # val masked as train
    ("test", [0, 1, 2, 3, 4, 0, I]),  # future classes -> background at test
])
def test_plop_labels_voc_and_ade(split, expected):
    assert mapped(plop_lut, split) == expected


def test_step0_tables():
    assert mapped(mib_voc_lut, "train", 0) == [0, 1, 2, 0, 0, 0, 0]
    assert mapped(mib_voc_lut, "val", 0) == [0, 1, 2, I, I, I, I]
    assert mapped(mib_voc_lut, "test", 0) == [0, 1, 2, I, I, I, I]
    assert mapped(mib_ade_lut, "train", 0) == [0, 1, 2, 0, 0, 0, I]
    assert mapped(mib_ade_lut, "val", 0) == mapped(mib_ade_lut, "test", 0) == [I, 1, 2, I, I, I, I]
    assert mapped(plop_lut, "train", 0) == mapped(plop_lut, "test", 0) == [0, 1, 2, 0, 0, 0, I]


def test_tables_follow_the_channel_order_of_a_shuffled_task():
    steps = ((0, 3, 1), (4, 2), (5,))  # channels: 0->0, 3->1, 1->2, 4->3, 2->4, 5->5
    assert mapped(mib_voc_lut, "train", steps=steps) == [0, 0, 4, 0, 3, 0, 0]
    assert mapped(mib_voc_lut, "test", steps=steps) == [0, 2, 4, 1, 3, I, I]
    assert mapped(plop_lut, "test", steps=steps) == [0, 2, 4, 1, 3, 0, I]
    assert mapped(mib_ade_lut, "test", steps=steps) == [I, 2, 4, 1, 3, I, I]


def test_methods_pick_their_repository_tables():
    steps = [list(s) for s in STEPS]
    for name in FAMILY:
        for dataset in ("voc", "ade"):
            method = get_method(name, dataset=dataset)
            expected = plop_lut if name == "plop" else (mib_ade_lut if dataset == "ade" else mib_voc_lut)
            for split in ("train", "val", "test"):
                assert np.array_equal(label_lut(steps, 1, split, method.label_policy),
                                      label_lut(steps, 1, split, expected)), (name, dataset, split)
    # --protocol: PLOP's paper re-ran MiB and ILT under PLOP's tables and evaluation (PLOP scripts/voc/mib_15-1.sh)
    for name in ("mib", "ilt", "ft"):
        method = get_method(name, dataset="ade", protocol="plop")
        assert np.array_equal(label_lut(steps, 1, "test", method.label_policy), label_lut(steps, 1, "test", plop_lut))
        assert method.eval_convention()["ade_class0"] == "scored"
    mib_in_plop = get_method("plop", protocol="mib")
    assert np.array_equal(label_lut(steps, 1, "train", mib_in_plop.label_policy),
                          label_lut(steps, 1, "train", mib_voc_lut))


# ---- the shared protocol ------------------------------------------------------------------------------------
def test_registry_and_reference_defaults():
    assert set(FAMILY) <= set(list_methods())
    assert all(isinstance(get_method(n), MiBFamily) for n in FAMILY)
    assert get_method("mib").hp.loss_kd == 10 and get_method("mib").hp.alpha == 1 and get_method("mib").hp.init_balanced
    assert get_method("lwf").hp.loss_kd == 100
    assert (get_method("ilt").hp.loss_kd, get_method("ilt").hp.loss_de) == (100, 100)
    assert get_method("lwf-mc").hp.icarl_importance == 10
    assert (get_method("ewc").hp.reg_importance, get_method("ewc").hp.reg_alpha) == (500, 0.9)
    assert get_method("pi").hp.reg_importance == 500
    rw = get_method("rw").hp
    assert (rw.reg_importance, rw.reg_alpha, rw.reg_iterations) == (100, 0.9, 10)
    voc, ade = get_method("plop").hp, get_method("plop", dataset="ade").hp
    assert (voc.pod_factor, voc.pod_logits_factor, voc.threshold) == (0.01, 0.0005, 0.001)
    assert (ade.pod_factor, ade.pod_logits_factor) == (0.001, 1e-5)
    assert voc.classif_adaptive_factor and voc.init_balanced


def test_family_protocol():
    ctx0, ctx1 = StepContext("voc", STEPS, 0), StepContext("voc", STEPS, 1)
    for name in FAMILY:
        method = get_method(name)
        assert method.model_families == ("mib",) and method.test_split == "test_seen"
        logits = torch.tensor([[[[0.0, 4.0]], [[1.0, 0.0]]]])  # argmax of the upsampled logits, not probabilities
        expected = nn.functional.interpolate(logits, size=(2, 4), mode="bilinear", align_corners=False).argmax(1)
        assert torch.equal(method.predict(logits, (2, 4)), expected)
        assert method.schedule_options(ctx1) == {"min_lr": 0.0}
        assert isinstance(method.train_transform(49).transforms[0], RandomResizedCrop)
        assert method.param_groups(nn.Linear(2, 2), ctx1, 0.001)[0]["lr"] == 0.001
        assert not method.bn_frozen(ctx1) and not method.selects_best(ctx0, None)
        assert method.selects_best(ctx0, True) and not method.selects_best(ctx1, False)
        due = method.validation_due
        assert [i for i in range(1, 13) if due(i, 4, 12, None)] == [4, 8, 12]  # every epoch by default
        assert [i for i in range(1, 13) if due(i, 4, 12, 2)] == [8]
        assert not any(due(i, 4, 12, 0) for i in range(1, 13))
    needs = {name: get_method(name).needs_teacher(ctx1) for name in FAMILY}
    assert needs == {"ft": False, "mib": True, "plop": True, "lwf": True, "lwf-mc": True, "ilt": True,
                     "ewc": False, "pi": False, "rw": False}
    assert not any(get_method(name).needs_teacher(ctx0) for name in FAMILY)


def test_evaluation_conventions():
    assert get_method("mib").protocol() == "mib" and get_method("plop").protocol() == "plop"
    assert get_method("mib").eval_convention() == {
        "background_in_old": True, "exclude_absent": True, "future_classes": "ignored", "labels": "mib"}
    assert get_method("lwf", dataset="ade").eval_convention()["ade_class0"] == "ignored"
    plop = get_method("plop", dataset="ade").eval_convention()
    assert plop["ade_class0"] == "scored" and plop["future_classes"] == "background" and plop["exclude_absent"]


def test_sync_batchnorm_keeps_the_inplace_abn_function():
    model = build_model("mib_resnet18", [3])
    converted = get_method("mib").sync_batchnorm(model)
    norms = [m for m in converted.modules() if isinstance(m, ABN)]
    assert norms and all(isinstance(m, SyncABN) for m in norms)


def test_prediction_is_the_argmax_of_upsampled_logits():
    # logits A = (10, 4), B = (-10, 4); at the 2nd of 4 output pixels 0.75 A + 0.25 B = (5, 4): class 0, whereas
    # upsampled softmax probabilities would give class 1 (0.75·1 + 0.25·0 vs 0.75·0.0025 + 0.25·1)
    logits = torch.tensor([[[[10.0, -10.0]], [[4.0, 4.0]]]])
    assert get_method("mib").predict(logits, (1, 4)).tolist() == [[[0, 0, 1, 1]]]


# ---- background initialisation on MiB's network (MiB segmentation_module.py::init_new_classifier) ----------------
def student_from(previous, classes_per_step, seed=1):
    torch.manual_seed(seed)
    student = build_model("mib_resnet18", classes_per_step)
    student.load_state_dict(previous.state_dict(), strict=False)
    return student


@pytest.mark.parametrize("name, init", [("mib", "full"), ("plop", "full"), ("lwf", None), ("ilt", None),
                                        ("ft", None)])
def test_new_classifier_initialisation(name, init):
    torch.manual_seed(0)
    previous = build_model("mib_resnet18", [3])
    with torch.no_grad():
        previous.cls[0].bias.copy_(torch.tensor([0.3, -0.1, 0.2]))
    student = student_from(previous, [3, 2])
    random_new = (student.cls[1].weight.detach().clone(), student.cls[1].bias.detach().clone())
    get_method(name).prepare_student(student, previous, StepContext("voc", ((0, 1, 2), (3, 4)), 1))
    if init is None:  # PyTorch's default initialisation is kept
        assert torch.equal(student.cls[1].weight, random_new[0]) and torch.equal(student.cls[1].bias, random_new[1])
        assert torch.equal(student.cls[0].bias, previous.cls[0].bias)
        return
    shifted = 0.3 - math.log(3)  # b_bg − log(N_new + 1), N_new = 2
    for c in range(2):
        assert torch.equal(student.cls[1].weight[c], previous.cls[0].weight[0])
        assert student.cls[1].bias[c].item() == pytest.approx(shifted, rel=1e-6)
    assert student.cls[0].bias.tolist() == pytest.approx([shifted, -0.1, 0.2], rel=1e-6)  # background lowered too
    assert torch.equal(student.cls[0].weight, previous.cls[0].weight)


def test_mib_init_can_be_switched_off():
    torch.manual_seed(0)
    previous = build_model("mib_resnet18", [3])
    student = student_from(previous, [3, 1])
    weight = student.cls[1].weight.detach().clone()
    get_method("mib", init_balanced=False).prepare_student(student, previous, StepContext("voc", STEPS, 1))
    assert torch.equal(student.cls[1].weight, weight)


# ---- losses of the methods, against explicit loops (MiB train.py::Trainer.train, utils/loss.py) ----------------
def bce(x, t):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0) - t * x


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def per_pixel_mean(fn, *tensors):
    """mean over all B·H·W pixels of fn(values of each tensor at the pixel)."""
    b, _, h, w = tensors[0].shape
    total = 0.0
    for n in range(b):
        for i in range(h):
            for j in range(w):
                total += fn(*[t[n, :, i, j].tolist() if t.dim() == 4 else int(t[n, i, j]) for t in tensors])
    return total / (b * h * w)


def ce_px(z, y):
    return 0.0 if y == 255 else lse(z) - z[y]


def kd_px(z, zo):
    k = len(zo)
    q, d = softmax(zo), lse(z[:k])
    return -sum(q[c] * (z[c] - d) for c in range(k)) / k


def unce_px(z, y, k_old):
    if y == 255:
        return 0.0
    d = lse(z)
    return -(lse(z[:k_old]) - d) if y < k_old else -(z[y] - d)


def unkd_px(z, zo):
    k = len(zo)
    q, d = softmax(zo), lse(z)
    background = lse([z[0]] + z[k:]) - d
    return -(q[0] * background + sum(q[c] * (z[c] - d) for c in range(1, k))) / k


def bce_px(z, y):
    return 0.0 if y == 255 else sum(bce(z[c], float(c == y)) for c in range(len(z)))


CTX0 = StepContext("voc", ((0, 1, 2), (3, 4)), 0)
CTX1 = StepContext("voc", ((0, 1, 2), (3, 4)), 1)


def fake_outputs(seed=0, size=(3, 4), n_old=3, n_new=2):
    """Student/teacher ``(logits, features)`` at label resolution (upsampling is then the identity), labels with
    background, old, new and ignored pixels."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(2, n_old + n_new, *size, generator=gen) * 2
    zo = torch.randn(2, n_old, *size, generator=gen) * 2
    body, body_old = torch.randn(2, 4, 2, 2, generator=gen), torch.randn(2, 4, 2, 2, generator=gen)
    labels = torch.randint(0, n_old + n_new, (2, *size), generator=gen)
    labels[0, 0, 0] = labels[1, 2, 3] = 255
    labels[0, 1, 1], labels[1, 0, 0] = 1, 4
    return (z, {"body": body}), (zo, {"body": body_old}), labels


def test_step0_losses():
    (z, f), _, labels = fake_outputs()
    z0 = z[:, :3]
    labels0 = labels.clamp(max=2).masked_fill(labels == 255, 255)
    ce = per_pixel_mean(ce_px, z0, labels0)
    for name in ("ft", "mib", "lwf", "ilt", "ewc", "pi", "rw", "plop"):
        terms = get_method(name).loss((z0, f), None, Batch(z0, labels0), CTX0)
        assert terms["total"].item() == pytest.approx(ce, rel=REL), name
    # LwF-MC: BCE from step 0 on (MiB utils/loss.py::BCEWithLogitsLossWithIgnoreIndex)
    terms = get_method("lwf-mc").loss((z0, f), None, Batch(z0, labels0), CTX0)
    assert terms["total"].item() == pytest.approx(per_pixel_mean(bce_px, z0, labels0), rel=REL)


def test_ft_upsamples_logits_to_the_labels():
    gen = torch.Generator().manual_seed(1)
    z, labels = torch.randn(2, 5, 2, 2, generator=gen), torch.randint(0, 5, (2, 4, 4), generator=gen)
    up = nn.functional.interpolate(z, size=(4, 4), mode="bilinear", align_corners=False)
    expected = per_pixel_mean(ce_px, up, labels)
    assert get_method("ft").loss((z, {}), None, Batch(z, labels), CTX1)["total"].item() == pytest.approx(expected,
                                                                                                        rel=REL)


def test_incremental_losses():
    student, teacher, labels = fake_outputs()
    z, zo = student[0], teacher[0]
    batch = Batch(z, labels)
    ce = per_pixel_mean(ce_px, z, labels)
    kd = per_pixel_mean(kd_px, z, zo)

    terms = get_method("ft").loss(student, None, batch, CTX1)
    assert terms["total"].item() == pytest.approx(ce, rel=REL)
    terms = get_method("lwf").loss(student, teacher, batch, CTX1)
    assert terms["total"].item() == pytest.approx(ce + 100 * kd, rel=REL)
    assert terms["kd"].item() == pytest.approx(kd, rel=REL)

    mse = float(((student[1]["body"] - teacher[1]["body"]) ** 2).mean())
    terms = get_method("ilt", loss_kd=3.0, loss_de=7.0).loss(student, teacher, batch, CTX1)
    assert terms["total"].item() == pytest.approx(ce + 3 * kd + 7 * mse, rel=REL)

    bce_all = per_pixel_mean(bce_px, z, labels)
    icarl = 3 * per_pixel_mean(lambda a, b: sum(bce(a[c], sigmoid(b[c])) for c in range(3)) / 3, z, zo)
    terms = get_method("lwf-mc").loss(student, teacher, batch, CTX1)
    assert terms["total"].item() == pytest.approx(bce_all + 10 * icarl, rel=REL)

    unce = per_pixel_mean(lambda a, y: unce_px(a, y, 3), z, labels)
    unkd = per_pixel_mean(unkd_px, z, zo)
    terms = get_method("mib").loss(student, teacher, batch, CTX1)
    assert terms["unce"].item() == pytest.approx(unce, rel=REL)
    assert terms["total"].item() == pytest.approx(unce + 10 * unkd, rel=REL)
    terms = get_method("mib", alpha=2.0).loss(student, teacher, batch, CTX1)
    unkd2 = per_pixel_mean(lambda a, b: unkd_px(a, [2 * v for v in b]), z, zo)
    assert terms["total"].item() == pytest.approx(unce + 10 * unkd2, rel=REL)


# ---- EWC / PI / RW as methods (MiB utils/regularizer.py::EWC, PI, RW) ----------------------------------------
class Tiny(nn.Module):
    def __init__(self, w, v=None):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        if v is not None:
            self.v = nn.Parameter(torch.tensor(v))  # a "new classifier": not in the previous model


def iterate(method, model, ctx, grads, finite=True):
    """Set ``p.grad`` from ``grads`` (name -> list) and call the gradient hook."""
    for name, p in model.named_parameters():
        p.grad = torch.tensor(grads[name]) if name in grads else None
    return method.after_backward(model, ctx, finite)


def test_ewc_method_statistics_penalty_and_carry():
    method = get_method("ewc")
    model = Tiny([1.0, 2.0])
    method.configure(model, CTX0)
    assert iterate(method, model, CTX0, {"w": [0.1, -0.2]}) is None  # no penalty at step 0
    assert iterate(method, model, CTX0, {"w": [50.0, 50.0]}, finite=False) is None  # skipped: not finite
    iterate(method, model, CTX0, {"w": [0.3, 0.0]})
    method.end_of_step(model, CTX0)
    fisher = [0.9 * 0.09 + 0.1 * (0.9 * 0.01 + 0.1), 0.0 + 0.1 * (0.9 * 0.04 + 0.1)]
    state = method.state_dict()
    assert state["carry"]["kind"] == "ewc"
    assert state["carry"]["fisher"]["w"].tolist() == pytest.approx(fisher, rel=1e-6)

    step1 = get_method("ewc")
    step1.load_previous_state(state, CTX1)
    previous, student = Tiny([1.0, 2.0]), Tiny([1.5, 1.0], v=[3.0])
    step1.prepare_student(student, previous, CTX1)
    step1.configure(student, CTX1)
    penalty = iterate(step1, student, CTX1, {"w": [0.0, 0.0], "v": [1.0]})
    low, high = min(fisher), max(fisher)
    normalized = [(f - low) / (high - low + 1e-8) for f in fisher]
    expected = 500 * (normalized[0] * 0.5 ** 2 + normalized[1] * 1.0 ** 2)  # v (new) is not penalised
    assert penalty["total"].item() == pytest.approx(expected, rel=1e-5)
    assert penalty["reg"].item() == penalty["total"].item() and penalty["total"].requires_grad
    # the new parameter starts its Fisher at 1 and is updated: F = 0.9·1² + 0.1·1
    assert step1.regularizer.fisher["v"].tolist() == pytest.approx([1.0])


def test_regularized_methods_need_the_statistics_of_the_previous_step():
    for name in ("ewc", "pi", "rw"):
        with pytest.raises(UserError, match=f"train step 0 \\(and every step\\) with --method {name}"):
            get_method(name).load_previous_state({}, CTX1)
    ewc = get_method("ewc")
    ewc.configure(Tiny([1.0]), CTX0)
    ewc.end_of_step(Tiny([1.0]), CTX0)
    with pytest.raises(UserError, match="RW statistics"):
        get_method("rw").load_previous_state(ewc.state_dict(), CTX1)


def test_pi_method_importance():
    method = get_method("pi")
    model = Tiny([1.0, 2.0])
    method.configure(model, CTX0)  # θ_ref = the values at configure (step 0)
    iterate(method, model, CTX0, {"w": [0.5, 0.5]})
    with torch.no_grad():
        model.w.copy_(torch.tensor([0.8, 2.5]))  # an optimizer step
    iterate(method, model, CTX0, {"w": [1.0, -2.0]})  # δ = g ⊙ (θ_prev − θ) = (0.2, 1.0)
    method.end_of_step(model, CTX0)
    omega = [0.2 / (0.2 ** 2 + 1e-20), 1.0 / (0.5 ** 2 + 1e-20)]
    assert method.state_dict()["carry"]["score"]["w"].tolist() == pytest.approx(omega, rel=1e-5)


def test_rw_method_score_and_fisher():
    method = get_method("rw", reg_iterations=1, reg_alpha=0.5)
    model = Tiny([1.0, 2.0])
    method.configure(model, CTX0)
    iterate(method, model, CTX0, {"w": [2.0, 0.0]})  # θ_tmp ← θ; F = 0.5·g² + 0.5·1 = (2.5, 0.5)
    with torch.no_grad():
        model.w.copy_(torch.tensor([0.0, 3.0]))
    iterate(method, model, CTX0, {"w": [1.0, 1.0]})  # S += g(θ_tmp − θ) / (½ F (θ − θ_tmp)² + 1e-8), old F
    method.end_of_step(model, CTX0)
    carry = method.state_dict()["carry"]
    score = [max(1.0 * 1.0 / (0.5 * 2.5 * 1.0 + 1e-8), 0.0), max(1.0 * -1.0 / (0.5 * 0.5 * 1.0 + 1e-8), 0.0)]
    assert carry["score"]["w"].tolist() == pytest.approx(score, rel=1e-6)
    assert carry["fisher"]["w"].tolist() == pytest.approx([0.5 + 1.25, 0.5 + 0.25], rel=1e-6)


@pytest.mark.parametrize("name", ["ewc", "pi", "rw"])
def test_regularized_method_state_round_trip(name):
    def start(state=None):
        method = get_method(name, **({"reg_iterations": 2} if name == "rw" else {}))
        method.load_previous_state(carry, CTX1)
        student = Tiny([1.5, 1.0], v=[3.0])
        method.prepare_student(student, Tiny([1.0, 2.0]), CTX1)
        method.configure(student, CTX1)
        if state is not None:
            method.load_state_dict(state)
        return method, student

    zero = get_method(name)
    zero.configure(Tiny([1.0, 2.0]), CTX0)
    iterate(zero, Tiny([1.0, 2.0]), CTX0, {"w": [0.3, 0.1]})
    zero.end_of_step(Tiny([1.1, 2.0]), CTX0)
    carry = zero.state_dict()

    def run(method, student, grads):
        out = []
        for g in grads:
            penalty = iterate(method, student, CTX1, {"w": g, "v": [g[0]]})
            out.append(penalty["total"].item())
            with torch.no_grad():
                student.w.sub_(0.1 * torch.tensor(g))
        method.end_of_step(student, CTX1)
        return out, method.state_dict()["carry"]

    grads = [[0.1, 0.2], [0.3, -0.1], [-0.2, 0.4], [0.05, 0.05]]
    straight, straight_carry = run(*start(), grads)
    first, student = start()
    run_first = []
    for g in grads[:2]:
        run_first.append(iterate(first, student, CTX1, {"w": g, "v": [g[0]]})["total"].item())
        with torch.no_grad():
            student.w.sub_(0.1 * torch.tensor(g))
    saved = first.state_dict()
    resumed, _ = start(saved)
    with torch.no_grad():
        resumed_student = Tiny(student.w.tolist(), v=student.v.tolist())
    rest, resumed_carry = run(resumed, resumed_student, grads[2:])
    assert run_first + rest == pytest.approx(straight, rel=1e-6)
    for key, value in straight_carry.items():
        if key != "kind":
            for n in value:
                assert torch.allclose(value[n], resumed_carry[key][n], rtol=1e-6), (key, n)


# ---- PLOP: the threshold pass and the loss wiring (PLOP train.py::Trainer.find_median, Trainer.train) ----------
class FakeData:
    """What ``before_step`` uses of :class:`engine.passes.StepData`."""

    def __init__(self, batches):
        self.batches_, self.reduced = batches, 0
        self.device = torch.device("cpu")

    def train_batches(self):
        return iter(self.batches_)

    def autocast(self):
        return contextlib.nullcontext()

    def eval_mode(self, *models):
        return contextlib.nullcontext()

    def all_reduce(self, tensor):
        self.reduced += 1
        return tensor


class ConstantTeacher(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return self.logits, {}


def test_plop_thresholds_from_the_teacher_pass():
    # K_old = 2 teacher channels, K_t = 3. Pixels (one image, 1×6): confident class 0, confident class 0, uniform
    # (argmax 0, ē = 1/2, v = ē / log 3 -> bin 45), confident class 1, a new-class pixel, an ignored pixel.
    logits = torch.tensor([[10.0, 10.0, 0.0, -10.0, 10.0, 10.0], [-10.0, -10.0, 0.0, 10.0, -10.0, -10.0]])
    labels = torch.tensor([[[0, 0, 0, 0, 2, 255]]])
    data = FakeData([Batch(torch.zeros(1, 3, 1, 6), labels)])
    method = get_method("plop")
    ctx = StepContext("voc", ((0, 1), (2,)), 1)
    method.before_step(None, ConstantTeacher(logits[None, :, None, :]), data, ctx)
    assert data.reduced == 1  # the histogram is summed over the processes
    # class 0: 2 pixels in bin 0, 1 in bin 45; half = 1.5 ≤ H[0, 0] -> stops at k = 0: 0.01 · 1.5 / 2
    # class 1: 1 pixel in bin 0 -> 0.01 · 0.5 / 1; class 2: empty -> τ_min
    assert method.thresholds.tolist() == pytest.approx([0.0075, 0.005, 0.001], rel=1e-6)
    assert math.floor(100 * 0.5 / math.log(3)) == 45
    state = method.state_dict()
    fresh = get_method("plop")
    fresh.load_state_dict(state)
    fresh.load_previous_state({"thresholds": torch.ones(3)}, ctx)  # nothing is carried across steps
    assert torch.equal(fresh.thresholds, method.thresholds)
    step0 = get_method("plop")
    step0.before_step(None, None, FakeData([]), StepContext("voc", ((0, 1), (2,)), 0))
    assert step0.thresholds is None


def constant_maps(values, channels=1, width=4):
    return [torch.full((1, channels, width, width), float(v)) for v in values]


def test_plop_loss_wiring():
    # one image, labels at the small-logit size (4×4): upsampling is the identity
    ctx = StepContext("voc", ((0, 1), (2,)), 1)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, 0, :2] = 2  # new class
    labels[0, 3, 3] = 255
    old_logits = torch.zeros(1, 2, 4, 4)
    old_logits[:, 0, :2] = 10.0  # confident background in rows 0-1: pseudo-label 0, kept
    old_logits[:, 1, 2] = 10.0  # confident class 1 in row 2: pseudo-label 1, kept
    # row 3: uniform (ē/log 3 = 0.455 > τ): the background pixels there become ignored
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 4, 4, generator=gen)
    method = get_method("plop")
    method.thresholds = torch.tensor([0.01, 0.01, 0.001])
    student = (logits, {"attentions": constant_maps([1, 2, 3, 4, 5]), "sem_logits_small": logits})
    teacher = (old_logits, {"attentions": constant_maps([1, 2, 3, 4, 6]), "sem_logits_small": old_logits})
    terms = method.loss(student, teacher, Batch(torch.zeros(1, 3, 4, 4), labels), ctx)
    pseudo = labels.clone()
    pseudo[0, 2] = 1
    pseudo[0, 3, :3] = 255
    background = 16 - 2 - 1  # label < K_old, 255 excluded
    factor = (background - 3) / (background + 1e-6)
    ce = factor * per_pixel_mean(ce_px, logits, pseudo)
    assert terms["ce"].item() == pytest.approx(ce, rel=REL)
    # POD: constant maps give Φ entries all equal to the squared value, 14·C·W of them -> d = √56 · |a² − b²|;
    # map 5: |36 − 25|; the small logits: teacher z^old vs the student collapsed to [z0 + z2, z1]
    collapsed = torch.stack([logits[0, 0] + logits[0, 2], logits[0, 1]])
    emb = []
    for old, new in zip(old_logits[0], collapsed):  # Φ per channel, by explicit region means
        for x in (old ** 2, new ** 2):
            parts = []
            for s in (1, 2, 4):
                k = 4 // s
                for i in range(s):
                    for j in range(s):
                        r = x[i * k:(i + 1) * k, j * k:(j + 1) * k]
                        parts.append((r.mean(dim=1), r.mean(dim=0)))
            emb.append(parts)
    # the embedding concatenates, per region, all channels' width means then all channels' height means: the
    # distance does not depend on the order, so sum squared differences channel by channel
    squared = 0.0
    for channel in range(2):
        for (wo, ho), (wn, hn) in zip(emb[2 * channel], emb[2 * channel + 1]):
            squared += float(((wo - wn) ** 2).sum() + ((ho - hn) ** 2).sum())
    schedule = math.sqrt(3 / 1)
    pod = (0.01 * schedule * math.sqrt(56) * 11 + 0.0005 * schedule * math.sqrt(squared)) / 6
    assert terms["pod"].item() == pytest.approx(pod, rel=REL)
    assert terms["total"].item() == pytest.approx(ce + pod, rel=REL)
    no_factor = get_method("plop", classif_adaptive_factor=False)
    no_factor.thresholds = method.thresholds
    terms = no_factor.loss(student, teacher, Batch(torch.zeros(1, 3, 4, 4), labels), ctx)
    assert terms["ce"].item() == pytest.approx(ce / factor, rel=REL)


def test_plop_network_exposes_the_attentions():
    from methods.base import ModelSpec
    model = get_method("plop").build_network(ModelSpec("mib", "resnet18"), [3, 1])
    model.eval()
    with torch.no_grad():
        _, features = model(torch.randn(1, 3, 33, 33))
    assert len(features["attentions"]) == 5 and features["sem_logits_small"].shape[1] == 4
