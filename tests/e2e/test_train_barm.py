"""End to end: train.py runs BARM on synthetic data (CPU, resnet18, 65-pixel crops): three steps, ``--test``
reproducing the metrics, what BARM's incremental step did, and a step without pseudo-labels."""
import json
import os

import torch

from tests.helpers import copy_run, eval_results, run_inline, step_dir, train_cmd, weights
from utils.checkpoint import load_checkpoint_file


def test_three_steps_then_test_reproduces_the_metrics(tiny_voc, step0, tmp_path):
    ckpt = copy_run(step0, tmp_path)
    result = run_inline(train_cmd(tiny_voc, ckpt, "--curr_step", "1", "--end_step", "2", "--train_epoch", "1"))
    assert result.returncode == 0, result.stderr
    assert "weights identical" not in result.stdout  # single process: no replica check
    trained = {}
    for step in range(3):
        folder = step_dir(ckpt, step)
        assert os.path.exists(os.path.join(folder, "final.pth"))
        assert not os.path.exists(os.path.join(folder, "last.pth"))
        with open(os.path.join(folder, "results.json")) as handle:
            trained[step] = json.load(handle)
        assert os.path.exists(os.path.join(folder, "per_class.csv"))
        checkpoint = load_checkpoint_file(os.path.join(folder, "final.pth"))
        assert checkpoint["classes"] == [[*range(16)], [16], [17]][:step + 1]
        assert checkpoint["metrics"]["Mean IoU"] == trained[step]["Mean IoU"]
        assert set(checkpoint) >= {"model_state", "epoch", "iteration", "method_state", "args", "hyper", "best_score",
                                   "run_id", "parent_id"}
        assert "optimizer_state" not in checkpoint  # only last.pth needs the optimisation state
    assert all(not k.startswith("module.") for k in weights(os.path.join(step_dir(ckpt, 2), "final.pth")))
    check_barm_incremental_step(ckpt, result.stdout)
    assert trained[2]["summary"]["mIoU_new"] is not None and len(trained[2]["Class IoU"]) == 18
    with open(os.path.join(str(ckpt), "barm", "15-1", "overlap", "summary.csv")) as handle:
        assert [line.split(",")[0] for line in handle.read().splitlines()] == ["step", "0", "1", "2"]

    before = {step: open(os.path.join(step_dir(ckpt, step), "results.json")).read() for step in range(3)}
    tested = run_inline(train_cmd(tiny_voc, ckpt, "--test"))
    assert tested.returncode == 0, tested.stderr
    for step in range(3):
        again = eval_results(ckpt, step)
        assert again["confusion_matrix"] == trained[step]["confusion_matrix"]
        assert open(os.path.join(step_dir(ckpt, step), "results.json")).read() == before[step]  # untouched
        assert again["Mean IoU"] == trained[step]["Mean IoU"] and again["summary"] == trained[step]["summary"]
    one = run_inline(train_cmd(tiny_voc, ckpt, "--test", "--curr_step", "1"))
    assert one.returncode == 0 and f"test mIoU {100 * trained[1]['Mean IoU']:.2f}" in one.stdout


def check_barm_incremental_step(ckpt, log):
    """What BARM's step 1 (--pseudo --bn_freeze, --lr 0.01) really did, read from the checkpoints
    (BARM trainer/trainer.py::Trainer.init_models, Trainer.init_ckpt)."""
    before = load_checkpoint_file(os.path.join(step_dir(ckpt, 0), "final.pth"))["model_state"]
    after = load_checkpoint_file(os.path.join(step_dir(ckpt, 1), "final.pth"))
    bn_keys = [k for k in before if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")]
    bn_affine = [k[:-len("running_mean")] + name for k in before if k.endswith("running_mean")
                 for name in ("weight", "bias")]
    assert len(bn_keys) > 50 and len(bn_affine) > 30
    for key in bn_keys + bn_affine:  # every BN of the step-0 model: statistics and affine frozen
        assert torch.equal(before[key], after["model_state"][key]), key
    ear_bn = "classifier.ear.0.1."  # the new ear: conv and affine from head_pre, statistics at identity
    assert torch.equal(after["model_state"][ear_bn + "running_mean"], torch.zeros(256))
    assert torch.equal(after["model_state"][ear_bn + "running_var"], torch.ones(256))
    assert int(after["model_state"][ear_bn + "num_batches_tracked"]) == 0
    assert torch.equal(after["model_state"][ear_bn + "weight"], before["classifier.head_pre.1.weight"])
    assert not torch.equal(after["model_state"]["classifier.aspp.convs.0.0.weight"],
                           before["classifier.aspp.convs.0.0.weight"])  # the rest trains
    with open(os.path.join(step_dir(ckpt, 1), "config.json")) as handle:
        groups = json.load(handle)["param_groups"]
    # new head and ear at --lr (BARM's published 0.001 at t > 0), the others at BARM's fixed rates
    assert [g["lr"] for g in groups] == [1e-3, 1e-3, 1e-3, 1e-4, 1e-4, 1e-4, 1e-4]
    assert groups[4]["parameters"] == 0  # no old ears at step 1
    assert "teacher: yes" in log and "tri_bg" in log and "gkd" in log


def test_barm_without_pseudo_trains_without_teacher_and_auxiliary_losses(tiny_voc, step0, tmp_path):
    ckpt = copy_run(step0, tmp_path)
    cmd = train_cmd(tiny_voc, ckpt, "--curr_step", "1", "--end_step", "1", "--train_epoch", "1", "--no_pseudo")
    result = run_inline(cmd)
    assert result.returncode == 0, result.stderr
    assert "teacher: no" in result.stdout and "tri_bg" not in result.stdout and "std" in result.stdout
