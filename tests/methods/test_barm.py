"""methods/barm.py: BARM's loss terms on small tensors against values computed independently (BARM
trainer/trainer.py::Trainer.train_episode, utils/loss.py), the loss with given pseudo-labels, and the method's hooks
(ear initialisation, parameter groups, BN freezing, teacher, prediction, validation and best-weight selection)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods import barm, get_method, losses
from methods.base import Batch, StepContext
from network import build_model
from tests.helpers import barm_inputs, ids, sigmoid, softplus
from utils.tasks import get_task


def test_pseudo_labels_by_hand():
    # teacher logits for 3 channels at 4 pixels (1 x 3 x 1 x 4)
    prev = torch.tensor([[[[-5.0, -5.0, -5.0, 3.0]],
                          [[3.0, 0.5, -5.0, -5.0]],
                          [[-5.0, -5.0, 1.0, -5.0]]]])
    labels = torch.tensor([[[0, 0, 0, 0]]])
    # pixel 0: class 1 at sigma(3)=0.95 -> 1; pixel 1: class 1 at sigma(.5)=0.62 < 0.7 -> 0;
    # pixel 2: class 2 at sigma(1)=0.73 -> 2; pixel 3: background wins -> stays 0
    assert barm.barm_pseudo_labels(prev, labels, 0.7).tolist() == [[[1, 0, 2, 0]]]
    # only background pixels are relabelled: current-class and ignored pixels are kept
    labels = torch.tensor([[[255, 3, 0, 0]]])
    assert barm.barm_pseudo_labels(prev, labels, 0.7).tolist() == [[[255, 3, 2, 0]]]
    # softmax for non-BCE losses: pixel 0 has p(class 1) ~ 1
    assert barm.barm_pseudo_labels(prev, torch.zeros(1, 1, 4, dtype=torch.long), 0.7, "ce_loss")[0, 0, 0] == 1


def test_tri_bg_and_bga_ce_by_hand():
    residual = torch.tensor([[[[0.0, 2.0, -2.0, 1.0]]]])
    bg = torch.tensor([[[[1.0, 1.0, 1.0, 0.0]]]])
    fg = 1 - bg
    terms = [max(0.0, (sigmoid(r) - 1) ** 2 - sigmoid(r) ** 2) for r in (0.0, 2.0, -2.0)]
    assert terms[2] == pytest.approx(1 - 2 * sigmoid(-2.0))
    assert barm.tri_bg_loss(residual, bg).item() == pytest.approx(sum(terms) / 3, rel=1e-6)
    assert barm.bga_ce_loss(residual, fg).item() == pytest.approx(softplus(1.0), rel=1e-6)


def test_tri_bg_without_background_pixels_is_finite():
    residual = torch.randn(2, 1, 3, 3, requires_grad=True)
    loss = barm.tri_bg_loss(residual, torch.zeros(2, 1, 3, 3))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(residual.grad).all()


def test_feature_distillation_and_group_kd_by_hand():
    f = [torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])]  # (1, 2, 1, 2)
    g = [torch.tensor([[[[0.0, 0.0]], [[1.0, 1.0]]]])]
    mask = torch.tensor([[[[1.0, 0.0]]]])
    # masked: student (1, 0 | 3, 0), teacher (0, 0 | 1, 0): squared errors 1, 0, 4, 0 over 4 elements
    assert barm.feature_distillation(f, g, mask).item() == pytest.approx(5 / 4)
    z, z_prev = torch.tensor([[[[0.5, -1.0]]]]), torch.tensor([[[[2.0, 0.0]]]])
    per_pixel = [softplus(0.5) - 0.5 * sigmoid(2.0), softplus(-1.0) + 1.0 * sigmoid(0.0)]
    assert barm.group_kd([z], [z_prev]).item() == pytest.approx(sum(per_pixel) / 2, rel=1e-6)
    two_channels = [torch.cat([z, z], dim=1)], [torch.cat([z_prev, z_prev], dim=1)]
    assert barm.group_kd(*two_channels).item() == pytest.approx(sum(per_pixel), rel=1e-6)  # sum over channels


def independent_barm_loss(logits, feats, prev_logits, prev_feats, labels, num_new, thresh=0.7):
    """The eight steps of BARM's loss (BARM trainer/trainer.py::Trainer.train_episode) written out with numpy loops
    (upsampling aside)."""
    size = labels.shape[-2:]
    up = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).numpy()
    prev_up = F.interpolate(prev_logits, size=size, mode="bilinear", align_corners=False).numpy()
    lab = labels.numpy()
    b, c, h, w = up.shape
    pseudo = lab.copy()
    std, valid = 0.0, 0
    for n in range(b):
        for y in range(h):
            for x in range(w):
                probs = [sigmoid(v) for v in prev_up[n, :, y, x]]
                best = int(np.argmax(probs))
                if lab[n, y, x] == 0 and best > 0 and probs[best] >= thresh:
                    pseudo[n, y, x] = best
                if pseudo[n, y, x] == 255:
                    continue
                valid += 1
                for k in range(c):
                    z = float(up[n, k, y, x])
                    std += softplus(z) - (z if pseudo[n, y, x] == k else 0.0)
    std /= valid
    fh, fw = logits.shape[-2:]
    rows = [int(np.floor(i * h / fh)) for i in range(fh)]
    cols = [int(np.floor(j * w / fw)) for j in range(fw)]
    small = lab[:, rows][:, :, cols]
    fg, bg = ((small != 0) & (small != 255)).astype(float), (small == 0).astype(float)
    r = feats["prev_heads"][-1][:, 0].numpy()
    tri = sum(max(0.0, 1 - 2 * sigmoid(v)) * m for v, m in zip(r.ravel(), bg.ravel())) / bg.sum()
    bga = sum(softplus(v) * m for v, m in zip(r.ravel(), fg.ravel())) / fg.sum()
    old = len(prev_feats["prev_heads"])
    fd = sum(float(((bg[:, None] * (f.numpy() - g.numpy())) ** 2).mean())
             for f, g in zip(feats["ear_feats"][:old], prev_feats["ear_feats"]))
    gkd = 0.0
    for z, zp in zip(feats["prev_heads"][:old], prev_feats["prev_heads"]):
        z, p = z.numpy(), 1 / (1 + np.exp(-zp.numpy()))
        bce = np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0) - z * p
        gkd += bce.mean(axis=(0, 2, 3)).sum()
    return {"std": std, "tri_bg": tri, "bga_ce": bga, "fd": fd, "gkd": gkd,
            "total": std + 5 * tri + 4 * fd + gkd + bga}, pseudo


def make_outputs(generator, b, classes, h, w, heads):
    logits = torch.randn(b, classes, h, w, generator=generator) * 2
    feats = {"prev_heads": [torch.randn(b, n, h, w, generator=generator) for n in heads],
             "ear_feats": [torch.randn(b, 4, h, w, generator=generator) for _ in heads]}
    return logits, feats


def test_barm_loss_matches_an_independent_computation():
    g = torch.Generator().manual_seed(0)
    # step 2 of a toy task: classes per step [3, 1, 1] -> 5 channels; teacher has 4
    logits, feats = make_outputs(g, 2, 5, 4, 5, heads=[3, 2, 2])
    prev_logits, prev_feats = make_outputs(g, 2, 4, 4, 5, heads=[3, 2])
    labels = torch.randint(0, 5, (2, 9, 11), generator=g)
    labels[labels == 3] = 0  # step-1 class absent from the step-2 labels, as after masking
    labels[0, 0, :3] = 255
    terms, pseudo = barm.barm_loss(logits, feats, prev_logits, prev_feats, labels, num_new=1)
    expected, expected_pseudo = independent_barm_loss(logits, feats, prev_logits, prev_feats, labels, 1)
    assert (pseudo.numpy() == expected_pseudo).all()
    assert (pseudo != labels).any(), "the toy teacher should relabel some background pixels"
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-5), name


def test_barm_loss_detaches_old_foreground_channels():
    g = torch.Generator().manual_seed(1)
    logits, feats = make_outputs(g, 1, 5, 3, 3, heads=[3, 2, 2])
    prev_logits, prev_feats = make_outputs(g, 1, 4, 3, 3, heads=[3, 2])
    logits.requires_grad_(True)
    labels = torch.randint(0, 5, (1, 6, 6), generator=g)
    terms, _ = barm.barm_loss(logits, feats, prev_logits, prev_feats, labels, num_new=1)
    terms["std"].backward()
    grad = logits.grad.abs().sum(dim=(0, 2, 3))
    assert grad[1:4].sum() == 0  # old foreground channels 1..3 (base classes and the step-1 class)
    assert grad[0] > 0 and grad[4] > 0  # background and the new class learn


def test_barm_loss_weights_are_named_and_overridable():
    g = torch.Generator().manual_seed(2)
    logits, feats = make_outputs(g, 1, 4, 3, 3, heads=[3, 2])
    prev_logits, prev_feats = make_outputs(g, 1, 3, 3, 3, heads=[3])
    labels = torch.randint(0, 4, (1, 6, 6), generator=g)
    base, _ = barm.barm_loss(logits, feats, prev_logits, prev_feats, labels, 1)
    zero, _ = barm.barm_loss(logits, feats, prev_logits, prev_feats, labels, 1,
                               w_tri=0, w_fd=0, w_gkd=0, w_bga_ce=0)
    assert zero["total"].item() == pytest.approx(base["std"].item())
    assert (barm.BARM_W_TRI, barm.BARM_W_FD, barm.BARM_W_GKD, barm.BARM_W_BGA_CE) == (5, 4, 1, 1)


def test_barm_loss_with_given_pseudo_labels():
    (logits, features), (prev_logits, prev_features), labels = barm_inputs()
    base, pseudo = barm.barm_loss(logits, features, prev_logits, prev_features, labels, 1)
    same, out = barm.barm_loss(logits, features, prev_logits, prev_features, labels, 1, pseudo_labels=pseudo)
    assert out is pseudo and all(torch.equal(base[k], same[k]) for k in base)  # BARM's numbers unchanged
    other = torch.where(labels == 0, torch.ones_like(labels), labels)  # every background pixel -> class 1
    changed, out = barm.barm_loss(logits, features, prev_logits, prev_features, labels, 1, pseudo_labels=other)
    assert out is other and not torch.equal(changed["std"], base["std"])
    assert all(torch.equal(changed[k], base[k]) for k in ("tri_bg", "fd", "gkd", "bga_ce"))  # masks from labels
    assert torch.equal(changed["std"], losses.bce_with_ignore(torch.cat(
        [losses.upsample(logits, (49, 49))[:, :1], losses.upsample(logits, (49, 49))[:, 1:]], dim=1), other))
    with pytest.raises(ValueError):
        barm.barm_loss(logits, features, prev_logits, prev_features, labels, 1, pseudo_labels=other[:, :3])


# ---- the method's hooks -------------------------------------------------------------------------------

STEPS = get_task("voc", "15-1")


def model_at(step, seed=0):
    torch.manual_seed(seed)
    return build_model("deeplabv3bga_resnet18", [len(s) for s in STEPS[:step + 1]])


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
    assert get_method("barm").needs_teacher(ctx)  # published: BARM's scripts pass --pseudo
    assert not get_method("barm", pseudo=False).needs_teacher(ctx)
    assert not get_method("barm", pseudo=True).needs_teacher(StepContext("voc", STEPS, 0))
    model, teacher = model_at(1), model_at(0)
    teacher.eval()
    images, labels = torch.randn(2, 3, 33, 33), torch.randint(0, 17, (2, 33, 33))
    plain = get_method("barm", pseudo=False).loss(model(images), None, Batch(images, labels), ctx)
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


def test_barm_validation_rule():
    method = get_method("barm")
    due = method.validation_due
    # more than 100 iterations per epoch: after every epoch, never inside one
    assert [due(i, 101, 505, None) for i in (100, 101, 150, 202)] == [False, True, False, True]
    # fewer: after every 5th epoch only (BARM trainer/trainer.py::Trainer.train: epoch % 5 == 4, 0-based)
    assert [i for i in range(1, 101) if due(i, 10, 100, None)] == [50, 100]
    assert [i for i in range(1, 61) if due(i, 10, 60, 2)] == [20, 40, 60]  # --val_interval 2
    assert not any(due(i, 10, 60, 0) for i in range(1, 61))  # --val_interval 0


def test_barm_selects_best_only_at_step_0_and_only_when_asked():
    method = get_method("barm")
    assert method.selects_best(StepContext("voc", STEPS, 0), True)
    assert not method.selects_best(StepContext("voc", STEPS, 1), True)
    assert method.selects_best(StepContext("voc", STEPS, 0), None)  # published: step 0's best-validated weights
    assert not method.selects_best(StepContext("voc", STEPS, 0), False)  # --select_last / --clean
