"""methods/losses.py: the shared loss terms (BCE and CE with ignored pixels, BARM's focal loss, MiB's CE over all
pixels, unbiased CE and KD, PLOP's collapsed logits) on small tensors against explicit loops over pixels and classes
(BARM utils/loss.py; MiB utils/loss.py, train.py::Trainer.train)."""
import math

import pytest
import torch

from methods import ilt, losses, lwf
from tests.helpers import B, C, H, REL, W, ce_loop, lse, make_inputs, pixels, softmax, softplus, z_at


def test_bce_with_ignore_by_hand():
    logits = torch.tensor([[[[0.5, -1.0]], [[2.0, 0.0]], [[-0.3, 1.5]]]])  # (1, 3, 1, 2)
    labels = torch.tensor([[[1, 255]]])
    # pixel 0: label 1 -> targets (0, 1, 0); pixel 1 ignored
    expected = softplus(0.5) + (softplus(2.0) - 2.0) + softplus(-0.3)
    assert losses.bce_with_ignore(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    labels = torch.tensor([[[0, 2]]])
    pixel1 = softplus(-1.0) + softplus(0.0) + (softplus(1.5) - 1.5)
    pixel0 = (softplus(0.5) - 0.5) + softplus(2.0) + softplus(-0.3)
    assert losses.bce_with_ignore(logits, labels).item() == pytest.approx((pixel0 + pixel1) / 2, rel=1e-6)


def test_bce_with_only_ignored_pixels_is_zero():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = losses.bce_with_ignore(logits, torch.full((1, 2, 2), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_ce_with_ignore_by_hand():
    logits = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])
    labels = torch.tensor([[[1, 255]]])
    expected = -(0.0 - math.log(math.exp(1.0) + math.exp(0.0)))
    assert losses.ce_with_ignore(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    # BARM's focal loss (gamma 0) averages over every pixel, the ignored one counting 0: half of the CE here
    assert losses.CRITERIA["focal_loss"](logits, labels).item() == pytest.approx(expected / 2, rel=1e-6)


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


def test_collapse_logits_by_hand():
    z = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).view(1, 5, 1, 1)
    assert losses.collapse_logits(z, n_old=3).flatten().tolist() == [1 + 4 + 5, 2, 3]
    z = torch.arange(12.0).view(1, 4, 1, 3)  # channels (0,1,2) (3,4,5) (6,7,8) (9,10,11), K_old = 2
    assert losses.collapse_logits(z, n_old=2)[0, :, 0].tolist() == [[15, 18, 21], [3, 4, 5]]
