"""End to end: train.py killed mid-step resumes to bitwise-identical weights; finished steps are skipped."""
import os
import signal
import subprocess
import time

from tests.helpers import REPO, assert_same_weights, copy_run, run_inline, step_dir, train_cmd, weights
from utils.checkpoint import load_checkpoint_file


def test_resume_after_a_kill_is_bitwise_identical(tiny_voc, step0, tmp_path):
    epochs = ["--train_epoch", "8", "--curr_step", "1", "--end_step", "1"]
    straight = copy_run(step0, tmp_path / "a")
    assert run_inline(train_cmd(tiny_voc, straight, *epochs)).returncode == 0

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

    resumed = run_inline(train_cmd(tiny_voc, killed, *epochs, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming step 1" in resumed.stdout
    assert_same_weights(weights(final), weights(os.path.join(step_dir(straight, 1), "final.pth")))


def test_resume_skips_finished_steps(tiny_voc, step0, tmp_path):
    ckpt = copy_run(step0, tmp_path)
    result = run_inline(train_cmd(tiny_voc, ckpt, "--initial", "--resume", "--train_epoch", "1"))
    assert result.returncode == 0 and "step 0 is finished" in result.stdout
