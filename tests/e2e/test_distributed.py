"""End to end, several processes: train.py under torchrun with two gloo processes, one optimisation step of two
gloo processes against one process on the union of their batches (BN frozen, dropout off), the metrics' all-reduce,
and on CUDA SyncBatchNorm and nccl under torchrun (skipped without two GPUs)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from metrics import StreamSegMetrics
from tests.helpers import REPO, ddp_step_worker, eval_results, make_setup, one_step, run, step_dir, train_cmd


def test_two_gloo_processes_keep_identical_weights(tiny_voc, tmp_path):
    # step 0 trains BatchNorm statistics (no SyncBatchNorm on the CPU), step 1 freezes them
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *train_cmd(tiny_voc, tmp_path, "--end_step", "1", "--train_epoch", "1", "--batch_size", "2",
                      "--device", "cpu")[1:]]
    result = run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("weights identical on all 2 ranks") == 2
    assert "weights differ" not in result.stdout + result.stderr
    assert "global batch 4" in result.stdout and "per-process statistics" in result.stdout
    assert os.path.exists(os.path.join(step_dir(tmp_path, 1), "final.pth"))
    with open(os.path.join(step_dir(tmp_path, 0), "results.json")) as handle:
        trained = json.load(handle)  # evaluated by both ranks, each on half of the test images
    assert run(train_cmd(tiny_voc, tmp_path, "--test", "--curr_step", "0")).returncode == 0  # one process
    assert eval_results(tmp_path, 0)["confusion_matrix"] == trained["confusion_matrix"]


def test_two_processes_equal_one_process_on_the_union(tmp_path):
    mp.start_processes(ddp_step_worker, args=(2, str(tmp_path / "init"), str(tmp_path), one_step), nprocs=2,
                       start_method="spawn")
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


def _all_reduce_worker(rank, world, init_file, queue):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    metrics = StreamSegMetrics(3)
    metrics.update(torch.tensor([rank, 2]), torch.tensor([rank, 1]))
    metrics.all_reduce()
    queue.put((rank, metrics.confusion_matrix.tolist()))
    dist.destroy_process_group()


def test_all_reduce_sums_over_processes(tmp_path):
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_all_reduce_worker, args=(2, os.path.join(tmp_path, "init"), queue), nprocs=2,
                       start_method="spawn")
    results = dict(queue.get() for _ in range(2))
    expected = [[1, 0, 0], [0, 1, 0], [0, 2, 0]]
    assert results[0] == expected and results[1] == expected


CUDA = torch.cuda.is_available()
TWO_GPUS = CUDA and torch.cuda.device_count() >= 2


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
