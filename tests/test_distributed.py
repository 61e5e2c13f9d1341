"""One optimisation step of two gloo processes equals one step of a single process on the union of their
batches (BN frozen, dropout off), and a non-finite loss skips the update."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from engine.iteration import grad_scaler, train_iteration
from methods import get_method
from methods.base import Batch, StepContext
from network import build_model
from utils.schedulers import build_scheduler
from utils.tasks import get_task

STEPS = get_task("voc", "15-1")
CTX = StepContext("voc", STEPS, 1)
PER_RANK = 2


def make_setup():
    """Student (step 1, BN frozen, dropout off), teacher, optimizer, scheduler, and a batch of 4 images
    whose last two labels copy the first two (so per-rank pixel counts, hence loss denominators, match)."""
    torch.manual_seed(0)
    teacher = build_model("deeplabv3bga_resnet18", [16]).eval().requires_grad_(False)
    torch.manual_seed(1)
    student = build_model("deeplabv3bga_resnet18", [16, 1])
    student.load_state_dict(teacher.state_dict(), strict=False)
    method = get_method("barm", pseudo=True, bn_freeze=True)
    method.prepare_student(student, teacher, CTX)
    method.configure(student, CTX)
    method.set_train_mode(student, CTX)
    for module in student.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(2 * PER_RANK, 3, 41, 41, generator=generator)
    labels = torch.randint(0, 17, (PER_RANK, 41, 41), generator=generator)
    labels[:, :3] = 255
    labels = torch.cat([labels, labels])
    return method, student, teacher, images, labels


def one_step(model, student, teacher, method, images, labels):
    optimizer = torch.optim.SGD(method.param_groups(student, CTX, 0.01), lr=0.01, momentum=0.9, nesterov=True,
                                weight_decay=1e-4)
    scheduler = build_scheduler("poly", optimizer, 10)
    scaler = grad_scaler(torch.device("cpu"), amp=False)
    terms, nonfinite = train_iteration(model, student, teacher, method, CTX, Batch(images, labels), optimizer,
                                    scheduler, scaler, amp=False)
    return terms, not bool(nonfinite)


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    method, student, teacher, images, labels = make_setup()
    model = DistributedDataParallel(student)
    part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    one_step(model, student, teacher, method, images[part], labels[part])
    torch.save({k: v.detach().clone() for k, v in student.state_dict().items()}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_union(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    rank0, rank1 = (torch.load(tmp_path / f"{r}.pt") for r in range(2))

    method, student, teacher, images, labels = make_setup()
    before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    terms, finite = one_step(student, student, teacher, method, images, labels)
    assert finite
    single = student.state_dict()

    changed = 0
    for key, value in single.items():
        assert torch.equal(rank0[key], rank1[key]), key  # replicas identical
        update_single = (value - before[key]).double()
        update_ddp = (rank0[key] - before[key]).double()
        if update_single.abs().max() > 0:
            changed += 1
            error = (update_ddp - update_single).norm() / update_single.norm()
            assert error < 1e-4, (key, float(error))  # the updates agree up to float32 summation order
        param_error = ((rank0[key].double() - value.double()).norm() / value.double().norm().clamp(min=1e-12))
        assert param_error < 1e-5, key
    assert changed > 10  # the step really changed the weights


def test_non_finite_loss_skips_the_update_but_steps_the_schedule():
    method, student, teacher, images, labels = make_setup()
    before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    original_loss = method.loss

    def nan_loss(*args):
        terms = original_loss(*args)
        terms["total"] = terms["total"] * float("nan")
        return terms

    method.loss = nan_loss
    optimizer = torch.optim.SGD(method.param_groups(student, CTX, 0.01), lr=0.01, momentum=0.9, nesterov=True)
    scheduler = build_scheduler("poly", optimizer, 10)
    scaler = grad_scaler(torch.device("cpu"), amp=False)
    _, nonfinite = train_iteration(student, student, teacher, method, CTX, Batch(images, labels), optimizer, scheduler,
                                scaler, False)
    assert bool(nonfinite)
    assert scheduler.last_epoch == 1
    for key, value in student.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("amp", [False, True])
def test_cpu_training_step_with_and_without_bf16_autocast(amp):
    method, student, teacher, images, labels = make_setup()
    optimizer = torch.optim.SGD(method.param_groups(student, CTX, 0.01), lr=0.01, momentum=0.9, nesterov=True)
    scheduler = build_scheduler("poly", optimizer, 10)
    scaler = grad_scaler(torch.device("cpu"), amp=False)
    terms, nonfinite = train_iteration(student, student, teacher, method, CTX, Batch(images, labels), optimizer,
                                       scheduler, scaler, amp)
    assert not bool(nonfinite) and all(v.dtype == torch.float32 for v in terms.values())  # losses in fp32 under autocast
