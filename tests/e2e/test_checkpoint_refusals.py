"""End to end: a damaged checkpoint stops a step before anything is written; a step 1 adopts another method's step
0 only where the rule says (said in the log, recorded in the results) and --test accepts exactly what training
accepted; a refusal names the checkpoint and what it was trained with, never a flag the user did not give."""
import json
import os
import shutil
import sys

import pytest

from tests.helpers import REPO, assert_user_error, run_inline

SMALL = ["--task", "15-5", "--overlap", "--backbone", "resnet18", "--no_pretrained", "--crop_size", "49",
         "--batch_size", "4", "--num_workers", "0", "--crop_val", "--val_batch_size", "8", "--lr_policy", "poly",
         "--val_interval", "0", "--train_epoch", "1", "--subpath", "shared", "--device", "cpu", "--clean"]


def cmd(data_root, ckpt_dir, method, *extra):
    return [sys.executable, os.path.join(REPO, "train.py"), "--data_root", data_root, "--ckpt_dir", str(ckpt_dir),
            "--method", method, *SMALL, *extra]


def folder(ckpt_dir, step=None):
    root = os.path.join(str(ckpt_dir), "shared", "15-5", "overlap")
    return root if step is None else os.path.join(root, f"step{step}")


def snapshot(root):
    """Every file under ``root`` with its size and modification time."""
    found = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            stat = os.stat(path)
            found[path] = (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def mib_step0(tiny_voc, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("mib_step0")
    result = run_inline(cmd(tiny_voc, ckpt, "mib", "--initial"))
    assert result.returncode == 0, result.stderr
    return ckpt


@pytest.fixture(scope="module")
def barm_step0(tiny_voc, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("barm_step0")
    result = run_inline(cmd(tiny_voc, ckpt, "barm", "--initial"))
    assert result.returncode == 0, result.stderr
    return ckpt


def copy(ckpt, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(ckpt, target)
    return target


def test_a_step1_of_another_method_adopts_a_shared_step0_and_test_agrees(tiny_voc, mib_step0, tmp_path):
    ckpt = copy(mib_step0, tmp_path)
    trained = run_inline(cmd(tiny_voc, ckpt, "lwf", "--curr_step", "1"))
    assert trained.returncode == 0, trained.stderr
    assert "the step 0 of --method mib, which trains as --method lwf's does" in trained.stdout
    with open(os.path.join(folder(ckpt, 1), "results.json"), encoding="utf-8") as handle:
        started_from = json.load(handle)["started_from"]
    assert started_from["method"] == "mib" and started_from["step"] == 0
    assert started_from["path"] == os.path.abspath(os.path.join(folder(ckpt, 0), "final.pth"))
    tested = run_inline(cmd(tiny_voc, ckpt, "lwf", "--test"))  # step 0 (mib's) and step 1 (lwf's), as training accepted
    assert tested.returncode == 0, tested.stderr
    assert os.path.exists(os.path.join(folder(ckpt), "eval", "crop49", "step0", "results.json"))


@pytest.mark.parametrize("method", ["lwf-mc", "ewc", "plop"])
def test_a_step1_that_cannot_share_the_step0_is_refused_by_training_and_test(tiny_voc, mib_step0, tmp_path, method):
    ckpt = copy(mib_step0, tmp_path)
    before = snapshot(str(ckpt))
    path = os.path.join(folder(ckpt, 0), "final.pth")
    refused = run_inline(cmd(tiny_voc, ckpt, method, "--curr_step", "1"))
    assert_user_error(refused, path, "--method mib;", f"--method {method} cannot start from it")
    assert snapshot(str(ckpt)) == before  # nothing written
    tested = run_inline(cmd(tiny_voc, ckpt, method, "--test", "--curr_step", "0"))
    assert_user_error(tested, path, "--method mib;", f"--method {method} cannot start from it")


def test_mib_after_a_barm_step0_names_the_checkpoint_not_a_flag(tiny_voc, barm_step0, tmp_path):
    ckpt = copy(barm_step0, tmp_path)
    path = os.path.join(folder(ckpt, 0), "final.pth")
    for extra in ([], ["--resume"]):
        refused = run_inline(cmd(tiny_voc, ckpt, "mib", "--curr_step", "1", *extra))
        assert_user_error(refused, path, "--method barm;", "--method mib cannot start from it")
        assert "--model" not in refused.stderr
    refused = run_inline(cmd(tiny_voc, ckpt, "kproba", "--curr_step", "1"))  # KProBA needs its own step 0's prototypes
    assert_user_error(refused, path, "--method barm;", "--method kproba cannot start from it")


@pytest.mark.parametrize("method", ["mib", "barm"])
def test_a_bit_flipped_step0_is_refused_and_nothing_is_written(tiny_voc, mib_step0, barm_step0, tmp_path, method):
    ckpt = copy(mib_step0 if method == "mib" else barm_step0, tmp_path)
    trained = run_inline(cmd(tiny_voc, ckpt, method, "--curr_step", "1"))  # a finished step 1 that must stay untouched
    assert trained.returncode == 0, trained.stderr
    path = os.path.join(folder(ckpt, 0), "final.pth")
    data = bytearray(open(path, "rb").read())
    for i in range(16):
        data[len(data) // 2 + i] ^= 0xFF
    open(path, "wb").write(bytes(data))
    before = snapshot(str(ckpt))
    refused = run_inline(cmd(tiny_voc, ckpt, method, "--curr_step", "1"))
    assert_user_error(refused, path, "is damaged")
    assert snapshot(str(ckpt)) == before
    tested = run_inline(cmd(tiny_voc, ckpt, method, "--test"))
    assert_user_error(tested, path, "is damaged")
    assert snapshot(str(ckpt)) == before
