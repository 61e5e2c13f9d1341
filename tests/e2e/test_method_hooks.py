"""End to end: the trainer honours every method hook: order of calls, before-step passes, method state across
steps and through --resume, memory (replace and concat), validation policy and best-weight selection, previous
checkpoints of another layout, --compile. Test methods are registered for the duration of a test only."""
import json
import os
import shutil

import pytest
import torch

import engine.step
import train
from datasets import step_image_ids
from engine.cli import parse_args
from methods import METHODS
from methods.base import MemoryUse
from methods.finetune import FineTune
from utils.checkpoint import load_checkpoint_file
from utils.errors import UserError


def common(data_root, ckpt, method, *extra):
    return ["--data_root", data_root, "--ckpt_dir", str(ckpt), "--method", method, "--task", "15-1", "--overlap",
            "--backbone", "resnet18", "--no_pretrained", "--crop_size", "49", "--batch_size", "4",
            "--num_workers", "0", "--crop_val", "--val_batch_size", "8", "--lr_policy", "poly", "--lr", "0.01",
            "--val_interval", "0", "--device", "cpu", "--random_seed", "1", *extra]


def step_dir(ckpt, method, step):
    return os.path.join(str(ckpt), method, "15-1", "overlap", f"step{step}")


def final(ckpt, method, step):
    return load_checkpoint_file(os.path.join(step_dir(ckpt, method, step), "final.pth"))


# ---- a method that records the order of hook calls and keeps state -------------------------------------


class Interrupt(Exception):
    pass


class Recorder(FineTune):
    """FT that records hook calls, keeps state that changes inside a step (iterations seen, a class
    histogram from its before-step pass) and lets that state shape its loss."""
    name = "recorder"
    uses_gradients = True
    calls = []
    stop_at = None  # raise Interrupt at this iteration of step 1 (simulates a kill)
    validate_every = None
    best = None  # what selects_best returns

    def __init__(self, hyper=None, dataset="voc"):
        super().__init__(hyper, dataset)
        self.state = {"seen": 0, "hist": None, "carried": None}

    def _call(self, name, *detail):
        type(self).calls.append((name, *detail))

    def build_network(self, spec, classes_per_step, pretrained=None, layout_step=None):
        self._call("build_network", len(classes_per_step), layout_step)
        return super().build_network(spec, classes_per_step, pretrained, layout_step)

    def needs_teacher(self, ctx):
        self._call("needs_teacher", ctx.step)
        return ctx.step > 0

    def prepare_student(self, model, previous, ctx):
        self._call("prepare_student", ctx.step, previous.num_classes)

    def configure(self, model, ctx):
        self._call("configure", ctx.step)

    def param_groups(self, model, ctx, lr):
        self._call("param_groups", ctx.step)
        return super().param_groups(model, ctx, lr)

    def before_step(self, model, teacher, data, ctx):
        self._call("before_step", ctx.step)
        hist = torch.zeros(ctx.num_classes + 1, dtype=torch.float64)
        for batch in data.train_batches():
            assert batch.images.dtype == torch.float32 and batch.labels.dtype == torch.int64
            labels = batch.labels.clamp(max=ctx.num_classes)
            hist += torch.bincount(labels.flatten(), minlength=ctx.num_classes + 1).double()
        self.state["hist"] = hist

    def set_train_mode(self, model, ctx):
        self._call("set_train_mode", ctx.step)
        super().set_train_mode(model, ctx)

    def loss(self, outputs, teacher_outputs, batch, ctx):
        self._call("loss", ctx.step)
        if ctx.step > 0:
            assert teacher_outputs is not None
        if type(self).stop_at is not None and ctx.step == 1 and self.state["seen"] == type(self).stop_at:
            raise Interrupt()
        self.state["seen"] += 1
        terms = super().loss(outputs, teacher_outputs, batch, ctx)
        weight = 1.0 + 0.01 * (self.state["seen"] % 5) + 1e-6 * float(self.state["hist"][0])
        terms["total"] = terms["total"] * weight
        return terms

    def after_backward(self, model, ctx, finite):
        self._call("after_backward", ctx.step)
        return None

    def validation_due(self, iteration, per_epoch, total, val_interval):
        every = type(self).validate_every
        return every is not None and iteration % every == 0

    def selects_best(self, ctx, select_best):
        return type(self).best if select_best is None else select_best

    def end_of_step(self, model, ctx):
        self._call("end_of_step", ctx.step)

    def predict(self, logits, size):
        self._call("predict")
        return super().predict(logits, size)

    def step_files(self):
        return {"recorder.json": {"seen": self.state["seen"]}}

    def state_dict(self):
        return {"seen": self.state["seen"], "hist": self.state["hist"], "carried": self.state["carried"]}

    def load_state_dict(self, state):
        self._call("load_state_dict")
        self.state = dict(state)

    def load_previous_state(self, state, ctx):
        self._call("load_previous_state", ctx.step)
        self.state = {"seen": 0, "hist": None, "carried": state.get("seen")}


@pytest.fixture
def recorder(monkeypatch):
    monkeypatch.setitem(METHODS, "recorder", Recorder)
    monkeypatch.setattr(Recorder, "calls", [])
    return Recorder


def first_index(calls, name, step=None):
    return next(i for i, call in enumerate(calls) if call[0] == name and (step is None or step in call[1:2]))


def test_order_of_hook_calls_and_state_carried_to_the_next_step(tiny_voc, tmp_path, recorder):
    train.run(parse_args(common(tiny_voc, tmp_path, "recorder", "--end_step", "1", "--train_epoch", "1")))
    calls = recorder.calls
    # step 1: student and previous model built with step 0's layout, state, surgery, teacher, freezing, groups,
    # the pass, training with the gradient hook, end of step, then the evaluation model with step 1's layout
    step1 = calls[first_index(calls, "load_previous_state") - 2:]
    names = [c[0] for c in step1]
    assert step1[0] == ("build_network", 2, 0) and step1[1] == ("build_network", 1, 0)
    order = ["load_previous_state", "prepare_student", "needs_teacher", "configure", "param_groups",
             "before_step", "loss", "after_backward", "end_of_step", "predict"]
    positions = [names.index(name) for name in order]
    assert positions == sorted(positions), list(zip(order, positions))
    assert ("build_network", 2, 1) in step1[names.index("end_of_step"):]  # evaluation model
    assert names.count("loss") == names.count("after_backward") > 0
    step0 = final(tmp_path, "recorder", 0)
    step1_final = final(tmp_path, "recorder", 1)
    assert step1_final["method_state"]["carried"] == step0["method_state"]["seen"] > 0
    with open(os.path.join(step_dir(tmp_path, "recorder", 1), "recorder.json")) as handle:
        assert json.load(handle) == {"seen": step1_final["method_state"]["seen"]}


def test_resume_restores_method_state_and_skips_the_passes(tiny_voc, tmp_path, recorder, monkeypatch):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train.run(parse_args(common(tiny_voc, straight, "recorder", "--initial", "--train_epoch", "1")))
    shutil.copytree(straight, killed)  # one step 0 for both: step 1 is what is interrupted
    args = ["--curr_step", "1", "--end_step", "1", "--train_epoch", "3"]
    train.run(parse_args(common(tiny_voc, straight, "recorder", *args)))
    per_epoch = len(step_image_ids("voc", tiny_voc, "15-1", 1, True)) // 4

    monkeypatch.setattr(Recorder, "stop_at", per_epoch)  # at the first iteration of the second epoch
    with pytest.raises(Interrupt):
        train.run(parse_args(common(tiny_voc, killed, "recorder", *args)))
    last = load_checkpoint_file(os.path.join(step_dir(killed, "recorder", 1), "last.pth"))
    assert last["epoch"] == 1 and last["method_state"]["seen"] == per_epoch
    monkeypatch.setattr(Recorder, "stop_at", None)
    recorder.calls.clear()
    train.run(parse_args(common(tiny_voc, killed, "recorder", *args, "--resume")))
    names = [c[0] for c in recorder.calls]
    assert "before_step" not in names and "load_state_dict" in names  # state from last.pth, no second pass
    a, b = final(straight, "recorder", 1), final(killed, "recorder", 1)
    assert a["method_state"]["seen"] == b["method_state"]["seen"] == 3 * per_epoch
    assert torch.equal(a["method_state"]["hist"], b["method_state"]["hist"])
    for key, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][key]), key


@pytest.mark.parametrize("mode", ["replace", "concat"])
def test_memory_samples_join_the_batches(tiny_voc, tmp_path, recorder, monkeypatch, mode):
    memory = step_image_ids("voc", tiny_voc, "15-1", 0, True)[:5]
    seen = []
    monkeypatch.setattr(Recorder, "memory", lambda self, ctx: MemoryUse(tuple(memory), mode)
                        if self.state["carried"] is not None else None)
    original = Recorder.loss

    def loss(self, outputs, teacher_outputs, batch, ctx):
        if ctx.step == 1:
            seen.append((int(batch.memory.sum()), [i for i, m in zip(batch.ids, batch.memory.tolist()) if m]))
        return original(self, outputs, teacher_outputs, batch, ctx)

    monkeypatch.setattr(Recorder, "loss", loss)
    train.run(parse_args(common(tiny_voc, tmp_path, "recorder", "--end_step", "1", "--train_epoch", "2")))
    current = len(step_image_ids("voc", tiny_voc, "15-1", 1, True))
    assert seen and all(set(ids) <= set(memory) for _, ids in seen)
    if mode == "replace":
        assert all(count == 2 for count, _ in seen)  # half of every batch of 4
        assert len(seen) == 2 * (current // 4)
    else:
        assert len(seen) == 2 * ((current + len(memory)) // 4)  # the memory joins the training set
        assert sum(count for count, _ in seen) > 0 and any(count == 0 for count, _ in seen)


def test_validation_policy_and_best_selection(tiny_voc, tmp_path, recorder, monkeypatch):
    monkeypatch.setattr(Recorder, "validate_every", 4)
    monkeypatch.setattr(Recorder, "best", True)
    scores = iter([0.1, 0.5, 0.2, 0.3, 0.4, 0.05] * 10)
    monkeypatch.setattr(engine.step, "selection_score", lambda iou, ctx: next(scores))
    train.run(parse_args(common(tiny_voc, tmp_path, "recorder", "--initial", "--train_epoch", "2")))
    checkpoint = final(tmp_path, "recorder", 0)
    assert checkpoint["selected"] == {"iteration": 8, "score": 0.5}  # the second validation scored best
    assert not os.path.exists(os.path.join(step_dir(tmp_path, "recorder", 0), "best.pth"))
    with open(os.path.join(step_dir(tmp_path, "recorder", 0), "results.json")) as handle:
        assert json.load(handle)["Mean IoU"] == checkpoint["metrics"]["Mean IoU"]

    other = tmp_path / "last"
    train.run(parse_args(common(tiny_voc, other, "recorder", "--initial", "--train_epoch", "1", "--select_last")))
    assert "selected" not in final(other, "recorder", 0)


def test_best_selection_without_validation_is_refused_before_training(tiny_voc, tmp_path, recorder, monkeypatch):
    monkeypatch.setattr(Recorder, "best", True)
    with pytest.raises(UserError, match="never validates"):
        train.run(parse_args(common(tiny_voc, tmp_path, "recorder", "--initial", "--train_epoch", "1")))
    assert not list(tmp_path.rglob("*.pth"))


def test_compile_wraps_the_training_forward(tiny_voc, tmp_path, recorder, monkeypatch):
    compiled = []

    def fake_compile(model, **kwargs):  # torch.compile itself takes minutes on the CPU: check the wiring
        compiled.append(type(model).__name__)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    train.run(parse_args(common(tiny_voc, tmp_path, "recorder", "--initial", "--train_epoch", "1", "--compile")))
    assert len(compiled) == 1  # the training forward (the plain module evaluates)
