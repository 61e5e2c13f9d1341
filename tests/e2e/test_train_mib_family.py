"""End-to-end CPU runs of the MiB family (MiB run.py::run_step, train.py::Trainer): a 2-step run of each of the
nine methods on the VOC layout (MiB and PLOP also on ADE), ``--test`` reproducing every step's confusion matrix,
the step-0 statistics EWC/PI/RW need, and an interrupted RW step resumed to the same weights and statistics.

To stay small (resnet18, 49-pixel crops, one epoch, VOC task 2-1: 18 images at step 0, 10 at step 1), runs
whose step 0 is identical share it: FT, LwF, ILT and MiB all train step 0 with the plain CE over all pixels on
MiB's labels and network (tests/methods/test_mib_family.py checks the losses and tables), so LwF, ILT and MiB start
their step 1 from FT's step 0 (``--prev_ckpt``); on ADE, MiB's and PLOP's training tables coincide, so PLOP
starts from MiB's step 0. PLOP (VOC: void ignored), LwF-MC (BCE at step 0) and EWC/PI/RW (statistics) train
their own step 0.
"""
import json
import os

import pytest
import torch

import train
from engine.cli import parse_args
from methods.rw import RWMethod
from utils.checkpoint import load_checkpoint_file
from utils.errors import UserError


VOC_TASK, ADE_TASK = "2-1", "5-5"


def argv(data_root, ckpt, method, *extra, dataset="voc"):
    return ["--data_root", data_root, "--ckpt_dir", str(ckpt), "--method", method, "--dataset", dataset,
            "--task", VOC_TASK if dataset == "voc" else ADE_TASK, "--overlap", "--backbone", "resnet18",
            "--no_pretrained", "--crop_size", "49", "--batch_size", "4", "--num_workers", "0", "--crop_val",
            "--val_batch_size", "8", "--lr_policy", "poly", "--lr", "0.01", "--train_epoch", "1",
            "--val_interval", "0", "--end_step", "1", "--device", "cpu", *extra]


def folder(ckpt, method, step, dataset="voc", *parts):
    task = VOC_TASK if dataset == "voc" else ADE_TASK
    return os.path.join(str(ckpt), method, task, "overlap", *parts, f"step{step}")


def results(ckpt, method, step, dataset="voc", evaluated=False):
    parts = ("eval", "crop49") if evaluated else ()
    with open(os.path.join(folder(ckpt, method, step, dataset, *parts), "results.json"), encoding="utf-8") as handle:
        return json.load(handle)


def final(ckpt, method, step, dataset="voc"):
    return load_checkpoint_file(os.path.join(folder(ckpt, method, step, dataset), "final.pth"))


def train_steps(data_root, ckpt, method, *extra, dataset="voc"):
    train.run(parse_args(argv(data_root, ckpt, method, *extra, dataset=dataset)))


def check_test_reproduces(data_root, ckpt, method, steps, dataset="voc"):
    """``--test`` on the saved checkpoints gives every step's confusion matrix exactly (steps (0, 1): one
    ``--test`` evaluates both)."""
    which = () if tuple(steps) == (0, 1) else ("--curr_step", str(steps[0]))
    train.run(parse_args(argv(data_root, ckpt, method, "--test", *which, dataset=dataset)))
    for step in steps:
        trained, tested = results(ckpt, method, step, dataset), results(ckpt, method, step, dataset, evaluated=True)
        assert tested["confusion_matrix"] == trained["confusion_matrix"], (method, step)
        assert tested["summary"] == trained["summary"] and tested["convention"] == trained["convention"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("mib_family")


@pytest.fixture(scope="module")
def ft_voc(tiny_voc, runs):
    """FT, steps 0 and 1 (its step 0 is the shared CE step 0)."""
    train_steps(tiny_voc, runs, "ft")
    return os.path.join(folder(runs, "ft", 0), "final.pth")


@pytest.fixture(scope="module")
def mib_ade(tiny_ade, runs):
    train_steps(tiny_ade, runs, "mib", dataset="ade")
    return os.path.join(folder(runs, "mib", 0, "ade"), "final.pth")


RW_STEP1 = ("--train_epoch", "2", "--reg_iterations", "1")


@pytest.fixture(scope="module")
def rw_voc(tiny_voc, runs):
    """RW: step 0 (1 epoch), then step 1 with 2 epochs (the reference for the interrupted run)."""
    train_steps(tiny_voc, runs, "rw", "--end_step", "0", "--reg_iterations", "1")
    train_steps(tiny_voc, runs, "rw", "--curr_step", "1", *RW_STEP1)
    return os.path.join(folder(runs, "rw", 0), "final.pth")


def check_step1(ckpt, method, dataset="voc"):
    step1 = results(ckpt, method, 1, dataset)
    n_classes = 4 if dataset == "voc" else 11
    assert len(step1["Class IoU"]) == n_classes and step1["method"] == method
    assert step1["convention"]["exclude_absent"] and step1["convention"]["background_in_old"]
    return step1


def test_ft(tiny_voc, runs, ft_voc):
    check_step1(runs, "ft")
    assert final(runs, "ft", 1)["hyper"] == {"protocol": "mib"}
    check_test_reproduces(tiny_voc, runs, "ft", (0, 1))


@pytest.mark.parametrize("method", ["lwf", "ilt", "mib"])
def test_step1_from_the_shared_ce_step0(tiny_voc, runs, ft_voc, method):
    extra = ("--val_interval", "1") if method == "mib" else ()  # MiB validates every epoch (its default rule)
    train_steps(tiny_voc, runs, method, "--curr_step", "1", "--prev_ckpt", ft_voc, *extra)
    check_step1(runs, method)
    assert final(runs, method, 1)["parent_id"] == final(runs, "ft", 0)["run_id"]
    check_test_reproduces(tiny_voc, runs, method, (1,))


@pytest.mark.parametrize("method", ["plop", "lwf-mc", "ewc", "pi"])
def test_two_steps_with_their_own_step0(tiny_voc, runs, method):
    train_steps(tiny_voc, runs, method)
    check_step1(runs, method)
    state = final(runs, method, 1)["method_state"]
    if method in ("ewc", "pi"):
        carry0 = final(runs, method, 0)["method_state"]["carry"]
        assert carry0["kind"] == method and state["carry"]["kind"] == method
    if method == "plop":
        assert state["thresholds"].shape == (4,) and bool((state["thresholds"] >= 0.001).all())
        assert results(runs, "plop", 1)["convention"]["future_classes"] == "background"
    check_test_reproduces(tiny_voc, runs, method, (0, 1))


def test_rw(tiny_voc, runs, rw_voc):
    carry = final(runs, "rw", 1)["method_state"]["carry"]
    assert carry["kind"] == "rw" and set(carry) == {"kind", "fisher", "score"}
    check_test_reproduces(tiny_voc, runs, "rw", (0, 1))


def test_regularized_step1_needs_a_step0_of_the_same_method(tiny_voc, tmp_path, ft_voc):
    # the step 0 of another method carries no EWC statistics: refused by the rule of which step 0 a step may use
    with pytest.raises(UserError, match="--method ft; --method ewc cannot start from it"):
        train_steps(tiny_voc, tmp_path, "ewc", "--curr_step", "1", "--prev_ckpt", ft_voc)
    assert not list(tmp_path.rglob("*.pth"))


def test_interrupted_rw_step_resumes_to_the_same_weights_and_statistics(tiny_voc, runs, tmp_path, rw_voc,
                                                                        monkeypatch):
    common = ("--curr_step", "1", "--prev_ckpt", rw_voc, *RW_STEP1)

    class Interrupt(Exception):
        pass

    calls = {"n": 0}
    original = RWMethod.loss

    def loss(self, outputs, teacher_outputs, batch, ctx):
        calls["n"] += 1
        if calls["n"] == 3:  # the first iteration of the second epoch (2 iterations per epoch)
            raise Interrupt()
        return original(self, outputs, teacher_outputs, batch, ctx)

    monkeypatch.setattr(RWMethod, "loss", loss)
    with pytest.raises(Interrupt):
        train_steps(tiny_voc, tmp_path / "killed", "rw", *common)
    monkeypatch.setattr(RWMethod, "loss", original)
    last = load_checkpoint_file(os.path.join(folder(tmp_path / "killed", "rw", 1), "last.pth"))
    assert last["epoch"] == 1 and last["method_state"]["running"]["count"] == 2
    train_steps(tiny_voc, tmp_path / "killed", "rw", *common, "--resume")
    a, b = final(runs, "rw", 1), final(tmp_path / "killed", "rw", 1)
    for key, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][key]), key
    for kind in ("fisher", "score"):
        for name, value in a["method_state"]["carry"][kind].items():
            assert torch.equal(value, b["method_state"]["carry"][kind][name]), (kind, name)


def test_mib_on_ade(tiny_ade, runs, mib_ade):
    step1 = check_step1(runs, "mib", "ade")
    assert step1["convention"]["ade_class0"] == "ignored"
    assert sum(step1["confusion_matrix"][0]) == 0  # ADE class 0 is not scored: no ground truth in channel 0
    check_test_reproduces(tiny_ade, runs, "mib", (0, 1), "ade")


def test_plop_on_ade_from_mibs_step0(tiny_ade, runs, mib_ade):
    train_steps(tiny_ade, runs, "plop", "--curr_step", "1", "--prev_ckpt", mib_ade, dataset="ade")
    step1 = check_step1(runs, "plop", "ade")
    assert step1["convention"]["ade_class0"] == "scored" and sum(step1["confusion_matrix"][0]) > 0
    assert final(runs, "plop", 1, "ade")["hyper"]["pod_factor"] == 0.001  # ADE's POD factors
    check_test_reproduces(tiny_ade, runs, "plop", (1,), "ade")
