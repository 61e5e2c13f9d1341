"""Helpers of the tests: train.py command lines on synthetic data (CPU, resnet18, small crops), copies of trained
run folders, scalar reference formulas (log-sum-exp, softmax) and randomised norm layers."""
import json
import math
import os
import shutil
import subprocess
import sys

import torch

from network.abn import ABN
from utils.checkpoint import load_checkpoint_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--task", "15-1", "--overlap", "--backbone", "resnet18", "--no_pretrained", "--crop_size", "65",
          "--batch_size", "4", "--num_workers", "0", "--crop_val", "--val_batch_size", "8", "--lr_policy", "poly",
          "--val_interval", "0", "--pseudo", "--bn_freeze"]


def train_cmd(data_root, ckpt_dir, *extra):
    return [sys.executable, os.path.join(REPO, "train.py"), "--data_root", data_root, "--ckpt_dir", str(ckpt_dir),
            *COMMON, *extra]


def run(cmd, **kwargs):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, **kwargs)


def step_dir(ckpt_dir, step, task="15-1", method="barm"):
    return os.path.join(str(ckpt_dir), method, task, "overlap", f"step{step}")


def eval_results(ckpt_dir, step, name="crop65", task="15-1", method="barm"):
    """The results.json that ``--test`` wrote for ``step`` (evaluation settings ``name``)."""
    path = os.path.join(str(ckpt_dir), method, task, "overlap", "eval", name, f"step{step}", "results.json")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def weights(path):
    return load_checkpoint_file(path)["model_state"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def copy_run(source, tmp_path):
    """A copy of a trained checkpoint folder (module fixtures train once; tests modify copies)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt)
    return ckpt


def lse(values):
    """log Σ exp of a list of floats, computed stably (reference for the losses' tests)."""
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def softmax(values):
    d = lse(values)
    return [math.exp(v - d) for v in values]


def randomise_norm_layers(model, seed=3):
    """Random γ (negative ones included), β and running statistics of every ABN layer; returns ``model``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ABN):
                n = module.num_features
                module.weight.copy_(torch.randn(n, generator=generator))
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model
