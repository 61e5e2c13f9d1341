"""methods/ssul_losses.py: SSUL's numerics on hand-made inputs (SSUL datasets/voc.py::__getitem__, main.py::main):
unknown labels, weight transfer, trainable heads, pseudo-labels, prediction, the loss and the memory candidates
(SSUL utils/memory.py::memory_sampling_balanced)."""
import math

import pytest
import torch

from methods import ssul_losses
from methods.base import Batch
from network.heads import SSULHead
from tests.helpers import sigmoid, softplus
from utils.errors import UserError


def logit(p):
    return math.log(p / (1 - p))


# ---------------------------------------------------------------- unknown label (SSUL datasets/voc.py::__getitem__)

LABELS = torch.tensor([[0, 1, 255], [2, 0, 0]])
SALIENCY = torch.tensor([[1, 0, 5], [0, 0, 3]])


def test_unknown_labels_voc_uses_saliency():
    # shifted: [[1, 2, 255], [3, 1, 1]]; background (1) with saliency > 0 becomes unknown (0); 255 stays
    expected = [[0, 2, 255], [3, 1, 0]]
    assert ssul_losses.unknown_labels(LABELS, SALIENCY).tolist() == expected


def test_unknown_labels_ade_every_background_is_unknown():
    assert ssul_losses.unknown_labels(LABELS).tolist() == [[0, 2, 255], [3, 0, 0]]


def test_unknown_labels_batched_and_dtype_kept():
    labels = torch.stack([LABELS, torch.tensor([[255, 3, 0], [0, 255, 1]])]).to(torch.uint8)
    saliency = torch.stack([SALIENCY, torch.tensor([[9, 0, 0], [2, 7, 0]])])
    out = ssul_losses.unknown_labels(labels, saliency)
    assert out.dtype == torch.uint8
    assert out.tolist() == [[[0, 2, 255], [3, 1, 0]], [[255, 4, 1], [0, 255, 2]]]


def test_unknown_labels_saliency_shape_mismatch():
    with pytest.raises(UserError, match="saliency"):
        ssul_losses.unknown_labels(LABELS, SALIENCY[:, :2])


# ---------------------------------------------------------------- weight transfer (SSUL main.py::main)

def distinctive_head():
    torch.manual_seed(0)
    head = SSULHead(64, [3, 2], (6, 12, 18), unknown=True)  # entries: [1, 1, 2, 2]
    with torch.no_grad():
        for i, entry in enumerate(head.head):
            conv, bn, cls = entry[0], entry[1], entry[3]
            conv.weight.normal_()
            bn.weight.fill_(1.0 + i)
            bn.bias.fill_(-0.5 * i)
            bn.running_mean.fill_(0.1 * (i + 1))
            bn.running_var.fill_(2.0 + i)
            cls.weight.normal_()
            cls.bias.copy_(torch.arange(cls.bias.numel(), dtype=torch.float32) + 10 * i)
    return head


def test_transfer_unknown_head_copies_every_value():
    head = distinctive_head()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    ssul_losses.transfer_unknown_head(head, 1)
    after = head.state_dict()
    unk, new = "head.0.", "head.3."
    assert torch.equal(after[new + "0.weight"], before[unk + "0.weight"])
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(after[new + "1." + name], before[unk + "1." + name]), name
    assert after[new + "3.weight"].shape == (2, 256, 1, 1)
    for c in range(2):  # every output channel of the 1x1 conv gets the unknown's single filter and bias
        assert torch.equal(after[new + "3.weight"][c], before[unk + "3.weight"][0])
        assert after[new + "3.bias"][c].item() == before[unk + "3.bias"][0].item() == 0.0
    assert torch.equal(after[new + "1.num_batches_tracked"], before[new + "1.num_batches_tracked"])
    for key, value in before.items():  # old entries and ASPP untouched
        if not key.startswith(new):
            assert torch.equal(after[key], value), key


def test_transfer_unknown_head_at_step_two():
    head = distinctive_head()
    head.add_step(3)
    with torch.no_grad():
        head.head[0][3].bias.fill_(-4.0)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    ssul_losses.transfer_unknown_head(head, 2)
    after = head.state_dict()
    assert torch.equal(after["head.4.3.bias"], torch.full((3,), -4.0))
    assert torch.equal(after["head.4.3.weight"], before["head.0.3.weight"].expand(3, -1, -1, -1))
    assert torch.equal(after["head.3.3.weight"], before["head.3.3.weight"])  # step-1 head untouched


def test_transfer_unknown_head_checks():
    with pytest.raises(ValueError):
        ssul_losses.transfer_unknown_head(SSULHead(64, [3, 2], (6, 12, 18), unknown=False), 1)
    with pytest.raises(ValueError):
        ssul_losses.transfer_unknown_head(SSULHead(64, [3, 2], (6, 12, 18), unknown=True), 2)


def test_trainable_heads():
    head = SSULHead(64, [3, 2], (6, 12, 18), unknown=True)
    groups = ssul_losses.trainable_heads(head, 1)
    assert [(m is e, f) for (m, f), e in zip(groups, [head.head[3], head.head[0], head.head[1]])] == [
        (True, 1.0), (True, 1.0), (True, 1e-4)]
    plain = SSULHead(64, [3, 2], (6, 12, 18))
    assert [(m is plain.head[1], f) for m, f in ssul_losses.trainable_heads(plain, 1, unknown=False)] == [(True, 1.0)]
    with pytest.raises(ValueError):
        ssul_losses.trainable_heads(head, 0)


# ---------------------------------------------------------------- pseudo-labels (SSUL main.py::main)

# teacher logits for 4 channels at 6 pixels (1 x 4 x 1 x 6)
OLD = torch.tensor([[[[-9.0, -9.0, -9.0, -9.0, -9.0, -9.0]],
                     [[-9.0, -9.0, -9.0, -9.0, -9.0, 4.0]],
                     [[-9.0, 2.0, 0.5, 5.0, -9.0, -9.0]],
                     [[3.0, -9.0, -9.0, -9.0, 5.0, -9.0]]]])


def test_pseudo_labels_with_unknown():
    labels = torch.tensor([[[0, 1, 1, 255, 2, 0]]])
    # p0 unknown -> channel 3 at sigma(3)=.95; p1 background -> 2 at sigma(2)=.88; p2 sigma(.5)=.62 < .7 stays;
    # p3 ignored; p4 a current class stays; p5 teacher says background (1 = fg_idx, not > fg_idx): stays 0
    out = ssul_losses.ssul_pseudo_labels(OLD, labels, 0.7, fg_idx=1)
    assert out.tolist() == [[[3, 2, 1, 255, 2, 0]]]


def test_pseudo_labels_without_unknown():
    labels = torch.tensor([[[0, 1, 1, 255, 2, 0]]])
    # fg_idx 0: label 1 is a class (kept); p5's teacher class 1 > 0 now relabels the background pixel
    out = ssul_losses.ssul_pseudo_labels(OLD, labels, 0.7, fg_idx=0)
    assert out.tolist() == [[[3, 1, 1, 255, 2, 1]]]
    assert ssul_losses.fg_index(True) == 1 and ssul_losses.fg_index(False) == 0


# ---------------------------------------------------------------- prediction (SSUL main.py::main, network/utils.py)

def test_predict_unknown_merge_changes_the_argmax():
    probs = [(0.6, 0.3, 0.7, 0.1), (0.1, 0.2, 0.25, 0.8), (0.5, 0.1, 0.55, 0.2)]  # (unknown, bg, c1, c2)
    logits = torch.tensor([[[[logit(p[c]) for p in probs]] for c in range(4)]])  # (1, 4, 1, 3)
    merged = []
    for unk, bg, c1, c2 in probs:
        scores = [bg + unk, c1, c2]
        merged.append(scores.index(max(scores)))
    assert merged == [0, 2, 0]
    assert ssul_losses.ssul_predict(logits, (1, 3)).tolist() == [[merged]]
    # without the unknown channel the same logits are four plain classes: class 2 wins pixels 0 and 2
    assert ssul_losses.ssul_predict(logits, (1, 3), unknown=False).tolist() == [[[2, 3, 2]]]


def test_predict_upsamples_logits_before_the_sigmoid():
    # channels (unknown, bg, c1) at 2 feature pixels, upsampled to 4 pixels
    v = [(-20.0, -1.2, 20.0), (-20.0, -1.2, -20.0)]
    logits = torch.tensor([[[[v[0][c], v[1][c]]] for c in range(3)]])  # (1, 3, 1, 2)
    weights = [(1.0, 0.0), (0.75, 0.25), (0.25, 0.75), (0.0, 1.0)]  # bilinear, align_corners False, 2 -> 4
    expected, probs_first = [], []
    for a, b in weights:
        z = [a * v[0][c] + b * v[1][c] for c in range(3)]
        s = [sigmoid(x) for x in z]
        scores = [s[1] + s[0], s[2]]
        expected.append(scores.index(max(scores)))
        p = [a * sigmoid(v[0][c]) + b * sigmoid(v[1][c]) for c in range(3)]
        scores = [p[1] + p[0], p[2]]
        probs_first.append(scores.index(max(scores)))
    assert expected != probs_first  # the inputs tell the two orders apart
    assert ssul_losses.ssul_predict(logits, (1, 4)).tolist() == [[expected]]


# ---------------------------------------------------------------- loss

def test_ssul_loss_on_pseudo_labels():
    logits = torch.tensor([[[[0.5, -1.0]], [[2.0, 0.0]], [[-0.3, 1.5]]]])  # (1, 3, 1, 2)
    old = torch.tensor([[[[-5.0, -5.0]], [[-5.0, -5.0]], [[3.0, -5.0]]]])
    labels = torch.tensor([[[0, 255]]])
    terms, targets = ssul_losses.ssul_loss(logits, labels, old, fg_idx=1)
    assert targets.tolist() == [[[2, 255]]]  # unknown pixel relabelled to channel 2, ignore kept
    expected = softplus(0.5) + softplus(2.0) + (softplus(-0.3) + 0.3)  # BCE over all channels, target channel 2
    assert terms["total"].item() == pytest.approx(expected, rel=1e-6)
    terms, targets = ssul_losses.ssul_loss(logits, labels)
    assert targets is labels
    assert terms["std"].item() == pytest.approx(softplus(0.5) - 0.5 + softplus(2.0) + softplus(-0.3), rel=1e-6)


class FakeTeacher:
    """Returns fixed logits (any batch) as a model's ``(logits, features)``."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, images):
        return self.logits, {}


def test_memory_candidates_shift_and_pseudo_label():
    labels = torch.tensor([[[0, 2], [255, 0]], [[0, 0], [0, 0]]])
    saliency = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]], dtype=torch.uint8)
    batch = Batch(torch.zeros(2, 3, 2, 2), labels, extras={"saliency": saliency}, ids=("x", "y"))
    # t = 1: no teacher, the classes of the labels (background, unknown and 255 dropped)
    assert ssul_losses.memory_candidates([batch]) == [["x", [2]], ["y", []]]
    # t > 1: channels (unknown, bg, c1, c2); image x: pixel (1, 1) -> c1 at σ(2) = 0.88; image y: pixel (0, 0)
    # c1 = c2 = 2: σ 0.88 passes 0.7 (argmax = c1) but the softmax (0.44) does not
    logits = torch.full((2, 4, 2, 2), -6.0)
    logits[0, 2, 1, 1] = 2.0
    logits[1, 2, 0, 0] = logits[1, 3, 0, 0] = 2.0
    logits[1, :2, 0, 0] = 0.0
    teacher = FakeTeacher(logits)
    assert ssul_losses.memory_candidates([batch], teacher) == [["x", [1, 2]], ["y", [1]]]
    assert ssul_losses.memory_candidates([batch], teacher, loss_type="focal_loss") == [["x", [1, 2]], ["y", [1]]]
    assert ssul_losses.memory_candidates([batch], teacher, loss_type="ce_loss")[1] == ["y", []]  # softmax: 0.44 < 0.7
    # without the unknown class the labels are used as they are (fg_idx 0)
    plain = FakeTeacher(logits[:, 1:])
    assert ssul_losses.memory_candidates([batch], plain, unknown=False) == [["x", [1, 2]], ["y", [1]]]
