"""End to end, ``--step0_from``: a 15-1 run after a 15-5 run on the same data trains no step 0, its step 0 is the
15-5 run's (the same file, the same digest) and its step 1 starts from those weights and says so; a step 0 that
differs is refused with one line naming the difference, and nothing is written."""
import hashlib
import json
import os

import pytest

from tests.helpers import assert_user_error, run_inline, step_dir, train_cmd


def _digest(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


@pytest.fixture(scope="module")
def after_15_5(tiny_voc, tmp_path_factory):
    """A run folder holding a finished 15-5 step 0 (1 epoch), trained because no step 0 matched."""
    ckpt = tmp_path_factory.mktemp("shared")
    result = run_inline(train_cmd(tiny_voc, ckpt, "--task", "15-5", "--initial", "--train_epoch", "1", "--step0_from", "auto"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no finished step 0 under" in result.stdout + result.stderr
    return ckpt


def test_15_1_after_15_5_shares_its_step_0(tiny_voc, after_15_5):
    source = step_dir(after_15_5, 0, task="15-5")
    result = run_inline(train_cmd(tiny_voc, after_15_5, "--task", "15-1", "--end_step", "1", "--train_epoch", "1",
                           "--step0_from", "auto"))
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "not trained again" in log and "step 0 epoch" not in log and "step 1 epoch 1/1" in log
    own = step_dir(after_15_5, 0, task="15-1")
    assert _digest(os.path.join(own, "final.pth")) == _digest(os.path.join(source, "final.pth"))
    with open(os.path.join(source, "results.json"), encoding="utf-8") as handle:
        source_results = json.load(handle)
    with open(os.path.join(own, "results.json"), encoding="utf-8") as handle:
        shared = json.load(handle)
    assert shared["shared_from"] == {"path": os.path.abspath(source), "run_id": source_results["run_id"]}
    assert shared["confusion_matrix"] == source_results["confusion_matrix"]
    with open(os.path.join(step_dir(after_15_5, 1, task="15-1"), "results.json"), encoding="utf-8") as handle:
        started = json.load(handle)["started_from"]
    assert started["path"] == os.path.abspath(os.path.join(own, "final.pth"))
    assert started["run_id"] == source_results["run_id"] and started["shared_from"]["path"] == os.path.abspath(source)
    # the run's summary follows the chain through the shared step 0, and --test accepts both steps
    with open(os.path.join(os.path.dirname(own), "summary.csv"), encoding="utf-8") as handle:
        assert [line.split(",")[0] for line in handle.read().splitlines()[1:]] == ["0", "1"]
    tested = run_inline(train_cmd(tiny_voc, after_15_5, "--task", "15-1", "--test"))
    assert tested.returncode == 0, tested.stderr[-3000:]


def test_a_step_0_that_differs_is_refused_naming_the_difference(tiny_voc, after_15_5, tmp_path):
    source = os.path.dirname(step_dir(after_15_5, 0, task="15-5"))
    result = run_inline(train_cmd(tiny_voc, tmp_path, "--task", "15-1", "--end_step", "1", "--train_epoch", "1",
                           "--random_seed", "5", "--step0_from", source))
    assert_user_error(result, f"--step0_from {source}: that step 0 was trained with --random_seed 1, this run's"
                              " step 0 has --random_seed 5")
    assert not os.path.exists(step_dir(tmp_path, 0))
    # a folder without a step 0
    result = run_inline(train_cmd(tiny_voc, tmp_path, "--task", "15-1", "--step0_from", str(tmp_path)))
    assert_user_error(result, f"--step0_from {tmp_path}: no step0/final.pth there")
