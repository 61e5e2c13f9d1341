"""CUDA-only paths: fp16 autocast with a GradScaler (and the gradient hook under it), channels-last under
autocast, SyncBatchNorm, and nccl under torchrun. Skipped on machines without CUDA (the CPU suite covers the
same code paths with bf16 autocast and gloo)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from engine.iteration import grad_scaler, train_iteration
from methods import get_method
from methods.base import Batch, StepContext
from network import build_model
from utils.schedulers import build_scheduler
from utils.tasks import get_task

CUDA = torch.cuda.is_available()
TWO_GPUS = CUDA and torch.cuda.device_count() >= 2
pytestmark = pytest.mark.skipif(not CUDA, reason="needs CUDA")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = get_task("voc", "15-1")
CTX = StepContext("voc", STEPS, 1)


def barm_setup(device, channels_last=False):
    torch.manual_seed(0)
    teacher = build_model("deeplabv3bga_resnet18", [16]).eval().requires_grad_(False).to(device)
    student = build_model("deeplabv3bga_resnet18", [16, 1]).to(device)
    student.load_state_dict(teacher.state_dict(), strict=False)
    method = get_method("barm", pseudo=True, bn_freeze=True)
    method.prepare_student(student, teacher, CTX)
    method.configure(student, CTX)
    method.set_train_mode(student, CTX)
    if channels_last:
        student, teacher = (m.to(memory_format=torch.channels_last) for m in (student, teacher))
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 65, 65, generator=generator).to(device)
    labels = torch.randint(0, 17, (2, 65, 65), generator=generator).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return method, student, teacher, Batch(images, labels)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fp16_training_step_with_grad_scaler(channels_last):
    device = torch.device("cuda")
    method, student, teacher, batch = barm_setup(device, channels_last)
    optimizer = torch.optim.SGD(method.param_groups(student, CTX, 0.01), lr=0.01, momentum=0.9, nesterov=True)
    scheduler = build_scheduler("poly", optimizer, 10)
    scaler = grad_scaler(device, amp=True)
    assert scaler.is_enabled()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    terms, nonfinite = train_iteration(student, student, teacher, method, CTX, batch, optimizer, scheduler, scaler,
                                       True)
    assert not bool(nonfinite) and all(v.dtype == torch.float32 for v in terms.values())
    assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_channels_last_under_autocast_matches_fp32():
    device = torch.device("cuda")
    method, student, teacher, batch = barm_setup(device, channels_last=True)
    teacher.eval()
    with torch.no_grad():
        reference = teacher(batch.images.contiguous())[0].float()
        with torch.autocast("cuda", dtype=torch.float16):
            fast = teacher(batch.images)[0].float()
    assert torch.isfinite(fast).all()
    assert (fast - reference).abs().max() <= 5e-2 * reference.abs().max()


def test_gradient_hook_under_the_cuda_grad_scaler():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = nn.Conv2d(3, 4, 1).to(device)
    seen = []

    class Method:
        uses_gradients = True

        def loss(self, outputs, teacher_outputs, batch, ctx):
            ce = nn.functional.cross_entropy(outputs.float(), batch.labels)
            return {"total": ce}

        def after_backward(self, student, ctx, finite):
            seen.append(student.weight.grad.clone())
            return None

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x)

    images = torch.randn(2, 3, 5, 5, device=device)
    labels = torch.randint(0, 4, (2, 5, 5), device=device)
    reference = nn.functional.cross_entropy(model(images).float(), labels)
    expected = torch.autograd.grad(reference, model.weight)[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = grad_scaler(device, amp=True)
    train_iteration(Wrapper(), model, None, Method(), CTX, Batch(images, labels), optimizer,
                    build_scheduler("poly", optimizer, 10), scaler, amp=False)
    torch.testing.assert_close(seen[0], expected, rtol=1e-4, atol=1e-6)  # unscaled


def _sync_bn_worker(rank, world, init_file, out):
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    bn = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3))).cuda(rank).train()
    x = torch.arange(2 * 3 * 4, dtype=torch.float32, device=f"cuda:{rank}").view(2, 3, 2, 2) * (rank + 1)
    bn(x)
    torch.save(bn[0].running_mean.cpu(), os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not TWO_GPUS, reason="needs two GPUs")
def test_sync_batchnorm_statistics_are_global(tmp_path):
    mp.start_processes(_sync_bn_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    means = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    x = torch.cat([torch.arange(24, dtype=torch.float32).view(2, 3, 2, 2) * (r + 1) for r in range(2)])
    expected = 0.1 * x.mean(dim=(0, 2, 3))  # momentum 0.1 from 0, statistics of both ranks' batches
    for mean in means:
        torch.testing.assert_close(mean, expected)


@pytest.mark.skipif(not TWO_GPUS, reason="needs two GPUs")
def test_torchrun_nccl_two_steps(tiny_voc, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "train.py"), "--data_root", tiny_voc, "--ckpt_dir", str(tmp_path), "--task", "15-1",
           "--overlap", "--backbone", "resnet18", "--no_pretrained", "--crop_size", "65", "--batch_size", "2",
           "--num_workers", "0", "--crop_val", "--train_epoch", "1", "--end_step", "1", "--pseudo", "--bn_freeze",
           "--amp", "--val_interval", "0"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("weights identical on all 2 ranks") == 2
