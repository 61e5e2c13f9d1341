"""End to end: train.py's one-line user errors (status 2) for missing or foreign checkpoints, bad command lines,
missing data, corrupt images found by a loader worker, unwritable folders, CUDA without CUDA."""
import os
import shutil

import pytest
import torch

from tests.helpers import assert_user_error, run, run_inline, step_dir, train_cmd


def test_missing_previous_checkpoint(tiny_voc, tmp_path):
    result = run_inline(train_cmd(tiny_voc, tmp_path, "--curr_step", "1"))
    assert_user_error(result, "previous checkpoint", "step0", "does not exist")


def test_checkpoint_of_another_task(tiny_voc, step0, tmp_path):
    other = os.path.join(step_dir(step0, 0), "final.pth")
    result = run_inline(train_cmd(tiny_voc, tmp_path, "--curr_step", "1", "--prev_ckpt", other, "--task", "10-1"))
    assert_user_error(result, other, "task 15-1", "task 10-1")


def test_unreadable_checkpoint(tiny_voc, tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint at all")
    result = run_inline(train_cmd(tiny_voc, tmp_path, "--curr_step", "1", "--prev_ckpt", str(bad)))
    assert_user_error(result, str(bad), "is not a torch checkpoint")


def test_truncated_checkpoint_with_ckpt_alias(tiny_voc, step0, tmp_path):
    source = os.path.join(step_dir(step0, 0), "final.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(source, "rb").read()[:4096])
    result = run_inline(train_cmd(tiny_voc, tmp_path, "--curr_step", "1", "--ckpt", str(truncated)))
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
    assert_user_error(run_inline(train_cmd(tiny_voc, tmp_path, *extra)), *fragments)


def test_missing_data_root(tmp_path):
    result = run(train_cmd(str(tmp_path / "nowhere"), tmp_path, "--initial"))  # as a user runs it
    assert_user_error(result, str(tmp_path / "nowhere"), "VOC2012")
    assert not os.path.exists(tmp_path / "barm")  # nothing written half-way


def test_test_without_checkpoints(tiny_voc, tmp_path):
    assert_user_error(run_inline(train_cmd(tiny_voc, tmp_path, "--test")), "no checkpoint to test")


def test_corrupt_image_found_by_a_loader_worker(tiny_voc, tmp_path):
    data = tmp_path / "VOC2012"
    shutil.copytree(tiny_voc, data, ignore=shutil.ignore_patterns(".ciss_cache"))
    image = data / "JPEGImages" / "2012_000003.jpg"
    image.write_bytes(b"garbage")
    cmd = train_cmd(str(data), tmp_path / "ckpt", "--initial", "--train_epoch", "1")
    cmd[cmd.index("--num_workers") + 1] = "1"
    assert_user_error(run_inline(cmd), str(image), "cannot be decoded", "expected a JPEG or PNG image")
    assert not list((tmp_path / "ckpt").rglob("*.pth"))


def test_unwritable_checkpoint_folder(tiny_voc, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_user_error(run_inline(train_cmd(tiny_voc, blocker, "--initial", "--train_epoch", "1")), "--ckpt_dir")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda(tiny_voc, tmp_path):
    assert_user_error(run_inline(train_cmd(tiny_voc, tmp_path, "--initial", "--device", "cuda")), "CUDA is not available")
