"""End-to-end runs of train.py on synthetic data (CPU, resnet18, 65-pixel crops)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import (REPO, assert_same_weights, assert_user_error, copy_run, eval_results, run, step_dir, train_cmd,
                     weights)
from utils.checkpoint import load_checkpoint_file


@pytest.fixture(scope="module")
def step0(tiny_voc, tmp_path_factory):
    """Step 0 trained once (1 epoch); tests copy its folder."""
    ckpt = tmp_path_factory.mktemp("step0")
    result = run(train_cmd(tiny_voc, ckpt, "--initial", "--train_epoch", "1"))
    assert result.returncode == 0, result.stderr
    return ckpt


def test_three_steps_then_test_reproduces_the_metrics(tiny_voc, step0, tmp_path):
    ckpt = copy_run(step0, tmp_path)
    result = run(train_cmd(tiny_voc, ckpt, "--curr_step", "1", "--end_step", "2", "--train_epoch", "1"))
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
    tested = run(train_cmd(tiny_voc, ckpt, "--test"))
    assert tested.returncode == 0, tested.stderr
    for step in range(3):
        again = eval_results(ckpt, step)
        assert again["confusion_matrix"] == trained[step]["confusion_matrix"]
        assert open(os.path.join(step_dir(ckpt, step), "results.json")).read() == before[step]  # untouched
        assert again["Mean IoU"] == trained[step]["Mean IoU"] and again["summary"] == trained[step]["summary"]
    one = run(train_cmd(tiny_voc, ckpt, "--test", "--curr_step", "1"))
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
    assert [g["lr"] for g in groups] == [0.01, 0.01, 1e-3, 1e-4, 1e-4, 1e-4, 1e-4]
    assert groups[4]["parameters"] == 0  # no old ears at step 1
    assert "teacher: yes" in log and "tri_bg" in log and "gkd" in log


def test_barm_without_pseudo_trains_without_teacher_and_auxiliary_losses(tiny_voc, step0, tmp_path):
    ckpt = copy_run(step0, tmp_path)
    cmd = train_cmd(tiny_voc, ckpt, "--curr_step", "1", "--end_step", "1", "--train_epoch", "1")
    cmd.remove("--pseudo")
    result = run(cmd)
    assert result.returncode == 0, result.stderr
    assert "teacher: no" in result.stdout and "tri_bg" not in result.stdout and "std" in result.stdout


def test_resume_after_a_kill_is_bitwise_identical(tiny_voc, step0, tmp_path):
    epochs = ["--train_epoch", "8", "--curr_step", "1", "--end_step", "1"]
    straight = copy_run(step0, tmp_path / "a")
    assert run(train_cmd(tiny_voc, straight, *epochs)).returncode == 0

    killed = copy_run(step0, tmp_path / "b")
    last, final = os.path.join(step_dir(killed, 1), "last.pth"), os.path.join(step_dir(killed, 1), "final.pth")
    process = subprocess.Popen(train_cmd(tiny_voc, killed, *epochs), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.exists(last) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert os.path.exists(last) and not os.path.exists(final), "the run should have been killed mid-step"
    assert load_checkpoint_file(last)["epoch"] < 8

    resumed = run(train_cmd(tiny_voc, killed, *epochs, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming step 1" in resumed.stdout
    assert_same_weights(weights(final), weights(os.path.join(step_dir(straight, 1), "final.pth")))


def test_resume_skips_finished_steps(tiny_voc, step0, tmp_path):
    ckpt = copy_run(step0, tmp_path)
    result = run(train_cmd(tiny_voc, ckpt, "--initial", "--resume", "--train_epoch", "1"))
    assert result.returncode == 0 and "step 0 is finished" in result.stdout


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


def test_missing_previous_checkpoint(tiny_voc, tmp_path):
    result = run(train_cmd(tiny_voc, tmp_path, "--curr_step", "1"))
    assert_user_error(result, "previous checkpoint", "step0", "does not exist")


def test_checkpoint_of_another_task(tiny_voc, step0, tmp_path):
    other = os.path.join(step_dir(step0, 0), "final.pth")
    result = run(train_cmd(tiny_voc, tmp_path, "--curr_step", "1", "--prev_ckpt", other, "--task", "10-1"))
    assert_user_error(result, other, "task 15-1", "task 10-1")


def test_unreadable_checkpoint(tiny_voc, tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint at all")
    result = run(train_cmd(tiny_voc, tmp_path, "--curr_step", "1", "--prev_ckpt", str(bad)))
    assert_user_error(result, str(bad), "is not a torch checkpoint")


def test_truncated_checkpoint_with_ckpt_alias(tiny_voc, step0, tmp_path):
    source = os.path.join(step_dir(step0, 0), "final.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(source, "rb").read()[:4096])
    result = run(train_cmd(tiny_voc, tmp_path, "--curr_step", "1", "--ckpt", str(truncated)))
    assert_user_error(result, str(truncated))


@pytest.mark.parametrize("extra, fragments", [
    (["--task", "15-9x"], ["unknown voc task"]),
    (["--curr_step", "9"], ["step 9 is out of range", "0..5"]),
    (["--batch_size", "0"], ["--batch_size must be at least 1"]),
    (["--gpu_id", "0"], ["unrecognized arguments: --gpu_id"]),
    (["--method", "ft", "--pseudo"], ["unrecognized arguments: --pseudo"]),
    (["--batch_size", "64", "--initial"], ["fewer than --batch_size 64"]),
])
def test_bad_command_lines(tiny_voc, tmp_path, extra, fragments):
    assert_user_error(run(train_cmd(tiny_voc, tmp_path, *extra)), *fragments)


def test_missing_data_root(tmp_path):
    result = run(train_cmd(str(tmp_path / "nowhere"), tmp_path, "--initial"))
    assert_user_error(result, str(tmp_path / "nowhere"), "VOC2012")
    assert not os.path.exists(tmp_path / "barm")  # nothing written half-way


def test_test_without_checkpoints(tiny_voc, tmp_path):
    assert_user_error(run(train_cmd(tiny_voc, tmp_path, "--test")), "no checkpoint to test")


def test_corrupt_image_found_by_a_loader_worker(tiny_voc, tmp_path):
    data = tmp_path / "VOC2012"
    shutil.copytree(tiny_voc, data, ignore=shutil.ignore_patterns(".ciss_cache"))
    image = data / "JPEGImages" / "2012_000003.jpg"
    image.write_bytes(b"garbage")
    cmd = train_cmd(str(data), tmp_path / "ckpt", "--initial", "--train_epoch", "1")
    cmd[cmd.index("--num_workers") + 1] = "1"
    assert_user_error(run(cmd), str(image), "cannot be decoded", "expected a JPEG or PNG image")
    assert not list((tmp_path / "ckpt").rglob("*.pth"))


def test_unwritable_checkpoint_folder(tiny_voc, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_user_error(run(train_cmd(tiny_voc, blocker, "--initial", "--train_epoch", "1")), "--ckpt_dir")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda(tiny_voc, tmp_path):
    assert_user_error(run(train_cmd(tiny_voc, tmp_path, "--initial", "--device", "cuda")), "CUDA is not available")
