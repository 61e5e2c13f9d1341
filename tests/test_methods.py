"""Method hooks: BARM's ear initialisation, parameter groups, BN freezing, losses and prediction; FT."""
import pytest
import torch
from torch import nn

from engine.step import selection_score
from methods import get_method, list_methods
from methods.base import Batch, StepContext
from network import build_model
from utils.errors import UserError
from utils.tasks import get_task

STEPS = get_task("voc", "15-1")


def model_at(step, seed=0):
    torch.manual_seed(seed)
    return build_model("deeplabv3bga_resnet18", [len(s) for s in STEPS[:step + 1]])


def test_registry_and_overrides():
    assert set(list_methods()) >= {"barm", "ft"}
    barm = get_method("barm", w_tri=2.5)
    assert barm.hp.w_tri == 2.5 and barm.hp.w_fd == 4.0 and barm.hp.pseudo_thresh == 0.7
    with pytest.raises(UserError, match="no hyper-parameter"):
        get_method("barm", w_nothing=1)
    with pytest.raises(UserError, match="unknown method"):
        get_method("mib2")


def test_ear_copies_head_pre_conv_and_affine_but_not_statistics():
    previous = model_at(1)
    with torch.no_grad():  # make head_pre's BN statistics and affine distinctive
        pre_bn = previous.classifier.head_pre[1]
        pre_bn.running_mean.fill_(0.3)
        pre_bn.running_var.fill_(2.0)
        pre_bn.weight.fill_(1.7)
        pre_bn.bias.fill_(-0.2)
    student = model_at(2, seed=1)
    student.load_state_dict(previous.state_dict(), strict=False)
    get_method("barm").prepare_student(student, previous, StepContext("voc", STEPS, 2))
    ear, pre = student.classifier.ear[-1], student.classifier.head_pre
    assert torch.equal(ear[0].weight, pre[0].weight)
    assert torch.equal(ear[1].weight, pre[1].weight) and torch.equal(ear[1].bias, pre[1].bias)
    assert torch.equal(ear[1].running_mean, torch.zeros(ear[1].running_mean.shape))
    assert torch.equal(ear[1].running_var, torch.ones(ear[1].running_var.shape))
    assert int(ear[1].num_batches_tracked) == 0
    assert torch.equal(student.classifier.ear[0][0].weight, previous.classifier.ear[0][0].weight)


def ids(params):
    return {id(p) for p in params}


def test_parameter_groups_step0_and_incremental():
    method = get_method("barm")
    model = model_at(0)
    groups = method.param_groups(model, StepContext("voc", STEPS, 0), lr=0.123)
    assert [g["lr"] for g in groups] == [0.001, 0.01]  # --lr is not used at step 0
    assert ids(groups[0]["params"]) == ids(model.backbone.parameters())
    assert ids(groups[1]["params"]) == ids(model.classifier.parameters())

    model = model_at(2)
    c = model.classifier
    groups = method.param_groups(model, StepContext("voc", STEPS, 2), lr=0.123)
    assert [g["lr"] for g in groups] == [0.123, 0.123, 1e-3, 1e-4, 1e-4, 1e-4, 1e-4]
    expected = [c.head[2].parameters(), c.ear[1].parameters(), c.aspp.parameters(),
                [p for h in c.head[:2] for p in h.parameters()], c.ear[0].parameters(), c.head_pre.parameters(),
                model.backbone.parameters()]
    for group, params in zip(groups, expected):
        assert ids(group["params"]) == ids(params)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert method.param_groups(model_at(1), StepContext("voc", STEPS, 1), 0.1)[4]["params"] == []  # no old ears


def test_bn_freeze_at_incremental_steps_keeps_dropout_active():
    method = get_method("barm", bn_freeze=True)
    ctx = StepContext("voc", STEPS, 1)
    model = model_at(1)
    method.configure(model, ctx)
    method.set_train_mode(model, ctx)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training and not m.weight.requires_grad and not m.bias.requires_grad for m in bns)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.training for m in dropouts)
    # ignored at step 0, as in BARM
    model0, ctx0 = model_at(0), StepContext("voc", STEPS, 0)
    method.configure(model0, ctx0)
    method.set_train_mode(model0, ctx0)
    assert all(m.training and m.weight.requires_grad for m in model0.modules() if isinstance(m, nn.BatchNorm2d))


def test_pseudo_gates_the_teacher_and_the_auxiliary_losses():
    ctx = StepContext("voc", STEPS, 1)
    assert not get_method("barm").needs_teacher(ctx)
    assert get_method("barm", pseudo=True).needs_teacher(ctx)
    assert not get_method("barm", pseudo=True).needs_teacher(StepContext("voc", STEPS, 0))
    model, teacher = model_at(1), model_at(0)
    teacher.eval()
    images, labels = torch.randn(2, 3, 33, 33), torch.randint(0, 17, (2, 33, 33))
    plain = get_method("barm").loss(model(images), None, Batch(images, labels), ctx)
    assert set(plain) == {"total", "std"}
    with torch.no_grad():
        teacher_outputs = teacher(images)
    full = get_method("barm", pseudo=True).loss(model(images), teacher_outputs, Batch(images, labels), ctx)
    assert set(full) == {"total", "std", "tri_bg", "fd", "gkd", "bga_ce"}


def test_prediction_upsamples_probabilities_for_barm_and_logits_for_ft():
    # pixel A = (10, 4), pixel B = (-10, 4); bilinear (1, 2) -> (1, 4) gives the second output pixel the weights
    # 0.75 A + 0.25 B. Logits there: class 0 = 5 > class 1 = 4; probabilities: class 0 = 0.75·σ(10) + 0.25·σ(-10)
    # = 0.75 < class 1 = σ(4) = 0.982. So sigmoid-then-upsample (BARM) and upsample-then-argmax (FT) disagree.
    logits = torch.tensor([[[[10.0, -10.0]], [[4.0, 4.0]]]])  # (1, 2, 1, 2)
    assert get_method("barm").predict(logits, (1, 4)).tolist() == [[[0, 1, 1, 1]]]
    assert get_method("ft").predict(logits, (1, 4)).tolist() == [[[0, 0, 1, 1]]]


def test_ft_trains_everything_with_one_group():
    method = get_method("ft")  # FT under MiB's protocol (MiB argparser.py, train.py): MiB's network, CE over all pixels
    assert method.model_families == ("mib",) and not method.needs_teacher(StepContext("voc", STEPS, 1))
    model = build_model("mib_resnet18", [16, 1])
    groups = method.param_groups(model, StepContext("voc", STEPS, 1), lr=0.001)
    assert len(groups) == 1 and groups[0]["lr"] == 0.001
    assert ids(groups[0]["params"]) == ids(model.parameters())
    images, labels = torch.randn(2, 3, 33, 33), torch.randint(0, 17, (2, 33, 33))
    labels[0, :4] = 255
    loss = method.loss(model(images), None, Batch(images, labels), StepContext("voc", STEPS, 1))
    assert set(loss) == {"total", "ce"} and torch.isfinite(loss["total"])
    # the mean runs over all pixels, ignored ones included (reduction 'none' then .mean(), MiB train.py::Trainer.train)
    logits = nn.functional.interpolate(model(images)[0], size=(33, 33), mode="bilinear", align_corners=False)
    valid = nn.functional.cross_entropy(logits, labels, ignore_index=255)
    torch.testing.assert_close(loss["total"], valid * (labels != 255).float().mean(), rtol=1e-5, atol=1e-6)


def test_barm_validation_rule():
    method = get_method("barm")
    due = method.validation_due
    # more than 100 iterations per epoch: after every epoch, never inside one
    assert [due(i, 101, 505, None) for i in (100, 101, 150, 202)] == [False, True, False, True]
    # fewer: after every 5th epoch only (BARM trainer/trainer.py::Trainer.train: epoch % 5 == 4, 0-based)
    assert [i for i in range(1, 101) if due(i, 10, 100, None)] == [50, 100]
    assert [i for i in range(1, 61) if due(i, 10, 60, 2)] == [20, 40, 60]  # --val_interval 2
    assert not any(due(i, 10, 60, 0) for i in range(1, 61))  # --val_interval 0


def test_selection_score_includes_background_at_step_0_only():
    steps = ((0, 1, 2), (3, 4))
    iou = {0: 0.9, 1: 0.5, 2: 0.1, 3: 0.3, 4: 0.7}
    assert selection_score(iou, StepContext("voc", steps, 0)) == pytest.approx((0.9 + 0.5 + 0.1) / 3)
    assert selection_score(iou, StepContext("voc", steps, 1)) == pytest.approx((0.3 + 0.7) / 2)


def test_barm_selects_best_only_at_step_0_and_only_when_asked():
    method = get_method("barm")
    assert method.selects_best(StepContext("voc", STEPS, 0), True)
    assert not method.selects_best(StepContext("voc", STEPS, 1), True)
    assert not method.selects_best(StepContext("voc", STEPS, 0), None)
