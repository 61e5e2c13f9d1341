"""BARM's loss terms on small tensors against values computed independently
(BARM trainer/trainer.py::Trainer.train_episode, utils/loss.py)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods import barm, losses


def softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


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
