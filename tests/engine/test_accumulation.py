"""Gradient accumulation (``--accumulate K``, ``--micro_batch B``): where BatchNorm is frozen or absent, K
micro-batches give the same update as one batch of their concatenation (one process, and two gloo processes);
a method that reads gradients (EWC) sees the accumulated gradients once per optimizer step; the settings
resolve the micro-batch from the batch per process and refuse splits that are not even; the loader groups its
batches so that the schedule counts optimizer steps."""

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from engine.cli import parse_args
from engine.data import MicroBatchGroups
from engine.iteration import grad_scaler, train_iteration
from engine.resolve import bn_chunks_per_process, resolve_step
from methods import get_method
from methods.base import Batch, StepContext
from tests.helpers import BARM_CTX, PER_RANK, ddp_step_worker, make_setup
from utils.errors import UserError
from utils.schedulers import build_scheduler

LR = 0.01


def _step(model, student, teacher, method, ctx, batches):
    optimizer = torch.optim.SGD(method.param_groups(student, ctx, LR), lr=LR, momentum=0.9, nesterov=True,
                                weight_decay=1e-4)
    scheduler = build_scheduler("poly", optimizer, 10)
    terms, nonfinite = train_iteration(model, student, teacher, method, ctx, batches, optimizer, scheduler,
                                       grad_scaler(torch.device("cpu"), amp=False), False)
    return terms, not bool(nonfinite), scheduler


def _split(images, labels, k):
    size = images.shape[0] // k
    return [Batch(images[i * size:(i + 1) * size], labels[i * size:(i + 1) * size]) for i in range(k)]


def _assert_same_update(after, reference, before):
    changed = 0
    for key, value in reference.items():
        update = (value - before[key]).double()
        if update.abs().max() > 0:
            changed += 1
            error = ((after[key] - before[key]).double() - update).norm() / update.norm()
            assert error < 1e-4, (key, float(error))  # float32 summation order only
        assert torch.allclose(after[key], value, rtol=1e-5, atol=1e-7), key
    assert changed > 10  # the step really trained


@pytest.mark.parametrize("k", [2, 4])
def test_micro_batches_give_the_update_of_their_concatenation(k):
    # BARM's step 1 with BatchNorm frozen and dropout off; every image has the same number of labelled pixels
    method, student, teacher, images, labels = make_setup()
    before = {n: v.detach().clone() for n, v in student.state_dict().items()}
    full_terms, finite, _ = _step(student, student, teacher, method, BARM_CTX, Batch(images, labels))
    assert finite
    reference = {n: v.detach().clone() for n, v in student.state_dict().items()}

    method, student, teacher, images, labels = make_setup()
    terms, finite, scheduler = _step(student, student, teacher, method, BARM_CTX, _split(images, labels, k))
    assert finite and scheduler.last_epoch == 1  # one optimizer step, one schedule step
    _assert_same_update(student.state_dict(), reference, before)
    # the logged terms are the mean over the micro-batches: the full batch's where the denominators are equal
    assert float(terms["total"].detach()) == pytest.approx(float(full_terms["total"].detach()), rel=1e-5)


class Linear1x1(nn.Module):
    """A 1x1 convolution (no BatchNorm): the model of the EWC test."""

    def __init__(self, classes):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, x):
        return self.conv(x), {}


def test_ewc_statistics_come_from_the_accumulated_gradients_once_per_step():
    ctx = StepContext("voc", ((0, 1, 2, 3),), 0)
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(4, 3, 9, 9, generator=generator)
    labels = torch.randint(0, 4, (4, 9, 9), generator=generator)  # no ignored pixel: equal denominators

    # the expected Fisher, independently: F = (1 - a) * 1 + a * g^2, g the full batch's gradient of the mean CE
    model = Linear1x1(4)
    loss = nn.functional.cross_entropy(model(images)[0], labels)
    grads = dict(zip(("conv.weight", "conv.bias"), torch.autograd.grad(loss, [model.conv.weight, model.conv.bias])))

    results = {}
    for k in (1, 2, 4):
        method, model = get_method("ewc"), Linear1x1(4)
        method.configure(model, ctx)
        calls = []
        hook = method.after_backward
        method.after_backward = lambda *args, _hook=hook: calls.append(1) or _hook(*args)
        _step(model, model, None, method, ctx, _split(images, labels, k))
        assert len(calls) == 1  # once per optimizer step, on the accumulated gradients
        results[k] = {n: f.clone() for n, f in method.regularizer.state_dict()["fisher"].items()}
    alpha = 0.9  # MiB argparser.py: --reg_alpha 0.9
    assert method.regularizer.alpha == alpha
    for name, grad in grads.items():
        expected = (1 - alpha) * torch.ones_like(grad) + alpha * grad * grad
        for k, fisher in results.items():
            assert torch.allclose(fisher[name], expected, rtol=1e-5, atol=1e-9), (k, name)


def _accumulating_step(model, student, teacher, method, images, labels):
    """A rank's step: its images as micro-batches of one."""
    _step(model, student, teacher, method, BARM_CTX, _split(images, labels, PER_RANK))


def test_two_gloo_processes_accumulating_equal_one_process_on_the_union(tmp_path):
    # each process: its 2 images as 2 micro-batches of 1, gradients averaged over the processes once
    mp.start_processes(ddp_step_worker, args=(2, str(tmp_path / "init"), str(tmp_path), _accumulating_step),
                       nprocs=2, start_method="spawn")
    rank0, rank1 = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    method, student, teacher, images, labels = make_setup()
    before = {n: v.detach().clone() for n, v in student.state_dict().items()}
    _step(student, student, teacher, method, BARM_CTX, Batch(images, labels))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # the replicas stay identical
    _assert_same_update(rank0, student.state_dict(), before)


# ---- settings ------------------------------------------------------------------------------------------

def _resolved(*flags, world=1, step=0):
    config = parse_args(["--method", "mib", "--data_root", "/nonexistent", "--task", "15-1", *flags])
    method = get_method("mib")
    return resolve_step(config, method, step, world)


def test_accumulate_splits_the_batch_per_process_and_keeps_the_global_batch():
    plain = _resolved()  # MiB's published global batch 24 (2 GPUs x 12) on one process
    assert (plain.global_batch, plain.batch_size, plain.accumulate, plain.micro_batch) == (24, 24, 1, 24)
    split = _resolved("--accumulate", "2")
    assert (split.global_batch, split.batch_size, split.accumulate, split.micro_batch) == (24, 24, 2, 12)
    micro = _resolved("--micro_batch", "6", world=2)  # 12 per process in micro-batches of 6
    assert (micro.global_batch, micro.batch_size, micro.accumulate, micro.micro_batch) == (24, 12, 2, 6)
    assert micro.source("accumulate") == "batch 12 per process / --micro_batch 6"
    explicit = _resolved("--batch_size", "8", "--accumulate", "4")
    assert (explicit.global_batch, explicit.micro_batch) == (8, 2)


@pytest.mark.parametrize("flags, message", [
    (("--accumulate", "5"), "--accumulate 5 does not divide step 0's batch of 24 per process into equal"
                            " micro-batches: use one of 1, 2, 3, 4, 6, 8, 12, 24"),
    (("--micro_batch", "7"), "--micro_batch 7 does not divide step 0's batch of 24 per process: use one of"),
])
def test_uneven_splits_are_refused_with_the_values_that_work(flags, message):
    with pytest.raises(UserError) as error:
        _resolved(*flags)
    assert str(error.value).startswith(message)


def test_accumulate_and_micro_batch_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--data_root", "x", "--accumulate", "2", "--micro_batch", "4"])
    assert exit_info.value.code == 2


def test_bn_chunks_are_per_micro_batch():
    # SSUL's 2 DataParallel chunks of the global batch: 1 process x 2 micro-batches = one chunk per micro-batch
    ssul = ["--method", "ssul", "--data_root", "x", "--task", "15-1"]
    config = resolve_step(parse_args(ssul + ["--accumulate", "2"]), get_method("ssul"), 0, 1)
    assert (config.bn_chunks, config.accumulate) == (2, 2)
    assert bn_chunks_per_process(config, True, 1) == 1
    assert bn_chunks_per_process(resolve_step(parse_args(ssul), get_method("ssul"), 0, 1), True, 1) == 2
    odd = resolve_step(parse_args(ssul + ["--bn_chunks", "3", "--accumulate", "2"]), get_method("ssul"), 0, 1)
    with pytest.raises(UserError, match="--accumulate 2 micro-batches"):
        bn_chunks_per_process(odd, True, 1)


def test_the_loader_is_read_in_groups_of_micro_batches():
    groups = MicroBatchGroups(list(range(7)), 3)  # 7 loader batches: 2 optimizer steps, the last one dropped
    assert len(groups) == 2 and list(groups) == [[0, 1, 2], [3, 4, 5]]
    assert list(MicroBatchGroups(list(range(3)), 1)) == [[0], [1], [2]]
