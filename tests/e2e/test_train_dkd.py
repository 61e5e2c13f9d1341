"""End-to-end DKD and DKD-M runs on the synthetic VOC and ADE folders (CPU, resnet18, 49-pixel crops): two steps,
``--test`` reproducing every step's confusion matrix, the memory's files, and an interrupted DKD-M step resumed
to the same weights and memory (DKD train_voc.py, utils/memory.py::memory_sampling_balanced)."""
import json
import os

import pytest
import torch

import train
from datasets import step_image_ids
from engine.cli import parse_args
from methods.dkd import DKD
from utils.checkpoint import load_checkpoint_file


MEM_SIZE = 4
# dataset -> (fixture, task, --lr_policy of DKD's recipes, epochs of the DKD-M step)
LAYOUTS = {"voc": ("tiny_voc", "15-1", "poly", 2), "ade": ("tiny_ade", "100-50", "warm_poly", 1)}


def argv(dataset, data_root, ckpt, *extra):
    _, task, policy, _ = LAYOUTS[dataset]
    return ["--method", "dkd", "--dataset", dataset, "--data_root", data_root, "--ckpt_dir", str(ckpt),
            "--task", task, "--overlap", "--backbone", "resnet18", "--no_pretrained", "--crop_size", "49",
            "--batch_size", "4", "--num_workers", "0", "--crop_val", "--val_batch_size", "8", "--device", "cpu",
            "--lr", "0.001", "--lr_policy", policy, "--no_amp", *extra]


def folder(ckpt, dataset, step, *sub):
    return os.path.join(str(ckpt), "dkd", LAYOUTS[dataset][1], "overlap", *sub, f"step{step}")


def read_json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def final(ckpt, dataset, step):
    return load_checkpoint_file(os.path.join(folder(ckpt, dataset, step), "final.pth"))


class Interrupt(Exception):
    """Simulates a killed run (an exception the trainer does not handle)."""


def dkdm_step1(dataset, data_root, ckpt, prev, *extra):
    """Step 1 of DKD-M from the DKD run's step 0 (the step-0 training of DKD and DKD-M is the same)."""
    epochs = str(LAYOUTS[dataset][3])
    return argv(dataset, data_root, ckpt, "--curr_step", "1", "--end_step", "1", "--train_epoch", epochs,
                "--mem_size", str(MEM_SIZE), "--prev_ckpt", prev, *extra)


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def runs(request, tmp_path_factory):
    """Per layout: DKD steps 0-1 (1 epoch each) and DKD-M step 1 from DKD's step 0, each followed by --test."""
    dataset = request.param
    data_root = request.getfixturevalue(LAYOUTS[dataset][0])
    dkd_ckpt, dkdm_ckpt = tmp_path_factory.mktemp(f"dkd_{dataset}"), tmp_path_factory.mktemp(f"dkdm_{dataset}")
    # step 0 in 4 iterations (batches of a quarter of the images): the run's cost is per iteration here
    train.run(parse_args(argv(dataset, data_root, dkd_ckpt, "--initial", "--train_epoch", "1", "--batch_size",
                              str(len(step_image_ids(dataset, data_root, LAYOUTS[dataset][1], 0, True)) // 4))))
    train.run(parse_args(argv(dataset, data_root, dkd_ckpt, "--curr_step", "1", "--end_step", "1",
                              "--train_epoch", "1")))
    prev = os.path.join(folder(dkd_ckpt, dataset, 0), "final.pth")
    train.run(parse_args(dkdm_step1(dataset, data_root, dkdm_ckpt, prev)))
    for ckpt in (dkd_ckpt, dkdm_ckpt):
        train.run(parse_args(argv(dataset, data_root, ckpt, "--test")))
    return {"dataset": dataset, "data_root": data_root, "dkd": dkd_ckpt, "dkdm": dkdm_ckpt, "prev": prev}


def test_two_steps_and_test_reproduces_every_step(runs):
    dataset = runs["dataset"]
    for name, steps in (("dkd", (0, 1)), ("dkdm", (1,))):
        for step in steps:
            trained = read_json(os.path.join(folder(runs[name], dataset, step), "results.json"))
            tested = read_json(os.path.join(folder(runs[name], dataset, step, "eval", "crop49"), "results.json"))
            assert tested["confusion_matrix"] == trained["confusion_matrix"], (name, step)
            assert tested["summary"] == trained["summary"]
            assert trained["convention"]["exclude_absent"] is False and trained["method"] == "dkd"
            n = len(trained["Class IoU"])
            assert n == (101 if dataset == "ade" else 16) + step * (50 if dataset == "ade" else 1)
            if step:
                assert trained["summary"]["hIoU"] is not None
    step1 = final(runs["dkd"], dataset, 1)
    assert step1["hyper"]["pos_weight"] == (35.0 if dataset == "ade" else 1.0) and step1["hyper"]["mem_size"] == 0
    assert not os.path.exists(os.path.join(folder(runs["dkd"], dataset, 1), "memory.json"))  # DKD: no memory


def test_frozen_bn_at_step_1(runs):
    dataset = runs["dataset"]
    before = final(runs["dkd"], dataset, 0)["model_state"]
    after = final(runs["dkd"], dataset, 1)["model_state"]
    bn = [k for k in before if k.endswith(("running_mean", "running_var", "bn1.weight", "bn2.bias"))]
    assert len(bn) > 40
    for key in bn:
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["classifier.cls.1.weight"], after["classifier.cls.1.weight"])  # the rest trains


def test_dkdm_memory_files_and_state(runs):
    dataset, ckpt = runs["dataset"], runs["dkdm"]
    checkpoint = final(ckpt, dataset, 1)
    memory = checkpoint["method_state"]["memories"]["step_1"]
    assert len(memory["memory_list"]) == MEM_SIZE and memory["memory_list"] == sorted(memory["memory_list"])
    previous_list = step_image_ids(dataset, runs["data_root"], LAYOUTS[dataset][1], 0, True)
    assert set(memory["memory_list"]) <= set(previous_list)  # chosen from step 0's training images
    assert all(classes for _, classes in memory["memory_candidates"])  # each holds an old class
    assert read_json(os.path.join(folder(ckpt, dataset, 1), "memory.json")) == {"step_1": memory}
    config = read_json(os.path.join(folder(ckpt, dataset, 1), "config.json"))
    current = len(step_image_ids(dataset, runs["data_root"], LAYOUTS[dataset][1], 1, True))
    epochs = LAYOUTS[dataset][3]
    assert config["total_iterations"] == epochs * ((current + MEM_SIZE) // 4)  # the memory joins the training set


def test_dkdm_resume_gives_the_same_weights_and_memory(runs, tmp_path, monkeypatch):
    if runs["dataset"] != "voc":
        pytest.skip("one layout is enough for the resume path")
    dataset, data_root = runs["dataset"], runs["data_root"]
    per_epoch = final(runs["dkdm"], dataset, 1)["iteration"] // LAYOUTS[dataset][3]
    calls = []
    original = DKD.loss

    def interrupted(self, outputs, teacher_outputs, batch, ctx):
        calls.append(ctx.step)
        if len(calls) > per_epoch:  # the first iteration of the second epoch
            raise Interrupt()
        return original(self, outputs, teacher_outputs, batch, ctx)

    monkeypatch.setattr(DKD, "loss", interrupted)
    with pytest.raises(Interrupt):
        train.run(parse_args(dkdm_step1(dataset, data_root, tmp_path, runs["prev"])))
    last = load_checkpoint_file(os.path.join(folder(tmp_path, dataset, 1), "last.pth"))
    assert last["epoch"] == 1 and len(last["method_state"]["memories"]["step_1"]["memory_list"]) == MEM_SIZE
    monkeypatch.setattr(DKD, "loss", original)
    selections = []
    monkeypatch.setattr(DKD, "before_step", lambda self, *args: selections.append(args))
    train.run(parse_args(dkdm_step1(dataset, data_root, tmp_path, runs["prev"], "--resume")))
    assert not selections  # the memory comes from last.pth, not from a second selection
    straight, resumed = final(runs["dkdm"], dataset, 1), final(tmp_path, dataset, 1)
    assert resumed["method_state"] == straight["method_state"]
    for key, value in straight["model_state"].items():
        assert torch.equal(value, resumed["model_state"][key]), key
    memory_json = os.path.join(folder(tmp_path, dataset, 1), "memory.json")
    assert read_json(memory_json) == read_json(os.path.join(folder(runs["dkdm"], dataset, 1), "memory.json"))
