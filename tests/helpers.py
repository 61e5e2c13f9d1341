"""Helpers shared by several test files: train.py command lines on synthetic data (CPU, resnet18, small crops),
copies of trained run folders, scalar reference formulas (log-sum-exp, softmax, softplus, BCE), per-pixel loops
of the MiB-family losses, hand-made inputs (class indexes, regularizer updates, BARM and RCIL models, results
files of toy runs) and randomised norm layers."""
import contextlib
import csv
import importlib.util
import io
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from datasets.class_index import ClassIndex
from engine.iteration import grad_scaler, train_iteration
from methods import get_method
from methods.base import Batch, StepContext
from network import build_model
from network.abn import ABN
from network.rcil import DualBranchBlock
from utils.checkpoint import load_checkpoint_file
from utils.schedulers import build_scheduler
from utils.tasks import get_task


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--task", "15-1", "--overlap", "--backbone", "resnet18", "--no_pretrained", "--crop_size", "65",
          "--batch_size", "4", "--num_workers", "0", "--crop_val", "--val_batch_size", "8", "--lr_policy", "poly",
          "--val_interval", "0", "--clean"]


def train_cmd(data_root, ckpt_dir, *extra):
    return [sys.executable, os.path.join(REPO, "train.py"), "--data_root", data_root, "--ckpt_dir", str(ckpt_dir),
            *COMMON, *extra]


def run(cmd, **kwargs):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, **kwargs)


def run_inline(cmd):
    """A ``train.py`` command line (as :func:`train_cmd` makes) run by ``train.main`` in this process, its output
    captured: what :func:`run` returns, without an interpreter's start-up (seconds of imports per command). For
    runs that need no environment of their own; the script's own start-up is tested through :func:`run`."""
    import train  # the entry point: imported where a test runs it

    assert os.path.basename(cmd[1]) == "train.py", cmd
    out, err = io.StringIO(), io.StringIO()
    code = 0
    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            train.main(cmd[2:])
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(cmd, code, out.getvalue(), err.getvalue())


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


# ---- scalar formulas ---------------------------------------------------------------------------------
def softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def bce(x, t):  # BCE with logits: −t·log σ(x) − (1 − t)·log(1 − σ(x))
    return softplus(x) - t * x


def dkd_bce(x, t, w=1.0):
    """−[w·t·log σ(x) + (1 − t)·log(1 − σ(x))], straight from the formula (DKD's tests)."""
    return -(w * t * math.log(sigmoid(x)) + (1 - t) * math.log(1 - sigmoid(x)))


def ids(params):
    return {id(p) for p in params}


# ---- per-pixel loops of the MiB-family losses (MiB utils/loss.py, train.py::Trainer.train) ------------------
B, C, H, W = 2, 5, 3, 4
REL = 1e-5


def make_inputs(seed=0, n_classes=C, n_old=3):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, n_classes, H, W, generator=gen) * 2
    old_logits = torch.randn(B, n_old, H, W, generator=gen) * 2
    labels = torch.randint(0, n_classes, (B, H, W), generator=gen)
    labels[0, 0, 0] = labels[1, 2, 3] = labels[1, 0, 1] = 255  # ignored pixels
    labels[0, 1, 1], labels[0, 1, 2], labels[1, 1, 0] = 0, 1, n_classes - 1  # background, old and new present
    return logits, old_logits, labels


def pixels():
    return [(b, i, j) for b in range(B) for i in range(H) for j in range(W)]


def z_at(logits, b, i, j):
    return [float(logits[b, c, i, j]) for c in range(logits.shape[1])]


def ce_loop(logits, labels):
    """Σ over valid pixels of −log softmax(z)_y, and the number of valid pixels."""
    total, valid = 0.0, 0
    for b, i, j in pixels():
        y = int(labels[b, i, j])
        if y == 255:
            continue
        z = z_at(logits, b, i, j)
        total += lse(z) - z[y]
        valid += 1
    return total, valid


def per_pixel_mean(fn, *tensors):
    """mean over all B·H·W pixels of fn(values of each tensor at the pixel)."""
    b, _, h, w = tensors[0].shape
    total = 0.0
    for n in range(b):
        for i in range(h):
            for j in range(w):
                total += fn(*[t[n, :, i, j].tolist() if t.dim() == 4 else int(t[n, i, j]) for t in tensors])
    return total / (b * h * w)


def ce_px(z, y):
    return 0.0 if y == 255 else lse(z) - z[y]


# ---- EWC, PI and RW on a tiny "model" of named parameters (MiB utils/regularizer.py) ----------------------
ALPHA = 0.9

# step 0: initial weights, then per iteration the weights at the update and the task-loss gradients
THETA0 = {"a": [1.0, 2.0], "b": [0.5, -1.0, 3.0]}
STEP0 = [
    ({"a": [1.0, 2.0], "b": [0.5, -1.0, 3.0]}, {"a": [0.5, -1.0], "b": [2.0, 0.0, 1.0]}),
    ({"a": [0.8, 2.1], "b": [0.5, -0.5, 2.0]}, {"a": [1.5, 0.2], "b": [-0.5, 1.0, 0.3]}),
    ({"a": [0.6, 2.1], "b": [0.7, 0.0, 2.5]}, {"a": [0.1, 0.4], "b": [0.0, -2.0, 0.6]}),
    ({"a": [0.55, 2.2], "b": [0.6, 0.1, 2.2]}, {"a": [-0.3, 0.9], "b": [1.0, 0.5, -0.4]}),
]
FINAL0 = {"a": [0.5, 2.3], "b": [0.5, 0.2, 2.0]}  # b[0] ends where it started: PI's 1e-20 denominator
# step 1: the step-0 result is θ*; "c" is the new classifier
C0 = [0.3, -0.2]
STEP1 = [
    ({"a": [0.5, 2.3], "b": [0.5, 0.2, 2.0], "c": C0}, {"a": [0.2, -0.1], "b": [1.0, 1.0, 1.0], "c": [0.5, 0.5]}),
    ({"a": [0.45, 2.5], "b": [0.4, 0.3, 2.1], "c": [0.35, -0.1]},
     {"a": [0.4, 0.3], "b": None, "c": [1.0, -2.0]}),
    ({"a": [0.3, 2.6], "b": [0.2, 0.3, 2.3], "c": [0.4, 0.0]},
     {"a": [-1.0, 0.6], "b": [0.3, -0.2, 0.7], "c": [0.1, 0.2]}),
    ({"a": [0.35, 2.4], "b": [0.1, 0.6, 2.2], "c": [0.5, 0.3]},
     {"a": [0.5, 0.5], "b": [-0.6, 0.4, 0.2], "c": [-0.3, 0.6]}),
]
FINAL1 = {"a": [0.4, 2.2], "b": [0.0, 0.5, 2.6], "c": [0.45, 0.1]}


# plain-Python formulas ------------------------------------------------------------------------------
def normalize(values):
    low, high = min(values), max(values)
    return [(v - low) / (high - low + 1e-8) for v in values]


def ema(fisher, grad):
    return [ALPHA * g * g + (1 - ALPHA) * f for f, g in zip(fisher, grad)]


def weighted_distance(importance, theta, theta_ref):
    return sum(sum(w * (t - r) ** 2 for w, t, r in zip(importance[n], theta[n], theta_ref[n])) for n in importance)


def ewc_fisher(start, iterations):
    fisher = {n: list(v) for n, v in start.items()}
    for _, grads in iterations:
        for n, g in grads.items():
            if g is not None:
                fisher[n] = ema(fisher[n], g)
    return fisher


# the tiny model ------------------------------------------------------------------------------------
def make_params(values):
    return {n: torch.tensor(v, requires_grad=True) for n, v in values.items()}


def set_params(params, values):
    with torch.no_grad():
        for n, v in values.items():
            params[n].copy_(torch.tensor(v))


def run_updates(reg, params, iterations):
    for theta, grads in iterations:
        set_params(params, theta)
        reg.update(params, {n: None if g is None else torch.tensor(g) for n, g in grads.items()})


def as_lists(store):
    return {n: t.tolist() for n, t in store.items()}


def assert_close(actual, expected):
    assert set(actual) == set(expected)
    for n in expected:
        assert actual[n] == pytest.approx(expected[n], rel=REL, abs=1e-12), n


def reload(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def penalty_value(reg, params):
    value = reg.penalty(params)
    return None if value is None else value.item()


# ---- EWC / PI / RW as methods (MiB utils/regularizer.py::EWC, PI, RW) ----------------------------------------
class Tiny(nn.Module):
    def __init__(self, w, v=None):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        if v is not None:
            self.v = nn.Parameter(torch.tensor(v))  # a "new classifier": not in the previous model


def iterate(method, model, ctx, grads, finite=True):
    """Set ``p.grad`` from ``grads`` (name -> list) and call the gradient hook."""
    for name, p in model.named_parameters():
        p.grad = torch.tensor(grads[name]) if name in grads else None
    return method.after_backward(model, ctx, finite)


# ---- BARM models: raw outputs, one optimisation step (CPU, and CUDA with channels last) ----------------------
def barm_inputs(seed=0):
    """Raw student (step 1 of ((0, 1, 2), (3,))) and teacher outputs of small BARM models at 49 px."""
    torch.manual_seed(seed)
    student = build_model("deeplabv3bga_resnet18", [3, 1]).eval()
    teacher = build_model("deeplabv3bga_resnet18", [3]).eval()
    images = torch.randn(2, 3, 49, 49, generator=torch.Generator().manual_seed(seed))
    labels = torch.randint(0, 4, (2, 49, 49), generator=torch.Generator().manual_seed(seed + 1))
    labels[:, :5] = 255
    with torch.no_grad():
        return student(images), teacher(images), labels


BARM_STEPS = get_task("voc", "15-1")
BARM_CTX = StepContext("voc", BARM_STEPS, 1)
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
    method.prepare_student(student, teacher, BARM_CTX)
    method.configure(student, BARM_CTX)
    method.set_train_mode(student, BARM_CTX)
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
    optimizer = torch.optim.SGD(method.param_groups(student, BARM_CTX, 0.01), lr=0.01, momentum=0.9, nesterov=True,
                                weight_decay=1e-4)
    scheduler = build_scheduler("poly", optimizer, 10)
    scaler = grad_scaler(torch.device("cpu"), amp=False)
    terms, nonfinite = train_iteration(model, student, teacher, method, BARM_CTX, Batch(images, labels), optimizer,
                                    scheduler, scaler, amp=False)
    return terms, not bool(nonfinite)


def ddp_step_worker(rank, world, init_file, out_dir, step):
    """One of ``world`` gloo processes (``mp.start_processes`` target): :func:`make_setup`'s student in
    DistributedDataParallel, ``step(model, student, teacher, method, images, labels)`` on this rank's
    ``PER_RANK`` images, the weights saved to ``out_dir/{rank}.pt``. ``step`` is a module-level function."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    method, student, teacher, images, labels = make_setup()
    model = DistributedDataParallel(student)
    part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    step(model, student, teacher, method, images[part], labels[part])
    torch.save({k: v.detach().clone() for k, v in student.state_dict().items()}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def barm_setup(device, channels_last=False):
    torch.manual_seed(0)
    teacher = build_model("deeplabv3bga_resnet18", [16]).eval().requires_grad_(False).to(device)
    student = build_model("deeplabv3bga_resnet18", [16, 1]).to(device)
    student.load_state_dict(teacher.state_dict(), strict=False)
    method = get_method("barm", pseudo=True, bn_freeze=True)
    method.prepare_student(student, teacher, BARM_CTX)
    method.configure(student, BARM_CTX)
    method.set_train_mode(student, BARM_CTX)
    if channels_last:
        student, teacher = (m.to(memory_format=torch.channels_last) for m in (student, teacher))
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 65, 65, generator=generator).to(device)
    labels = torch.randint(0, 17, (2, 65, 65), generator=generator).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return method, student, teacher, Batch(images, labels)


# ---- RCIL's network ---------------------------------------------------------------------------------------
def images(shape=(2, 3, 33, 33), seed=7):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_relative(actual, expected, tol=1e-5):
    """|actual − expected| ≤ tol · max|expected| everywhere."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def eval_outputs(model, x, first_only=False):
    """Eval-mode logits and taps; ``first_only``: every gate at (w1, w2) = (2, 0), i.e. the first (merged)
    branch alone."""
    model.eval()
    if first_only:
        model.gates.weights = lambda channels, training: (torch.full((1, channels, 1, 1), 2.0),
                                                          torch.zeros(1, channels, 1, 1))
    try:
        with torch.no_grad():
            logits, features = model(x)
    finally:
        model.gates.__dict__.pop("weights", None)
    return [logits] + list(features["attentions"])


def check_merged_layers(model):
    for block in (m for m in model.modules() if isinstance(m, DualBranchBlock)):
        bn = block.convs.bn2
        assert bn.eps == 0 and torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var)) and not bn.running_mean.any()
        assert not bn.bias.any() and not bn.training
        assert not any(p.requires_grad for p in (block.convs.conv2.weight, block.convs.conv2.bias, bn.weight))
        assert block.convs.conv2_new.weight.requires_grad and block.convs.bn2_new.weight.requires_grad
    head = model.head
    assert head.map_bn.eps == 0 and not head.map_bn.training
    assert all(not p.requires_grad for p in head.map_convs.parameters())
    assert all(p.requires_grad for p in head.map_convs_new.parameters())


# ---- datasets: class indexes, prediction panels -------------------------------------------------------
def hand_index(class_sets):
    presence = np.zeros((len(class_sets), 256), dtype=bool)
    for row, classes in enumerate(class_sets):
        presence[row, list(classes)] = True
    return ClassIndex([f"img{i}" for i in range(len(class_sets))], presence)


def unique_values(path):
    return set(np.unique(np.asarray(Image.open(path))).tolist())


VOID = (224, 224, 192)  # the colour of void / ignored pixels in the palettes
TITLE, GAP = 14, 4  # the panel's title strip and the gap between panes (engine.panels' layout)


# ---- results files of toy runs (reports, scripts/report.py) ---------------------------------------------
CLASSES = [[0, 1], [2], [3]]  # a 3-step toy task: background + class 1, then class 2, then class 3
NAMES = ["background", "aeroplane", "bicycle", "bird"]
BARM = {"background_in_old": True, "exclude_absent": False}
MIB = {"background_in_old": True, "exclude_absent": True}

# Per-step class IoU (channel order) and the summaries, written out by hand (old = channels 0-1).
IOU_FT = [[0.9, 0.6], [0.8, 0.3, 0.5], [0.7, 0.4, 0.1, 0.6]]
SUMMARY_FT = [
    {"mIoU": 0.75, "mIoU_old": 0.75, "mIoU_new": None, "hIoU": None, "mIoU_nobg": 0.6, "mIoU_old_nobg": 0.6,
     "hIoU_nobg": None},
    {"mIoU": 1.6 / 3, "mIoU_old": 0.55, "mIoU_new": 0.5, "hIoU": 2 * 0.55 * 0.5 / 1.05, "mIoU_nobg": 0.4,
     "mIoU_old_nobg": 0.3, "hIoU_nobg": 2 * 0.3 * 0.5 / 0.8},
    {"mIoU": 0.45, "mIoU_old": 0.55, "mIoU_new": 0.35, "hIoU": 2 * 0.55 * 0.35 / 0.9, "mIoU_nobg": 1.1 / 3,
     "mIoU_old_nobg": 0.4, "hIoU_nobg": 2 * 0.4 * 0.35 / 0.75},
]
IOU_BARM = [[0.9, 0.6], [0.88, 0.65, 0.4], [0.86, 0.55, 0.45, 0.3]]
SUMMARY_BARM = [
    {"mIoU": 0.75, "mIoU_old": 0.75, "mIoU_new": None, "hIoU": None, "mIoU_nobg": 0.6, "mIoU_old_nobg": 0.6,
     "hIoU_nobg": None},
    {"mIoU": 1.93 / 3, "mIoU_old": 0.765, "mIoU_new": 0.4, "hIoU": 2 * 0.765 * 0.4 / 1.165, "mIoU_nobg": 0.525,
     "mIoU_old_nobg": 0.65, "hIoU_nobg": 2 * 0.65 * 0.4 / 1.05},
    {"mIoU": 0.54, "mIoU_old": 0.705, "mIoU_new": 0.375, "hIoU": 2 * 0.705 * 0.375 / 1.08, "mIoU_nobg": 1.3 / 3,
     "mIoU_old_nobg": 0.55, "hIoU_nobg": 2 * 0.55 * 0.375 / 0.925},
]


def write_run(root, method, ious, summaries, convention=BARM, subpath=None, confusions=None, run_ids=None):
    """Results files of one run in the trainer's layout; returns the setting folder."""
    setting_dir = os.path.join(str(root), subpath or method, "2-1", "overlap")
    run_ids = run_ids or [f"{method}-{t}" for t in range(len(ious))]
    for t, (iou, summary) in enumerate(zip(ious, summaries)):
        results = {
            "Mean IoU": float(np.mean(iou)), "Class IoU": {str(c): v for c, v in enumerate(iou)},
            "summary": {**summary, "n_old": 2, "n_new": len(iou) - 2}, "convention": convention,
            "dataset": "voc", "task": "2-1", "setting": "overlap", "step": t, "method": method,
            "checkpoint": os.path.join(str(root), subpath or method, "2-1", "overlap", f"step{t}", "final.pth"),
            "classes": CLASSES[:t + 1], "class_names": NAMES[:len(iou)],
            "run_id": run_ids[t], "parent_id": run_ids[t - 1] if t else None,
        }
        if confusions is not None:
            results["confusion_matrix"] = confusions[t]
        folder = os.path.join(setting_dir, f"step{t}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "results.json"), "w", encoding="utf-8") as handle:
            json.dump(results, handle)
    return setting_dir


def read_csv(path):
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def pct(value):
    return f"{100 * value:.4f}"


# ---- scripts/benchmark.py ------------------------------------------------------------------------------
def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_script", os.path.join(REPO, "scripts", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
