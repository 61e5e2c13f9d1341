"""methods/dkd_losses.py: DKD's loss terms, prediction rule and memory pseudo-labels (DKD models/loss.py,
utils/memory.py) against hand computations and explicit loops."""
import math

import numpy as np
import pytest
import torch

from methods import dkd_losses
from tests.helpers import dkd_bce as bce, sigmoid


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
