"""SSUL's numerics on hand-made inputs (SSUL datasets/voc.py::__getitem__, main.py::main) and the SSUL method's
hooks (parameter groups, freezing, weight transfer, labels of memory samples, loss, validation policy, saliency
maps, memory state and candidates)."""
import json
import math
import types

import pytest
import torch
from torch import nn

from methods import get_method, ssul, ssul_losses
from methods.base import Batch, MemoryUse, ModelSpec, StepContext
from methods.memory import Memory
from network.heads import SSULHead
from utils.errors import UserError


def logit(p):
    return math.log(p / (1 - p))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


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


# ---------------------------------------------------------------- loss, schedule

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


def test_validation_interval_and_iterations():
    assert ssul.validation_interval(50) == 100
    assert ssul.validation_interval(10_000) == 100
    assert ssul.validation_interval(19_999) == 199
    assert ssul.validation_interval(20_000) == 200
    assert ssul.total_iterations(50, 100, 32) == 150
    assert ssul.SSUL_PUBLISHED["voc"].batch_size == 32 and ssul.SSUL_PUBLISHED["ade"].lr == 0.05


# ------------------------------------- the method class (SSUL main.py::main, utils/memory.py::memory_sampling_balanced)

STEPS = ((0, 1, 2), (3,), (4,))  # VOC 2-1, steps 0-2
SPEC = ModelSpec("deeplabv3", "resnet18")


def ssul_model(method, step, seed=0):
    torch.manual_seed(seed)
    return method.build_network(SPEC, [len(s) for s in STEPS[:step + 1]])


def ids(params):
    return {id(p) for p in params}


def test_method_model_groups_and_freezing():
    method = get_method("ssul")
    model = ssul_model(method, 0)
    assert model.classifier.head_channels == [1, 1, 2]  # unknown, background, classes 1-2
    ctx0 = StepContext("voc", STEPS, 0)
    method.configure(model, ctx0)
    groups = method.param_groups(model, ctx0, lr=0.5)
    assert [g["lr"] for g in groups] == [0.001, 0.01]  # --lr unused at step 0
    assert ids(groups[0]["params"]) == ids(model.backbone.parameters())
    assert ids(groups[1]["params"]) == ids(model.classifier.parameters())
    assert all(p.requires_grad for p in model.parameters())

    model = ssul_model(method, 2)
    ctx = StepContext("voc", STEPS, 2)
    method.configure(model, ctx)
    head = model.classifier.head
    groups = method.param_groups(model, ctx, lr=0.5)
    assert [g["lr"] for g in groups] == [0.5, 0.5, 0.5 * 1e-4]  # new, unknown, background
    for group, entry in zip(groups, (head[4], head[0], head[1])):
        assert ids(group["params"]) == ids(entry.parameters())
    # only the conv weights and biases of those three entries train: BN affine frozen (--bn_freeze) too
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"classifier.head.{i}.{k}" for i in (0, 1, 4) for k in ("0.weight", "3.weight", "3.bias")}
    method.set_train_mode(model, ctx)
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    # dropout stays active (SSUL main.py::main)
    assert all(m.training for m in model.modules() if isinstance(m, nn.Dropout))

    loose = get_method("ssul", freeze=False, bn_freeze=False, unknown=False)
    model = ssul_model(loose, 1)
    assert model.classifier.head_channels == [3, 1]
    ctx1 = StepContext("voc", STEPS, 1)
    loose.configure(model, ctx1)
    assert [g["lr"] for g in loose.param_groups(model, ctx1, 0.5)] == [0.001, 0.01]  # full fine-tuning
    assert all(p.requires_grad for p in model.parameters())
    frozen_plain = get_method("ssul", unknown=False)
    model = ssul_model(frozen_plain, 1)
    frozen_plain.configure(model, ctx1)
    assert [g["lr"] for g in frozen_plain.param_groups(model, ctx1, 0.5)] == [0.5]  # new head only


def test_method_weight_transfer_only_with_unknown_and_w_transfer():
    def head_at(unknown):
        torch.manual_seed(1)
        return SSULHead(64, [3, 1], (6, 12, 18), unknown=unknown)

    for overrides, copied in (({}, True), ({"w_transfer": False}, False)):
        head = head_at(True)
        with torch.no_grad():
            head.head[0][3].bias.fill_(-3.0)
        get_method("ssul", **overrides).prepare_student(types.SimpleNamespace(classifier=head), None,
                                                        StepContext("voc", STEPS, 1))
        assert (head.head[3][3].bias.item() == -3.0) is copied
    head = head_at(False)
    before = head.head[1][3].bias.clone()
    get_method("ssul", unknown=False).prepare_student(types.SimpleNamespace(classifier=head), None,
                                                      StepContext("voc", STEPS, 1))
    assert torch.equal(head.head[1][3].bias, before)  # no unknown head: nothing to transfer (as SSUL)


def test_training_labels_of_memory_samples():
    labels = torch.tensor([[[0, 1], [2, 255]], [[0, 1], [2, 255]]])
    saliency = torch.tensor([[[1, 0], [0, 0]], [[1, 0], [0, 0]]], dtype=torch.uint8)
    is_memory = torch.tensor([False, True])
    shifted = [[0, 2], [3, 255]]  # background with saliency > 0 -> unknown 0, class k -> k + 1
    batch = Batch(torch.zeros(2, 3, 2, 2), labels, extras={"saliency": saliency}, memory=is_memory)
    assert get_method("ssul").targets(batch).tolist() == [shifted, shifted]  # fixed: memory shifted too
    reference = get_method("ssul", memory_labels_unshifted=True).targets(batch)
    # SSUL shifted only its train split (SSUL datasets/voc.py::__getitem__; ciss shifts memory: docs/differences.md)
    assert reference.tolist() == [shifted, [[0, 1], [2, 255]]]  # SSUL: memory class k on channel k
    # ADE (no saliency): every background pixel is unknown; without the unknown class nothing changes
    ade = Batch(torch.zeros(2, 3, 2, 2), labels, memory=is_memory)
    assert get_method("ssul", dataset="ade").targets(ade).tolist() == [[[0, 2], [3, 255]]] * 2
    assert get_method("ssul", unknown=False).targets(batch) is labels


def test_method_loss_shifts_then_pseudo_labels():
    # task ((0, 1), (2,)) at step 1: teacher channels (unknown, bg, c1), student (unknown, bg, c1, c2)
    method = get_method("ssul")
    ctx = StepContext("voc", ((0, 1), (2,)), 1)
    labels = torch.tensor([[[0, 2]]])  # background (salient), class 2
    saliency = torch.tensor([[[5, 0]]], dtype=torch.uint8)
    teacher = torch.tensor([[[[-4.0, -4.0]], [[-4.0, -4.0]], [[2.0, 3.0]]]])  # c1 at σ(2) = 0.88, σ(3) = 0.95
    student = torch.tensor([[[[0.3, -0.2]], [[-1.0, 0.5]], [[1.5, 0.0]], [[0.1, 2.0]]]])
    batch = Batch(torch.zeros(1, 3, 1, 2), labels, extras={"saliency": saliency}, memory=torch.tensor([False]))
    terms = method.loss((student, {}), (teacher, {}), batch, ctx)
    # shifted: [unknown 0, class 2 -> 3]; pixel 0 pseudo-labelled c1 (channel 2); pixel 1 keeps its label 3
    z = student[0, :, 0, :].tolist()
    targets = [2, 3]
    expected = sum(softplus(z[c][p]) - (z[c][p] if c == targets[p] else 0.0) for p in range(2) for c in range(4)) / 2
    assert terms["total"].item() == pytest.approx(expected, rel=1e-6)
    no_pseudo = get_method("ssul", pseudo=False)
    assert not no_pseudo.needs_teacher(ctx)
    targets = [0, 3]
    expected = sum(softplus(z[c][p]) - (z[c][p] if c == targets[p] else 0.0) for p in range(2) for c in range(4)) / 2
    assert no_pseudo.loss((student, {}), None, batch, ctx)["total"].item() == pytest.approx(expected, rel=1e-6)


def test_validation_cadence_and_best_selection():
    method = get_method("ssul")
    due = [i for i in range(1, 251) if method.validation_due(i, 7, 250, None)]
    assert due == [100, 200]  # max(100, 250 // 100)
    assert [i for i in range(1, 60_001) if method.validation_due(i, 7, 60_000, None)][:2] == [600, 1200]
    assert [i for i in range(1, 22) if method.validation_due(i, 7, 21, 1)] == [7, 14, 21]  # --val_interval 1
    assert [i for i in range(1, 22) if method.validation_due(i, 7, 21, 0)] == []
    ctx = StepContext("voc", STEPS, 2)
    assert method.selects_best(ctx, None) and method.selects_best(ctx, True) and not method.selects_best(ctx, False)
    assert method.selects_best(StepContext("voc", STEPS, 0), None)


def test_saliency_maps_are_required_on_voc_only(tmp_path):
    ctx = StepContext("voc", STEPS, 0)
    method = get_method("ssul")
    with pytest.raises(UserError) as error:
        method.extra_maps(ctx, str(tmp_path))
    assert "\n" not in str(error.value) and str(tmp_path / "saliency_map") in str(error.value)
    (tmp_path / "saliency_map").mkdir()
    maps = method.extra_maps(ctx, str(tmp_path))
    assert list(maps) == ["saliency"] and maps["saliency"]("2007_000032") == str(
        tmp_path / "saliency_map" / "2007_000032.png")
    assert get_method("ssul", dataset="ade").extra_maps(StepContext("ade", STEPS, 0), str(tmp_path / "x")) == {}
    assert get_method("ssul", unknown=False).extra_maps(ctx, str(tmp_path / "x")) == {}


def test_memory_state_round_trip_and_memory_json():
    method = get_method("ssul", mem_size=2)
    assert method.state_dict() == {} and method.memory(None) is None and method.step_files() == {}
    method.selected = Memory(ids=["a", "b"], candidates=[["b", [2]], ["a", [1, 2]]])
    assert method.memory(None) == MemoryUse(("a", "b"), mode="replace", label_split="memory")  # half of a batch
    method.memory_step = 3
    state = json.loads(json.dumps(method.state_dict()))  # JSON-safe
    other = get_method("ssul", mem_size=2)
    other.load_state_dict(state)
    assert other.memory(None).ids == ("a", "b") and other.memory_step == 3
    assert other.step_files() == {"memory.json": {"step": 3, "memory_list": ["a", "b"],
                                                  "memory_candidates": [["b", [2]], ["a", [1, 2]]]}}
    nxt = get_method("ssul", mem_size=2)
    nxt.load_previous_state(state, StepContext("voc", STEPS, 2))
    assert nxt.previous_memory.candidates == [["b", [2]], ["a", [1, 2]]] and nxt.selected is None


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
