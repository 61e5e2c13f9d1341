"""methods/ssul.py: the SSUL method's schedule and hooks (SSUL main.py::main): parameter groups, freezing,
weight transfer, labels of memory samples, loss, validation policy, saliency maps, memory state."""
import json
import types

import pytest
import torch
from torch import nn

from methods import get_method, ssul
from methods.base import Batch, MemoryUse, ModelSpec, StepContext
from methods.memory import Memory
from network.heads import SSULHead
from tests.helpers import ids, softplus
from utils.errors import UserError


def test_validation_interval_and_iterations():
    assert ssul.validation_interval(50) == 100
    assert ssul.validation_interval(10_000) == 100
    assert ssul.validation_interval(19_999) == 199
    assert ssul.validation_interval(20_000) == 200
    assert ssul.total_iterations(50, 100, 32) == 150
    voc, ade = ssul.SSUL_PUBLISHED["voc"].for_step("15-1", 1), ssul.SSUL_PUBLISHED["ade"].for_step("100-10", 1)
    assert voc["global_batch"] == 32 and ade["lr"] == 0.05 and ade["lr_policy"] == "warm_poly"  # SSUL README


# ------------------------------------- the method class (SSUL main.py::main, utils/memory.py::memory_sampling_balanced)

STEPS = ((0, 1, 2), (3,), (4,))  # VOC 2-1, steps 0-2
SPEC = ModelSpec("deeplabv3", "resnet18")


def ssul_model(method, step, seed=0):
    torch.manual_seed(seed)
    return method.build_network(SPEC, [len(s) for s in STEPS[:step + 1]])


@pytest.mark.slow  # ~1 s: builds four SSUL ResNet-18 models
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
    assert get_method("ssul", memory_labels_unshifted=False).targets(batch).tolist() == [shifted, shifted]  # fixed
    reference = get_method("ssul").targets(batch)  # published
    # SSUL shifted only its train split (SSUL datasets/voc.py::__getitem__); the fix shifts memory too
    assert reference.tolist() == [shifted, [[0, 1], [2, 255]]]  # SSUL: memory class k on channel k
    # ADE (no saliency): every background pixel is unknown; without the unknown class nothing changes
    ade = Batch(torch.zeros(2, 3, 2, 2), labels, memory=is_memory)
    fixed = get_method("ssul", dataset="ade", memory_labels_unshifted=False)
    assert fixed.targets(ade).tolist() == [[[0, 2], [3, 255]]] * 2
    assert get_method("ssul", dataset="ade").targets(ade).tolist() == [[[0, 2], [3, 255]], [[0, 1], [2, 255]]]
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
