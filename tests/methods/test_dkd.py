"""methods/dkd.py: the DKD method (DKD train_voc.py, utils/memory.py::memory_sampling_balanced): reference
constants, defaults and flags, label tables, parameter groups, frozen BN, schedules, the loss hook, prediction,
validation, the DKD-M memory and reference checkpoints."""
import collections
import json

import numpy as np
import pytest
import torch

from engine.cli import parse_args
from engine.models import model_state
from methods import dkd, get_method
from methods.base import Batch, MemoryUse, StepContext
from network.dkd import build_dkd_model, reference_checkpoint_state
from tests.helpers import dkd_bce as bce, ids, sigmoid
from utils.errors import UserError
from utils.schedulers import build_scheduler
from utils.tasks import get_task


def test_reference_constants():
    assert (dkd.W_MBCE, dkd.W_KD, dkd.W_DKD_POS, dkd.W_DKD_NEG, dkd.W_AC) == (1, 5, 5, 5, 1)
    assert [dkd.default_pos_weight("voc", s) for s in (0, 1, 2)] == [2, 1, 1]
    assert [dkd.default_pos_weight("ade", s) for s in (0, 1)] == [35, 35]
    assert [dkd.backbone_lr("voc", s) for s in (0, 3)] == [1e-3, 1e-4]
    assert [dkd.backbone_lr("ade", s) for s in (0, 1)] == [2.5e-3, 2.5e-4]
    assert dkd.HEAD_LR_FACTOR == 10 and dkd.WARMUP_FRACTION["ade"] == 0.2
    assert dkd.MEMORY_SIZE == {"voc": 100, "ade": 300} and dkd.MEMORY_PSEUDO_THRESHOLD == 0.9


# --------------------------------------- the method class (DKD train_voc.py, utils/memory.py::memory_sampling_balanced)


VOC_15_1 = tuple(tuple(s) for s in get_task("voc", "15-1"))
ADE_100_50 = tuple(tuple(s) for s in get_task("ade", "100-50"))


def test_method_registry_defaults_and_flags():
    voc, ade = get_method("dkd"), get_method("dkd", dataset="ade")
    assert (voc.hp.pos_weight_base, voc.hp.pos_weight, ade.hp.pos_weight_base, ade.hp.pos_weight) == (2, 1, 35, 35)
    assert (voc.hp.w_mbce, voc.hp.w_kd, voc.hp.w_dkd_pos, voc.hp.w_dkd_neg, voc.hp.w_ac) == (1, 5, 5, 5, 1)
    assert voc.hp.head_lr_factor == 10 and voc.hp.mem_size == 0 and voc.hp.mem_pseudo_thresh == 0.9
    assert (voc.model_families, voc.test_split) == (("dkd",), "test_seen")
    args = parse_args(["--data_root", "x", "--method", "dkd", "--dataset", "ade", "--mem_size", "300",
                       "--pos_weight", "3"])
    assert (args.mem_size, args.pos_weight, args.pos_weight_base) == (300, 3.0, 35.0)


def test_label_tables_voc():
    method = get_method("dkd")
    lut = method.label_policy(VOC_15_1, 1, "train")
    assert lut[16] == 16 and lut[255] == 255 and lut[0] == 0
    assert all(lut[c] == 0 for c in list(range(1, 16)) + list(range(17, 21)))  # old and future → background
    assert np.array_equal(method.label_policy(VOC_15_1, 1, "val"), lut)  # VOC val: masking value 0 as well
    assert np.array_equal(method.label_policy(VOC_15_1, 1, "memory"), lut)  # memory labels masked like current data
    test = method.label_policy(VOC_15_1, 1, "test")
    assert [int(test[c]) for c in range(21)] == list(range(17)) + [0, 0, 0, 0]  # VOC future → 0
    assert test[255] == 255
    step0 = method.label_policy(VOC_15_1, 0, "train")
    assert [int(step0[c]) for c in range(21)] == list(range(16)) + [0] * 5


def test_label_tables_ade():
    method = get_method("dkd", dataset="ade")
    train = method.label_policy(ADE_100_50, 1, "train")
    assert [int(train[c]) for c in (0, 1, 100, 101, 150)] == [0, 0, 0, 101, 150]
    val = method.label_policy(ADE_100_50, 1, "val")
    assert [int(val[c]) for c in (0, 1, 100, 101, 150)] == [0, 255, 255, 101, 150]  # ADE: old → 255, ADE 0 kept
    test0 = method.label_policy(ADE_100_50, 0, "test")
    assert [int(test0[c]) for c in (0, 1, 100, 101, 150)] == [0, 1, 100, 255, 255]  # ADE future → 255
    test1 = method.label_policy(ADE_100_50, 1, "test")
    assert [int(test1[c]) for c in range(151)] == list(range(151))


def test_label_tables_follow_a_shuffled_order():
    steps = tuple(tuple(s) for s in get_task("voc", "15-1_b"))  # step 0: 0, 12, 9, 20, ...; step 1: [17]
    method = get_method("dkd")
    train = method.label_policy(steps, 1, "train")
    assert train[17] == 16 and train[12] == 0 and train[3] == 0  # position 16 of the concatenated order
    test = method.label_policy(steps, 1, "test")
    assert (test[12], test[9], test[20], test[11], test[17], test[3]) == (1, 2, 3, 15, 16, 0)


def model_for(classes_per_step, seed=0):
    torch.manual_seed(seed)
    return build_dkd_model(classes_per_step, backbone="resnet18")


def test_parameter_groups_and_weight_decay_step_0():
    method, model = get_method("dkd"), model_for([16])
    ctx = StepContext("voc", VOC_15_1, 0)
    method.configure(model, ctx)
    groups = method.param_groups(model, ctx, lr=1e-3)
    head = model.classifier
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-2), pytest.approx(1e-2)]
    assert all("weight_decay" not in g for g in groups)  # the trainer's --weight_decay (1e-4) everywhere
    assert ids(groups[0]["params"]) == ids(model.backbone.parameters())  # BN parameters included at step 0
    assert ids(groups[1]["params"]) == ids(list(head.aspp.parameters()) + list(head.last_conv.parameters()))
    assert ids(groups[2]["params"]) == ids(head.cls.parameters())
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_parameter_groups_weight_decay_and_frozen_bn_at_t1():
    method, model = get_method("dkd"), model_for([16, 1])
    ctx = StepContext("voc", VOC_15_1, 1)
    method.configure(model, ctx)
    groups = method.param_groups(model, ctx, lr=1e-4)
    head = model.classifier

    def conv_params(module):
        return [p for m in module.modules() if isinstance(m, torch.nn.Conv2d) for p in m.parameters()]

    assert [g["lr"] for g in groups] == [1e-4, pytest.approx(1e-3), pytest.approx(1e-3), pytest.approx(1e-3)]
    assert [g.get("weight_decay") for g in groups] == [0.0, 0.0, 0.0, None]  # only the new classifier decays
    assert ids(groups[0]["params"]) == ids(conv_params(model.backbone))  # BN parameters out of the optimizer
    assert ids(groups[1]["params"]) == ids(conv_params(head.aspp) + conv_params(head.last_conv))
    assert ids(groups[2]["params"]) == ids(list(head.cls[0].parameters()) + list(head.cls[1].parameters()))
    assert ids(groups[3]["params"]) == ids(head.cls[2].parameters())
    bn = [p for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()]
    assert bn and not any(p.requires_grad for p in bn)
    assert sum(len(g["params"]) for g in groups) + len(bn) == len(list(model.parameters()))


def test_train_mode_freezes_bn_and_dropout_at_t1_only():
    method = get_method("dkd")
    for step, frozen in ((0, False), (1, True)):
        model = model_for([16] + [1] * step)
        ctx = StepContext("voc", VOC_15_1, step)
        method.configure(model, ctx)
        method.set_train_mode(model, ctx)
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        assert bns and drops
        assert all(m.training != frozen and m.weight.requires_grad != frozen for m in bns)
        assert all(m.training != frozen for m in drops)
        assert model.classifier.cls[0].training  # the rest stays in training mode
    assert method.bn_frozen(StepContext("voc", VOC_15_1, 1)) and not method.bn_frozen(StepContext("voc", VOC_15_1, 0))


def test_prepare_student_copies_the_aux_classifier_only_when_w_ac_is_positive():
    ctx = StepContext("voc", VOC_15_1, 1)
    model = model_for([16, 1], seed=3)
    get_method("dkd").prepare_student(model, None, ctx)
    head = model.classifier
    assert torch.equal(head.cls[2].weight, head.cls[0].weight) and torch.equal(head.cls[2].bias, head.cls[0].bias)
    model = model_for([16, 1], seed=3)
    before = model.classifier.cls[2].weight.clone()
    get_method("dkd", w_ac=0.0).prepare_student(model, None, ctx)  # DKD: random init when ac = 0
    assert torch.equal(model.classifier.cls[2].weight, before)


def scheduled_lrs(method, ctx, policy, total):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_scheduler(policy, optimizer, total, **method.schedule_options(ctx))
    seen = [optimizer.param_groups[0]["lr"]]
    for _ in range(total):
        optimizer.step()
        scheduler.step()
        seen.append(optimizer.param_groups[0]["lr"])
    return seen


def test_schedules_voc_poly_without_floor_and_ade_unrounded_warmup():
    ctx = StepContext("voc", VOC_15_1, 1)
    seen = scheduled_lrs(get_method("dkd"), ctx, "poly", 7)
    assert seen == [pytest.approx((1 - i / 7) ** 0.9, rel=1e-12, abs=0) for i in range(8)]
    assert seen[-1] == 0.0  # DKD's PolyLR has no 1e-6 floor
    seen = scheduled_lrs(get_method("dkd", dataset="ade"), StepContext("ade", ADE_100_50, 1), "warm_poly", 7)
    warm = 0.2 * 7  # 1.4 warm-up iterations: not rounded down to 1 (DKD's WarmupPolyLR)
    expected = [(0.001 * (1 - i / warm) + i / warm if i < warm else 1.0) * (1 - i / 7) ** 0.9 for i in range(8)]
    assert seen == [pytest.approx(e, rel=1e-12, abs=0) for e in expected]
    assert seen[1] == pytest.approx((0.001 * (1 - 1 / 1.4) + 1 / 1.4) * (6 / 7) ** 0.9)


def test_loss_hook_uses_the_step_and_dataset_pos_weight():
    # one pixel row of 2 positions; logits constant over the 1x1 feature map (upsampling keeps them)
    logits = torch.tensor([[[[0.4]], [[-0.3]], [[1.1]]]])  # (1, 3, 1, 1): aux, class 1, class 2
    labels = torch.tensor([[[1, 255]]])
    steps = ((0, 1, 2), (3,))
    for dataset, pw in (("voc", 2.0), ("ade", 35.0)):
        terms = get_method("dkd", dataset=dataset).loss((logits, {}), None, Batch(None, labels),
                                                        StepContext(dataset, steps, 0))
        mbce = (bce(-0.3, 1, pw) + bce(-0.3, 0, pw)) / 2 + (bce(1.1, 0, pw) + bce(1.1, 0, pw)) / 2
        assert set(terms) == {"total", "mbce", "ac"}
        assert terms["mbce"].item() == pytest.approx(mbce, rel=1e-6)
        assert terms["total"].item() == pytest.approx(mbce + bce(0.4, 0), rel=1e-6)
    # step 1 (VOC: pos_weight 1): classes 1, 2 old, 3 new; custom KD weight
    logits = torch.tensor([[[[0.4]], [[-0.3]], [[1.1]], [[0.7]]]])
    parts = {k: torch.randn(1, 3, 1, 1) for k in ("pos_logits", "neg_logits")}
    old = (torch.tensor([[[[0.0]], [[0.5]], [[-2.0]]]]), {k: torch.randn(1, 2, 1, 1) for k in parts})
    labels = torch.tensor([[[3, 0]]])
    terms = get_method("dkd", w_kd=2.0).loss((logits, parts), old, Batch(None, labels),
                                             StepContext("voc", steps, 1))
    assert set(terms) == {"total", "mbce", "ac", "kd", "dkd_pos", "dkd_neg"}
    assert terms["mbce"].item() == pytest.approx((bce(0.7, 1) + bce(0.7, 0)) / 2, rel=1e-6)
    kd = bce(-0.3, sigmoid(0.5)) + bce(1.1, sigmoid(-2.0))
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-6)
    total = terms["mbce"] + 2 * terms["kd"] + 5 * terms["dkd_pos"] + 5 * terms["dkd_neg"] + terms["ac"]
    assert terms["total"].item() == pytest.approx(total.item(), rel=1e-6)


def test_method_prediction_and_evaluation_convention():
    logits = torch.tensor([[[[9.0, 9.0]], [[-1.0, 3.0]], [[0.5, 1.0]]]])  # aux, class 1, class 2 at 2 pixels
    assert get_method("dkd").predict(logits, (1, 2)).tolist() == [[[2, 1]]]
    assert get_method("dkd").eval_convention()["exclude_absent"] is False
    assert get_method("dkd", dataset="ade").eval_convention()["future_classes"] == "ignored"


def test_validation_cadence_and_selection():
    method = get_method("dkd")
    # after every epoch (validation_period -1: epoch % -1 == 0), for the logs only
    assert [i for i in range(1, 51) if method.validation_due(i, 5, 50, None)] == list(range(5, 51, 5))
    assert [i for i in range(1, 51) if method.validation_due(i, 5, 50, 3)] == [15, 30, 45]
    assert not any(method.validation_due(i, 5, 50, 0) for i in range(1, 51))
    assert not method.selects_best(StepContext("voc", VOC_15_1, 1), None)
    assert method.selects_best(StepContext("voc", VOC_15_1, 1), True)


class FakeStepData:
    """What ``DKD.before_step`` uses of :class:`engine.passes.StepData`, over hand-made batches."""

    seed = 5

    def __init__(self, batches, fresh_labeller=None):
        self._batches, self.calls, self.fresh, self.fresh_labeller = batches, [], [], fresh_labeller

    def previous_samples(self):
        return ["previous"]

    def batches(self, samples, split="train", step=None, transform="eval", shard=False, batch_size=None):
        self.calls.append((samples, split, step, transform))
        return iter(self._batches)

    def broadcast(self, obj):
        return obj

    def fresh_model(self, classes_per_step):
        self.fresh.append(list(classes_per_step))
        return self.fresh_labeller


class ConstantTeacher(torch.nn.Module):
    """Logits constant in space: ``table[i]`` for image ``i`` of every batch."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, images):
        return self.table[:images.shape[0], :, None, None].expand(-1, -1, 2, 2), {}


def single_class_batches(n_per_class, classes, size=2):
    """Batches of 2 images, each image labelled with one class on one pixel (its id: ``img<class>_<k>``)."""
    records = [(f"img{c}_{k}", c) for k in range(n_per_class) for c in classes]
    batches = []
    for start in range(0, len(records), 2):
        chunk = records[start:start + 2]
        labels = torch.zeros(len(chunk), size, size, dtype=torch.long)
        for i, (_, c) in enumerate(chunk):
            labels[i, 0, 0] = c
        batches.append(Batch(torch.zeros(len(chunk), 3, size, size), labels, ids=tuple(r[0] for r in chunk)))
    return batches


def memory_ids(method):
    """The image ids of the memory the method gives the trainer (its ``memory`` hook)."""
    memory = method.memory(None)
    return list(memory.ids) if memory is not None else []


def test_memory_is_class_balanced_and_terminates():
    steps = ((0, 1, 2, 3), (4,), (5,))
    ctx = StepContext("voc", steps, 1)
    data = FakeStepData(single_class_batches(5, (1, 2, 3)) + [
        Batch(torch.zeros(1, 3, 2, 2), torch.tensor([[[0, 255], [0, 0]]]), ids=("nothing",))])
    method = get_method("dkd", mem_size=6)
    method.before_step(None, None, data, ctx)
    assert data.calls == [(["previous"], "train", 0, "train")]  # step t-1's masked labels, augmented crops
    chosen = memory_ids(method)
    assert method.memory(ctx) == MemoryUse(tuple(chosen), mode="concat", label_split="train")  # joins the set
    assert len(chosen) == 6 and chosen == sorted(chosen)
    counts = collections.Counter(name.split("_")[0] for name in chosen)
    assert counts == {"img1": 2, "img2": 2, "img3": 2}  # round-robin over the old classes
    again = get_method("dkd", mem_size=6)
    again.before_step(None, None, FakeStepData(data._batches), ctx)
    assert memory_ids(again) == chosen  # reproducible for a seed
    big = get_method("dkd", mem_size=100)
    big.before_step(None, None, FakeStepData(data._batches), ctx)  # more than the candidates: stops
    assert len(memory_ids(big)) == 15 and "nothing" not in memory_ids(big)
    assert get_method("dkd").memory(ctx) is None and not get_method("dkd").step_files()  # DKD: no memory


def test_memory_at_t2_starts_from_the_previous_memory_and_uses_teacher_pseudo_labels():
    steps = ((0, 1, 2), (3,), (4,))
    method = get_method("dkd", mem_size=10, memory_from_trained_model=True)  # the fix: the trained step-1 model
    previous = {"step": 1, "memories": {"step_1": {"memory_list": ["a", "b"],
                                                  "memory_candidates": [["a", [1]], ["b", [2]]]}}}
    method.load_previous_state(previous, StepContext("voc", steps, 2))
    assert memory_ids(method) == []  # step 2's memory is chosen by before_step
    labels = torch.tensor([[[0, 0], [0, 0]], [[3, 0], [0, 255]], [[0, 0], [0, 0]]])
    batch = Batch(torch.zeros(3, 3, 2, 2), labels, ids=("c", "d", "e"))
    # teacher (step 1 model, K_old = 4): image c → class 2 at σ(4) ≥ 0.9; d → class 1 on its background;
    # e → nothing above 0.9
    table = torch.tensor([[0.0, -4.0, 4.0, -4.0], [0.0, 5.0, -4.0, -4.0], [0.0, 1.0, 2.0, 0.0]])
    method.before_step(None, ConstantTeacher(table), FakeStepData([batch]), StepContext("voc", steps, 2))
    state = method.state_dict()["memories"]["step_2"]
    assert state["memory_list"] == ["a", "b", "c", "d"]  # e has no old class: never chosen, no endless loop
    records = dict((name, classes) for name, classes in state["memory_candidates"])
    assert records == {"a": [1], "b": [2], "c": [2], "d": [1, 3]}
    assert method.step_files()["memory.json"].keys() == {"step_1", "step_2"}  # DKD's file keeps every step


def test_memory_state_round_trip():
    steps = ((0, 1, 2, 3), (4,))
    method = get_method("dkd", mem_size=4)
    method.before_step(None, None, FakeStepData(single_class_batches(3, (1, 2, 3))), StepContext("voc", steps, 1))
    state = method.state_dict()
    restored = get_method("dkd", mem_size=4)
    restored.load_state_dict(json.loads(json.dumps(state)))  # JSON-safe
    assert memory_ids(restored) == memory_ids(method) and len(memory_ids(method)) == 4
    assert restored.step_files() == method.step_files()
    assert method.step_files()["memory.json"]["step_1"]["memory_list"] == memory_ids(method)


def test_reference_checkpoint_state_loads_a_dkd_checkpoint():
    model = build_dkd_model([4, 1], backbone="resnet18")
    ours = model.state_dict()
    reference = {k.replace("classifier.last_conv.", "aspp.last_conv.").replace("classifier.", ""): v
                 for k, v in ours.items()}
    checkpoint = {"arch": "DeepLabV3", "epoch": 60, "state_dict": reference, "monitor_best": 0}
    model.load_state_dict(model_state(checkpoint), strict=True)
    ciss = {"model_state": {"module." + k: v for k, v in ours.items()}, "classes": [[0, 1, 2, 3], [4]]}
    assert model_state(ciss).keys() == ours.keys()  # ciss checkpoints pass through
    assert reference_checkpoint_state(reference).keys() == ours.keys()  # a bare state dict works too
    with pytest.raises(UserError):
        reference_checkpoint_state([1, 2])


def test_published_memory_at_t2_is_labelled_by_a_fresh_step_t_minus_1_network():
    """DKD train_voc.py::main_worker picks the memory before the old model receives its weights: the labeller is a
    fresh network of step t-1's layout, not the teacher."""
    steps = ((0, 1, 2), (3,), (4,))
    labels = torch.tensor([[[0, 0], [0, 0]], [[0, 0], [0, 0]]])
    batch = Batch(torch.zeros(2, 3, 2, 2), labels, ids=("c", "d"))
    # the teacher would label c with class 2; the fresh network labels d with class 1 and nothing on c
    teacher = ConstantTeacher(torch.tensor([[0.0, -4.0, 4.0, -4.0], [0.0, -4.0, -4.0, -4.0]]))
    fresh = ConstantTeacher(torch.tensor([[0.0, -4.0, -4.0, -4.0], [0.0, 5.0, -4.0, -4.0]]))
    data = FakeStepData([batch], fresh_labeller=fresh)
    method = get_method("dkd", mem_size=10)
    method.load_previous_state({"step": 1, "memories": {}}, StepContext("voc", steps, 2))
    method.before_step(None, teacher, data, StepContext("voc", steps, 2))
    assert data.fresh == [[3, 1]]  # step 1's layout: classes per step
    assert method.state_dict()["memories"]["step_2"]["memory_list"] == ["d"]
