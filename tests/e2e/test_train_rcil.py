"""RCIL end to end on synthetic data (RCIL train.py, run.py::convert_model): VOC 15-1 steps 0-2 (step 2 loads the
merged step-1 checkpoint and merges again) and ADE 100-50 steps 0-1, ``--test`` reproducing every step's confusion
matrix, and an interrupted step resumed exactly thanks to the gates' generator state."""
import json
import os
import shutil

import pytest
import torch

import train
from datasets import step_image_ids
from engine.cli import parse_args
from methods.rcil import GATE_STATE_KEY, RCIL
from network import FAMILIES
from network.rcil import build_rcil_model
from utils.checkpoint import load_checkpoint_file


CROP = "49"


@pytest.fixture(scope="module")
def rcil_family():
    """The ``rcil`` family, until ``network/__init__.py`` registers it."""
    with pytest.MonkeyPatch.context() as patch:
        if "rcil" not in FAMILIES:
            patch.setitem(FAMILIES, "rcil", build_rcil_model)
        yield


# step 0 trains with batches of 8 (half the iterations of 4: the dual-branch model's cost is mostly per iteration)
STEP0 = ["--initial", "--batch_size", "8"]
# VOC 15-1 step 1 (6 images): 2 epochs of 1 iteration, so that an interruption can fall between them
VOC_STEP1 = ["--curr_step", "1", "--end_step", "1", "--train_epoch", "2"]


def argv(data_root, ckpt, dataset, task, *extra):
    """Flags later in ``extra`` win over the defaults here (argparse keeps the last)."""
    return ["--data_root", data_root, "--ckpt_dir", str(ckpt), "--method", "rcil", "--dataset", dataset,
            "--task", task, "--overlap", "--backbone", "resnet18", "--no_pretrained", "--crop_size", CROP,
            "--batch_size", "4", "--num_workers", "0", "--crop_val", "--val_batch_size", "8", "--train_epoch", "1",
            "--device", "cpu", *extra]


def step_dir(ckpt, task, step):
    return os.path.join(str(ckpt), "rcil", task, "overlap", f"step{step}")


def read_json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def final(ckpt, task, step):
    return load_checkpoint_file(os.path.join(step_dir(ckpt, task, step), "final.pth"))


def check_test_reproduces(data_root, ckpt, dataset, task, steps):
    train.run(parse_args(argv(data_root, ckpt, dataset, task, "--test")))
    for step in steps:
        trained = read_json(os.path.join(step_dir(ckpt, task, step), "results.json"))
        tested = read_json(os.path.join(str(ckpt), "rcil", task, "overlap", "eval", f"crop{CROP}", f"step{step}",
                                        "results.json"))
        assert tested["confusion_matrix"] == trained["confusion_matrix"], step
        assert sum(map(sum, trained["confusion_matrix"])) > 0


@pytest.fixture(scope="module")
def voc_run(tiny_voc, tmp_path_factory, rcil_family):
    """VOC 15-1 steps 0, 1 (two epochs: the uninterrupted run of the resume test) and 2."""
    ckpt = tmp_path_factory.mktemp("rcil_voc")
    for flags in (STEP0, VOC_STEP1, ["--curr_step", "2", "--end_step", "2"]):
        train.run(parse_args(argv(tiny_voc, ckpt, "voc", "15-1", *flags)))
    return ckpt


def test_voc_three_steps_and_test_reproduces_them(tiny_voc, voc_run):
    check_test_reproduces(tiny_voc, voc_run, "voc", "15-1", (0, 1, 2))
    merged_key = "body.mod3.block1.convs.conv2.bias"
    step0, step1, step2 = (final(voc_run, "15-1", t) for t in range(3))
    assert merged_key not in step0["model_state"] and merged_key in step1["model_state"]
    for checkpoint in (step1, step2):  # the merged norm layers are saved as the identity
        assert torch.equal(checkpoint["model_state"]["body.mod3.block1.convs.bn2.running_var"], torch.ones(128))
        assert torch.equal(checkpoint["model_state"]["head.map_bn.weight"], torch.ones(1024))
    # step 2 started from the merged step-1 weights: its conv2 is the merge of step 1's two branches
    assert not torch.equal(step2["model_state"][merged_key], step1["model_state"][merged_key])
    assert step2["hyper"]["pckd_factor"] == 0.01 and GATE_STATE_KEY in step2["method_state"]
    assert step2["metrics"]["convention"]["future_classes"] == "background"  # PLOP's label tables (PLOP dataset/voc.py)


def test_ade_two_steps_and_test_reproduces_them(tiny_ade, tmp_path, rcil_family):
    train.run(parse_args(argv(tiny_ade, tmp_path, "ade", "100-50", "--batch_size", "8")))  # 1 iteration at step 1
    check_test_reproduces(tiny_ade, tmp_path, "ade", "100-50", (0, 1))
    step1 = final(tmp_path, "100-50", 1)
    assert (step1["hyper"]["pckd_factor"], step1["hyper"]["pckd_last_factor"]) == (5e-6, 5e-7)
    assert len(step1["metrics"]["confusion_matrix"]) == 151
    assert step1["metrics"]["convention"]["ade_class0"] == "scored"  # PLOP/RCIL score ADE class 0 (PLOP dataset/ade.py)


class Interrupt(Exception):
    pass


def test_resume_is_exact_with_the_gates_generator(tiny_voc, voc_run, tmp_path, monkeypatch, rcil_family):
    killed, careless = tmp_path / "killed", tmp_path / "careless"
    shutil.copytree(step_dir(voc_run, "15-1", 0), step_dir(killed, "15-1", 0))
    per_epoch = len(step_image_ids("voc", tiny_voc, "15-1", 1, True)) // 4

    seen = []
    original = RCIL.loss

    def interrupted(self, outputs, teacher_outputs, batch, ctx):
        if len(seen) == per_epoch:  # the first iteration of the second epoch
            raise Interrupt()
        seen.append(1)
        return original(self, outputs, teacher_outputs, batch, ctx)

    monkeypatch.setattr(RCIL, "loss", interrupted)
    with pytest.raises(Interrupt):
        train.run(parse_args(argv(tiny_voc, killed, "voc", "15-1", *VOC_STEP1)))
    monkeypatch.setattr(RCIL, "loss", original)
    last = load_checkpoint_file(os.path.join(step_dir(killed, "15-1", 1), "last.pth"))
    assert last["epoch"] == 1 and GATE_STATE_KEY in last["method_state"]
    shutil.copytree(killed, careless)

    train.run(parse_args(argv(tiny_voc, killed, "voc", "15-1", *VOC_STEP1, "--resume")))
    a, b = final(voc_run, "15-1", 1), final(killed, "15-1", 1)  # uninterrupted (the shared run) and resumed
    assert torch.equal(a["method_state"][GATE_STATE_KEY], b["method_state"][GATE_STATE_KEY])
    for key, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][key]), key

    # the same resume without the gates' state draws other gates: the weights differ (the check above can fail)
    original_load = RCIL.load_state_dict
    monkeypatch.setattr(RCIL, "load_state_dict",
                        lambda self, state: original_load(self, {k: v for k, v in state.items()
                                                                 if k != GATE_STATE_KEY}))
    train.run(parse_args(argv(tiny_voc, careless, "voc", "15-1", *VOC_STEP1, "--resume")))
    c = final(careless, "15-1", 1)
    assert any(not torch.equal(value, c["model_state"][key]) for key, value in a["model_state"].items())
