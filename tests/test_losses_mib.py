"""MiB-family loss terms, BARM's focal loss and MiB's background init, against explicit loops over pixels and
classes written from the formulas of the reference code (MiB utils/loss.py, train.py::Trainer.train;
BARM utils/loss.py)."""
import math

import pytest
import torch
from torch import nn

from helpers import lse, softmax
from methods import ewc, ilt, losses, lwf, mib, pi, rw
from methods.mib_family import init_new_classifier

B, C, H, W = 2, 5, 3, 4
REL = 1e-5


def make_inputs(seed=0, n_classes=C, n_old=3):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, n_classes, H, W, generator=gen) * 2
    old_logits = torch.randn(B, n_old, H, W, generator=gen) * 2
    labels = torch.randint(0, n_classes, (B, H, W), generator=gen)
    labels[0, 0, 0] = labels[1, 2, 3] = labels[1, 0, 1] = 255  # ignored pixels
    labels[0, 1, 1], labels[0, 1, 2], labels[1, 1, 0] = 0, 1, n_classes - 1  # background, old and new present
    return logits, old_logits, labels


def pixels():
    return [(b, i, j) for b in range(B) for i in range(H) for j in range(W)]


def z_at(logits, b, i, j):
    return [float(logits[b, c, i, j]) for c in range(logits.shape[1])]


def softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def bce(x, t):  # BCE with logits: −t·log σ(x) − (1 − t)·log(1 − σ(x))
    return softplus(x) - t * x


def ce_loop(logits, labels):
    """Σ over valid pixels of −log softmax(z)_y, and the number of valid pixels."""
    total, valid = 0.0, 0
    for b, i, j in pixels():
        y = int(labels[b, i, j])
        if y == 255:
            continue
        z = z_at(logits, b, i, j)
        total += lse(z) - z[y]
        valid += 1
    return total, valid


# ---- CE over all pixels (MiB train.py::Trainer.train) ------------------------------------------------
def test_ce_all_pixels_divides_by_all_pixels():
    logits, _, labels = make_inputs()
    total, valid = ce_loop(logits, labels)
    assert valid == B * H * W - 3
    assert losses.ce_all_pixels(logits, labels).item() == pytest.approx(total / (B * H * W), rel=REL)
    # the valid-pixel mean (BARM's ce_loss) is a different number
    assert losses.ce_with_ignore(logits, labels).item() == pytest.approx(total / valid, rel=REL)


def test_ce_all_pixels_only_ignored_is_zero_with_finite_gradient():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = losses.ce_all_pixels(logits, torch.full((1, 2, 2), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_losses_compute_in_float32():
    logits, old_logits, labels = make_inputs()
    half, old_half = logits.half(), old_logits.half()
    for value in (losses.ce_all_pixels(half, labels), losses.unbiased_ce(half, labels, 3),
                  losses.unbiased_kd(half, old_half), lwf.kd_old_channels(half, old_half),
                  lwf.bce_all_pixels(half, labels), lwf.icarl_distillation(half, old_half),
                  ilt.feature_mse(half, half * 0.5), losses.focal_with_ignore(half, labels)):
        assert value.dtype == torch.float32


# ---- MiB unbiased CE (MiB utils/loss.py::UnbiasedCrossEntropy) ---------------------------------------
def unbiased_ce_loop(logits, labels, n_old):
    total = 0.0
    for b, i, j in pixels():
        y = int(labels[b, i, j])
        if y == 255:
            continue
        z = z_at(logits, b, i, j)
        d = lse(z)
        if y < n_old:  # background or an old class: log P̂_0 = logsumexp over the old channels − D
            total += -(lse(z[:n_old]) - d)
        else:
            total += -(z[y] - d)
    return total / (B * H * W)


@pytest.mark.parametrize("n_old", [1, 2, 3, 4])
def test_unbiased_ce_by_loop(n_old):
    logits, _, labels = make_inputs(seed=n_old)
    labels_before = labels.clone()
    expected = unbiased_ce_loop(logits, labels, n_old)
    assert losses.unbiased_ce(logits, labels, n_old).item() == pytest.approx(expected, rel=REL)
    assert torch.equal(labels, labels_before)  # caller's labels untouched (MiB utils/loss.py::UnbiasedCrossEntropy)


def test_unbiased_ce_without_old_classes_is_plain_ce():
    logits, _, labels = make_inputs()
    total, _ = ce_loop(logits, labels)
    assert losses.unbiased_ce(logits, labels, 0).item() == pytest.approx(total / (B * H * W), rel=REL)
    # with n_old = 1 the background term is z_0 − D: plain CE as well
    assert losses.unbiased_ce(logits, labels, 1).item() == pytest.approx(total / (B * H * W), rel=REL)
    # with old classes the old-class pixels count as background: a different (smaller) value
    assert losses.unbiased_ce(logits, labels, 3).item() < total / (B * H * W)


def test_unbiased_ce_rejects_bad_old_count():
    logits, _, labels = make_inputs()
    with pytest.raises(ValueError):
        losses.unbiased_ce(logits, labels, C + 1)


# ---- MiB unbiased KD (MiB utils/loss.py::UnbiasedKnowledgeDistillationLoss) --------------------------
@pytest.mark.parametrize("alpha", [1.0, 2.0])
@pytest.mark.parametrize("n_old", [2, 3, 5])
def test_unbiased_kd_by_loop(n_old, alpha):
    logits, old_logits, _ = make_inputs(seed=10 + n_old, n_old=n_old)
    total = 0.0
    for b, i, j in pixels():
        z = z_at(logits, b, i, j)
        q = softmax([alpha * v for v in z_at(old_logits, b, i, j)])
        d = lse(z)
        log_bg = lse([z[0]] + z[n_old:]) - d  # background absorbs the new classes
        term = q[0] * log_bg + sum(q[c] * (z[c] - d) for c in range(1, n_old))
        total += term / n_old
    expected = -total / (B * H * W)
    assert losses.unbiased_kd(logits, old_logits, alpha).item() == pytest.approx(expected, rel=REL)


# ---- LwF / ILT KD (MiB utils/loss.py::KnowledgeDistillationLoss) -------------------------------------
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_kd_old_channels_by_loop(alpha):
    logits, old_logits, _ = make_inputs(seed=3)
    n_old = old_logits.shape[1]
    total = 0.0
    for b, i, j in pixels():
        z = z_at(logits, b, i, j)[:n_old]  # log-softmax over the old channels only
        q = softmax([alpha * v for v in z_at(old_logits, b, i, j)])
        d = lse(z)
        total += sum(q[c] * (z[c] - d) for c in range(n_old)) / n_old
    expected = -total / (B * H * W)
    assert lwf.kd_old_channels(logits, old_logits, alpha).item() == pytest.approx(expected, rel=REL)


# ---- LwF-MC (MiB utils/loss.py::BCEWithLogitsLossWithIgnoreIndex, train.py::Trainer.train) -----------
def test_bce_all_pixels_by_loop():
    logits, _, labels = make_inputs(seed=4)
    total = 0.0
    for b, i, j in pixels():
        y = int(labels[b, i, j])
        if y == 255:
            continue
        z = z_at(logits, b, i, j)
        total += sum(bce(z[c], 1.0 if c == y else 0.0) for c in range(C))
    assert lwf.bce_all_pixels(logits, labels).item() == pytest.approx(total / (B * H * W), rel=REL)
    # BARM's BCE divides by the valid pixels instead
    assert losses.bce_with_ignore(logits, labels).item() == pytest.approx(total / (B * H * W - 3), rel=REL)


def test_icarl_distillation_by_loop():
    logits, old_logits, _ = make_inputs(seed=5)
    n_old = old_logits.shape[1]
    total = 0.0
    for b, i, j in pixels():
        z, z_old = z_at(logits, b, i, j), z_at(old_logits, b, i, j)
        total += sum(bce(z[c], sigmoid(z_old[c])) for c in range(n_old))
    expected = n_old * total / (B * n_old * H * W)
    assert lwf.icarl_distillation(logits, old_logits).item() == pytest.approx(expected, rel=REL)


# ---- ILT (MiB train.py::Trainer.train) ---------------------------------------------------------------
def test_feature_mse_by_loop():
    gen = torch.Generator().manual_seed(6)
    f, g = torch.randn(2, 3, 2, 2, generator=gen), torch.randn(2, 3, 2, 2, generator=gen)
    values = [(float(a) - float(b)) ** 2 for a, b in zip(f.flatten(), g.flatten())]
    assert ilt.feature_mse(f, g).item() == pytest.approx(sum(values) / 24, rel=REL)


def test_mib_family_default_weights():
    assert (lwf.LWF_W_KD, ilt.ILT_W_KD, ilt.ILT_W_DE) == (100.0, 100.0, 100.0)
    assert (lwf.LWFMC_W_ICARL, mib.MIB_W_KD, losses.KD_ALPHA) == (10.0, 10.0, 1.0)
    assert (ewc.EWC_IMPORTANCE, ewc.EWC_ALPHA, pi.PI_IMPORTANCE) == (500.0, 0.9, 500.0)
    assert (rw.RW_IMPORTANCE, rw.RW_ALPHA, rw.RW_ITERATIONS) == (100.0, 0.9, 10)


# ---- BARM's focal loss (BARM utils/loss.py::FocalLoss; see docs/differences.md) ------------------------
def test_focal_loss_is_ce_times_valid_fraction():
    logits, _, labels = make_inputs(seed=7)
    total, valid = ce_loop(logits, labels)
    focal = losses.focal_with_ignore(logits, labels).item()
    assert focal == pytest.approx(total / (B * H * W), rel=REL)
    ce = losses.ce_with_ignore(logits, labels).item()
    assert focal == pytest.approx(ce * valid / (B * H * W), rel=REL)
    assert focal != pytest.approx(ce, rel=1e-3)
    assert losses.CRITERIA["focal_loss"] is losses.focal_with_ignore


def test_focal_loss_with_gamma_by_loop():
    logits, _, labels = make_inputs(seed=8)
    gamma, alpha = 2.0, 0.25
    total = 0.0
    for b, i, j in pixels():
        y = int(labels[b, i, j])
        if y == 255:
            continue
        z = z_at(logits, b, i, j)
        ce = lse(z) - z[y]
        total += alpha * (1 - math.exp(-ce)) ** gamma * ce
    value = losses.focal_with_ignore(logits, labels, gamma=gamma, alpha=alpha).item()
    assert value == pytest.approx(total / (B * H * W), rel=REL)


def test_focal_loss_gradient_finite_with_ignored_pixels():
    logits, _, labels = make_inputs(seed=9)
    logits.requires_grad_(True)
    losses.focal_with_ignore(logits, labels).backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[0, :, 0, 0] == 0)  # the ignored pixel gets no gradient


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
