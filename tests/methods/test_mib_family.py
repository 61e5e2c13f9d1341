"""methods/mib_family.py: the MiB family (MiB run.py::run_step, train.py::Trainer): label policies per
repository and split (MiB dataset/voc.py::VOCSegmentationIncremental, dataset/ade.py::AdeSegmentationIncremental), the
shared protocol of :class:`methods.mib_family.MiBFamily`, the reference defaults, the background initialisation
(MiB, RCIL segmentation_module.py::init_new_classifier) and the loss of every method against explicit per-pixel
loops."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from datasets.incremental import label_lut
from datasets.transforms import RandomResizedCrop
from methods import ewc, get_method, ilt, list_methods, losses, lwf, mib, pi, rw
from methods.base import Batch, StepContext
from methods.mib_family import MiBFamily, init_new_classifier, mib_ade_lut, mib_voc_lut, plop_lut
from network import build_model
from network.abn import ABN, SyncABN
from tests.helpers import REL, bce, ce_px, lse, per_pixel_mean, sigmoid, softmax


FAMILY = ("ft", "mib", "plop", "lwf", "lwf-mc", "ilt", "ewc", "pi", "rw")

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


def test_mib_family_default_weights():
    assert (lwf.LWF_W_KD, ilt.ILT_W_KD, ilt.ILT_W_DE) == (100.0, 100.0, 100.0)
    assert (lwf.LWFMC_W_ICARL, mib.MIB_W_KD, losses.KD_ALPHA) == (10.0, 10.0, 1.0)
    # λ by protocol: MiB's argparser (MiB argparser.py) and PLOP's (PLOP argparser.py)
    assert ewc.EWC_IMPORTANCES == {"mib": 500.0, "plop": 100.0} and ewc.EWC_ALPHA == 0.9
    assert pi.PI_IMPORTANCES == {"mib": 500.0, "plop": 100.0}
    assert rw.RW_IMPORTANCES == {"mib": 100.0, "plop": 100.0} and (rw.RW_ALPHA, rw.RW_ITERATIONS) == (0.9, 10)
    for name, table in (("ewc", ewc.EWC_IMPORTANCES), ("pi", pi.PI_IMPORTANCES), ("rw", rw.RW_IMPORTANCES)):
        for protocol, value in table.items():
            assert get_method(name, protocol=protocol).hp.reg_importance == value
        assert get_method(name, protocol="plop", reg_importance=7.0).hp.reg_importance == 7.0


# ---- MiB background-aware init, RCIL weight-only variant (MiB, RCIL segmentation_module.py::init_new_classifier) -----

def hand_classifiers():
    old = nn.Conv2d(3, 4, 1)  # step 0: background + 3 classes
    new = nn.Conv2d(3, 2, 1)  # two new classes
    with torch.no_grad():
        old.weight.copy_(torch.arange(12, dtype=torch.float32).view(4, 3, 1, 1) / 10)
        old.bias.copy_(torch.tensor([0.5, -0.2, 0.3, 0.1]))
        new.weight.fill_(7.0)
        new.bias.copy_(torch.tensor([1.5, -1.5]))
    return old, new


def test_background_init_with_bias():
    old, new = hand_classifiers()
    init_new_classifier(old, new)
    w_bg = [0.0, 0.1, 0.2]
    for c in range(2):
        assert new.weight[c, :, 0, 0].tolist() == pytest.approx(w_bg, rel=REL)
    shifted = 0.5 - math.log(2 + 1)  # N_new = 2
    assert new.bias.tolist() == pytest.approx([shifted, shifted], rel=REL)
    assert old.bias.tolist() == pytest.approx([shifted, -0.2, 0.3, 0.1], rel=REL)  # background lowered too
    assert old.weight[1:, :, 0, 0].flatten().tolist() == pytest.approx([v / 10 for v in range(3, 12)], rel=REL)
    assert new.weight.is_leaf and new.weight.requires_grad and new.weight.grad_fn is None
    # applied again next step: the background bias keeps decreasing (MiB segmentation_module.py::init_new_classifier)
    third = nn.Conv2d(3, 1, 1)
    init_new_classifier(old, third)
    assert third.bias.item() == pytest.approx(shifted - math.log(2), rel=REL)
    assert old.bias[0].item() == pytest.approx(shifted - math.log(2), rel=REL)


def test_background_init_weights_only():
    old, new = hand_classifiers()
    init_new_classifier(old, new, with_bias=False)
    assert new.weight.flatten().tolist() == pytest.approx([0.0, 0.1, 0.2] * 2, rel=REL)
    assert new.bias.tolist() == pytest.approx([1.5, -1.5])
    assert old.bias.tolist() == pytest.approx([0.5, -0.2, 0.3, 0.1])


def test_background_init_rejects_mismatched_classifiers():
    with pytest.raises(ValueError):
        init_new_classifier(nn.Conv2d(3, 4, 1), nn.Conv2d(5, 2, 1))
    with pytest.raises(ValueError):
        init_new_classifier(nn.Conv2d(3, 4, 1, bias=False), nn.Conv2d(3, 2, 1))


# ---- losses of the methods, against explicit loops (MiB train.py::Trainer.train, utils/loss.py) ----------------

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
