"""End-to-end CPU runs on a synthetic Cityscapes tree (PLOP run.py on ``cityscapes_domain``): task 11-5, steps 0 and 1
of FT, MiB, PLOP and RCIL, ``--test`` reproducing every step's confusion matrix, the one 19-way classifier at every
step, the results files and report of a domain task, and the methods that cannot run refused in one line.

Small on purpose (resnet18, 49-pixel crops, one epoch; 36 training images, 2 per training city: 17 train at step 0,
8 at step 1). FT, MiB and PLOP train the same plain-CE step 0 on the same labels (``Method.step0_protocol``), so MiB
and PLOP start their step 1 from FT's step 0; RCIL's dual-branch network trains its own.
"""
import json
import os
import subprocess
import sys

import pytest

import train
from datasets.synthetic import generate
from engine.cli import parse_args
from tests.helpers import REPO, assert_user_error
from utils.checkpoint import load_checkpoint_file
from utils.errors import UserError

TASK, CROP, K = "11-5", "49", 19


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cityscapes") / "cityscapes")
    generate("cityscapes_domain", root, n_train=36, n_val=6, size=48, seed=0, workers=1)
    return root


def argv(data_root, ckpt, method, *extra):
    return ["--data_root", data_root, "--ckpt_dir", str(ckpt), "--method", method, "--dataset", "cityscapes_domain",
            "--task", TASK, "--backbone", "resnet18", "--no_pretrained", "--crop_size", CROP, "--batch_size", "4",
            "--num_workers", "0", "--crop_val", "--val_batch_size", "8", "--train_epoch", "1", "--val_interval", "0",
            "--end_step", "1", "--device", "cpu", "--no_amp", *extra]


def folder(ckpt, method, step, *parts):
    return os.path.join(str(ckpt), method, TASK, "domains", *parts, f"step{step}")


def results(ckpt, method, step, evaluated=False):
    parts = ("eval", f"crop{CROP}") if evaluated else ()
    with open(os.path.join(folder(ckpt, method, step, *parts), "results.json"), encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def runs(cityscapes, tmp_path_factory):
    """FT steps 0-1; MiB and PLOP step 1 from FT's step 0; RCIL steps 0-1."""
    ckpt = tmp_path_factory.mktemp("cityscapes_runs")
    train.run(parse_args(argv(cityscapes, ckpt, "ft")))
    step0 = os.path.join(folder(ckpt, "ft", 0), "final.pth")
    for method in ("mib", "plop"):
        train.run(parse_args(argv(cityscapes, ckpt, method, "--curr_step", "1", "--prev_ckpt", step0)))
    train.run(parse_args(argv(cityscapes, ckpt, "rcil")))
    return ckpt


@pytest.mark.parametrize("method,steps", [("ft", (0, 1)), ("mib", (1,)), ("plop", (1,)), ("rcil", (0, 1))])
def test_test_reproduces_every_step(cityscapes, runs, method, steps):
    which = () if steps == (0, 1) else ("--curr_step", "1")
    train.run(parse_args(argv(cityscapes, runs, method, "--test", *which)))
    for step in steps:
        trained, tested = results(runs, method, step), results(runs, method, step, evaluated=True)
        assert tested["confusion_matrix"] == trained["confusion_matrix"], (method, step)
        assert sum(map(sum, trained["confusion_matrix"])) > 0


@pytest.mark.parametrize("method", ["ft", "mib", "plop", "rcil"])
def test_one_classifier_over_the_nineteen_classes(runs, method):
    state = load_checkpoint_file(os.path.join(folder(runs, method, 1), "final.pth"))
    classifiers = sorted(k for k in state["model_state"] if k.startswith("cls.") and k.endswith("weight"))
    assert classifiers == ["cls.0.weight"] and state["model_state"]["cls.0.weight"].shape[0] == K
    assert state["classes"] == [list(range(K)), []]
    assert state["domains"] == [list(range(11)), list(range(11, 16))]


def test_results_of_a_domain_step(runs):
    step1 = results(runs, "mib", 1)
    assert step1["domains"] == [list(range(11)), list(range(11, 16))] and len(step1["domain_names"]) == 16
    assert len(step1["class_names"]) == K and step1["class_names"][0] == "road"
    summary = step1["summary"]
    assert summary["n_old"] == K and summary["n_new"] == 0 and summary["mIoU_old"] == summary["mIoU"]
    assert summary["mIoU_new"] is None and summary["hIoU"] is None and summary["mIoU_nobg"] is None
    assert step1["convention"]["domain_incremental"] and step1["convention"]["exclude_absent"]
    with open(os.path.join(folder(runs, "mib", 1), "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    assert config["hyper"]["loss_kd"] == 10 and not config["hyper"]["init_balanced"]
    assert config["sources"]["train_epoch"] == "command line"
    assert config["args"]["held_out_test"] is False  # the reference's test set by default
    with open(os.path.join(runs, "ft", TASK, "domains", "summary.csv"), encoding="utf-8") as handle:
        assert len(handle.read().splitlines()) == 3  # header + 2 steps


def test_report_of_a_domain_run(runs, tmp_path):
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "report.py"),
                             os.path.join(str(runs), "ft", TASK, "domains"), "--out", str(out), "--no_plots"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (out / "report.md").exists() and (out / "report.csv").exists()


@pytest.mark.parametrize("method", ["barm", "ssul", "kproba", "dkd", "ewc", "pi", "rw"])
def test_methods_that_cannot_apply_are_refused(cityscapes, tmp_path, method):
    with pytest.raises(UserError, match=f"--method {method} cannot run on --dataset cityscapes_domain: "):
        parse_args(argv(cityscapes, tmp_path, method))


def test_refusal_is_one_line_and_writes_nothing(cityscapes, tmp_path):
    ckpt = tmp_path / "ckpt"
    result = subprocess.run([sys.executable, os.path.join(REPO, "train.py"),
                             *argv(cityscapes, ckpt, "mib", "--init_balanced")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert_user_error(result, "--method mib cannot run on --dataset cityscapes_domain", "--no_init_balanced")
    assert not ckpt.exists()
