"""End-to-end CPU runs of SSUL, SSUL-M and KProBA on the tiny synthetic VOC and ADE folders.

Per dataset (module-scoped, shared by the tests): SSUL steps 0-2; SSUL-M (``--mem_size 4``) steps 1-2 from SSUL's
step 0; KProBA steps 0-2. VOC runs 2-1 (step 0: 18 images, steps 1-2: 10-11) and ADE 5-5 (11, 10, 14): three
steps with few images, so that the chains stay fast. Every run is in-process (``train.run``).
"""
import json
import os
import shutil

import pytest
import torch

import train
from datasets import SALIENCY_DIR, step_image_ids
from engine.cli import parse_args
from methods.kproba import KPROBA_RFF_DIM, KProBA
from methods.ssul import SSUL
from utils.checkpoint import load_checkpoint_file
from utils.errors import UserError
from utils.tasks import get_task


TASKS = {"voc": ("tiny_voc", "2-1"), "ade": ("tiny_ade", "5-5")}
MEMORY = 4
LAST_STEP = 2


def argv(root, ckpt, dataset, task, method, *extra):
    return ["--data_root", root, "--dataset", dataset, "--ckpt_dir", str(ckpt), "--method", method, "--task", task,
            "--overlap", "--backbone", "resnet18", "--no_pretrained", "--crop_size", "49", "--batch_size", "4",
            "--num_workers", "0", "--crop_val", "--val_batch_size", "8", "--lr_policy", "poly", "--device", "cpu",
            *extra]


def run(*args):
    train.run(parse_args(list(args)))


class Chains:
    """The runs of one dataset: ``folder(subpath, step)``, ``final(subpath, step)``."""

    def __init__(self, dataset, root, task, ckpt, epochs):
        self.dataset, self.root, self.task, self.ckpt, self.epochs = dataset, root, task, ckpt, epochs
        self.steps = get_task(dataset, task)

    def argv(self, method, *extra, ckpt=None):
        return argv(self.root, ckpt or self.ckpt, self.dataset, self.task, method, *extra)

    def folder(self, subpath, step, ckpt=None):
        return os.path.join(str(ckpt or self.ckpt), subpath, self.task, "overlap", f"step{step}")

    def final(self, subpath, step, ckpt=None):
        return load_checkpoint_file(os.path.join(self.folder(subpath, step, ckpt), "final.pth"))

    def ssulm_argv(self, *extra, ckpt=None):
        return self.argv("ssul", "--subpath", "ssulm", "--mem_size", str(MEMORY), "--val_interval", "1",
                         "--train_epoch", str(self.epochs), *extra, ckpt=ckpt)

    def kproba_argv(self, *extra, ckpt=None):
        return self.argv("kproba", "--select_last", "--val_interval", "0", "--train_epoch",
                         str(self.epochs), *extra, ckpt=ckpt)


@pytest.fixture(scope="module", params=sorted(TASKS))
def chains(request, tmp_path_factory):
    dataset = request.param
    fixture, task = TASKS[dataset]
    # two epochs where the VOC resume tests interrupt a step after its first epoch
    c = Chains(dataset, request.getfixturevalue(fixture), task, tmp_path_factory.mktemp(f"chains_{dataset}"),
               epochs=2 if dataset == "voc" else 1)
    run(*c.argv("ssul", "--initial", "--train_epoch", "1", "--val_interval", "1"))
    run(*c.argv("ssul", "--curr_step", "1", "--end_step", str(LAST_STEP), "--train_epoch", "1", "--val_interval", "1"))
    c.ssul_step0 = os.path.join(c.folder("ssul", 0), "final.pth")
    run(*c.ssulm_argv("--curr_step", "1", "--end_step", str(LAST_STEP), "--prev_ckpt", c.ssul_step0))
    run(*c.argv("kproba", "--initial", "--train_epoch", "1", "--val_interval", "0", "--select_last"))
    run(*c.kproba_argv("--curr_step", "1", "--end_step", str(LAST_STEP)))
    return c


def read_json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.mark.parametrize("subpath,method,first", [("ssul", "ssul", 0), ("ssulm", "ssul", 1), ("kproba", "kproba", 0)])
def test_three_steps_and_test_reproduces_every_step(chains, subpath, method, first):
    run(*chains.argv(method, "--subpath", subpath, "--test"))
    for step in range(first, LAST_STEP + 1):
        trained = read_json(os.path.join(chains.folder(subpath, step), "results.json"))
        root = os.path.join(str(chains.ckpt), subpath, chains.task, "overlap")
        tested = read_json(os.path.join(root, "eval", "crop49", f"step{step}", "results.json"))
        assert trained["method"] == method and trained["step"] == step
        assert tested["confusion_matrix"] == trained["confusion_matrix"], (subpath, step)
        assert tested["Mean IoU"] == trained["Mean IoU"]
        assert len(trained["Class IoU"]) == sum(len(s) for s in chains.steps[:step + 1])


def test_ssul_steps_are_their_best_validated_weights(chains):
    for step in range(LAST_STEP + 1):
        checkpoint = chains.final("ssul", step)
        assert checkpoint["selected"]["iteration"] >= 1  # SSUL: every step's result is its best-validated weights
        assert checkpoint["hyper"]["unknown"] and checkpoint["method_state"] == {}
        assert not os.path.exists(os.path.join(chains.folder("ssul", step), "memory.json"))
    # the unknown head: channel 0 unknown, 1 background, then the classes (one more output than classes)
    state = chains.final("ssul", LAST_STEP)["model_state"]
    n0, n1, n2 = (len(s) for s in chains.steps[:3])
    assert [state[f"classifier.head.{i}.3.bias"].numel() for i in range(5)] == [1, 1, n0 - 1, n1, n2]


def test_ssulm_memory_in_the_step_folder_and_the_checkpoint(chains):
    steps = chains.steps
    previous_memory = None
    for step in (1, 2):
        state = chains.final("ssulm", step)["method_state"]
        written = read_json(os.path.join(chains.folder("ssulm", step), "memory.json"))
        assert written["step"] == step == state["memory_step"]
        assert written["memory_list"] == state["memory"]["memory_list"] == sorted(written["memory_list"])
        assert written["memory_candidates"] == state["memory"]["memory_candidates"]
        ids = written["memory_list"]
        assert len(ids) == len(set(ids)) == MEMORY
        # chosen among step t-1's training images (at step 2 also step 1's memory), each with an old class
        pool = set(step_image_ids(chains.dataset, chains.root, chains.task, step - 1, True))
        if previous_memory is not None:
            pool |= set(previous_memory)
        assert set(ids) <= pool
        n_old = sum(len(s) for s in steps[:step])
        assert all(classes and set(classes) <= set(range(1, n_old)) for _, classes in written["memory_candidates"])
        previous_memory = ids


def test_kproba_prototypes_carried_in_the_checkpoints(chains):
    n0, n1, n2 = (len(s) for s in chains.steps[:3])
    protos = [chains.final("kproba", step)["method_state"]["prototypes"] for step in range(LAST_STEP + 1)]
    assert sorted(protos[0]) == list(range(n0))
    assert sorted(protos[1]) == list(range(n0 + n1)) and sorted(protos[2]) == list(range(n0 + n1 + n2))
    assert all(p.shape == (KPROBA_RFF_DIM,) and p.dtype == torch.float32 for p in protos[2].values())
    for c in range(1, n0 + n1):  # classes of earlier steps are not updated any more (the background is)
        assert torch.equal(protos[2][c], protos[1][c])
        if c < n0:
            assert torch.equal(protos[1][c], protos[0][c])
    assert not torch.equal(protos[1][0], protos[0][0])  # the background is blended with momentum 0.9
    assert "pseudo_thresh" not in chains.final("kproba", 1)["hyper"]  # dead in KProBA: not a flag


class Interrupt(Exception):
    pass


def interrupt_at(monkeypatch, cls, call):
    """Make ``cls.loss`` raise at its ``call``-th call (0-based; ``counter["stop"] = None``: never) and count the
    before-step passes."""
    original, original_before = cls.loss, cls.before_step
    counter = {"loss": 0, "before_step": 0, "stop": call}

    def loss(self, outputs, teacher_outputs, batch, ctx):
        counter["loss"] += 1
        if counter["loss"] - 1 == counter["stop"]:
            raise Interrupt()
        return original(self, outputs, teacher_outputs, batch, ctx)

    def before_step(self, model, teacher, data, ctx):
        counter["before_step"] += 1
        return original_before(self, model, teacher, data, ctx)

    monkeypatch.setattr(cls, "loss", loss)
    monkeypatch.setattr(cls, "before_step", before_step)
    return counter


@pytest.mark.parametrize("method", ["ssulm", "kproba"])
def test_resume_restores_memory_and_prototypes(chains, tmp_path, monkeypatch, method):
    if chains.dataset != "voc":
        pytest.skip("resume is checked on the VOC chains (two epochs per incremental step)")
    cls = SSUL if method == "ssulm" else KProBA
    make = chains.ssulm_argv if method == "ssulm" else chains.kproba_argv
    start = chains.ssul_step0 if method == "ssulm" else os.path.join(chains.folder("kproba", 0), "final.pth")
    per_epoch = len(step_image_ids(chains.dataset, chains.root, chains.task, 1, True)) // 4
    killed = make("--curr_step", "1", "--end_step", "1", "--prev_ckpt", start, ckpt=tmp_path)
    counter = interrupt_at(monkeypatch, cls, per_epoch)  # the first iteration of the second epoch
    with pytest.raises(Interrupt):
        run(*killed)
    assert counter["before_step"] == 1
    last = load_checkpoint_file(os.path.join(chains.folder(method, 1, tmp_path), "last.pth"))
    assert last["epoch"] == 1
    counter.update(stop=None, before_step=0)
    run(*killed, "--resume")
    assert counter["before_step"] == 0  # the memory / prototypes come from last.pth, not from a new pass
    straight, resumed = chains.final(method, 1), chains.final(method, 1, tmp_path)
    state_a, state_b = straight["method_state"], resumed["method_state"]
    assert state_a.keys() == state_b.keys()
    if method == "ssulm":
        assert state_a["memory"] == state_b["memory"] and len(state_a["memory"]["memory_list"]) == MEMORY
    else:
        assert state_a["prototypes"].keys() == state_b["prototypes"].keys()
        assert all(torch.equal(state_a["prototypes"][c], state_b["prototypes"][c]) for c in state_a["prototypes"])
    for key, value in straight["model_state"].items():
        assert torch.equal(value, resumed["model_state"][key]), key


def test_voc_without_saliency_maps_stops_before_training(tiny_voc, tmp_path):
    root = str(tmp_path / "VOC2012")
    shutil.copytree(tiny_voc, root, ignore=shutil.ignore_patterns(SALIENCY_DIR, ".ciss_cache"))
    ckpt = tmp_path / "ckpt"
    with pytest.raises(UserError) as error:
        run(*argv(root, ckpt, "voc", "2-1", "ssul", "--initial", "--train_epoch", "1", "--val_interval", "1"))
    message = str(error.value)
    assert "\n" not in message and os.path.join(root, SALIENCY_DIR) in message and "SSUL's README" in message
    assert not list(ckpt.rglob("*.pth"))
