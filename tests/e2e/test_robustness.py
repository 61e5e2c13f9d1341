"""End to end: nothing lost, nothing hung, --test as written: interruptions, locks, leftovers, results of
finished steps, --test with the recorded settings, adopted models, refused resumes, logs."""
import glob
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

import train
from datasets import step_image_ids
from engine.cli import parse_args
from methods.barm import BARM
from tests.helpers import REPO, assert_user_error, copy_run, eval_results, run, run_inline, step_dir, train_cmd
from utils.errors import UserError
from utils.runlock import LOCK_NAME


@pytest.fixture(scope="module")
def trained(tiny_voc, tmp_path_factory):
    """Step 0 (1 epoch) then step 1 (1 epoch) of BARM, trained once; tests copy the folder."""
    ckpt = tmp_path_factory.mktemp("trained")
    result = run_inline(train_cmd(tiny_voc, ckpt, "--end_step", "1", "--train_epoch", "1", "--print_interval", "1"))
    assert result.returncode == 0, result.stderr
    return ckpt


def wait_for(path, process, seconds=300):
    deadline = time.time() + seconds
    while not os.path.exists(path) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.exists(path), "the run should have got that far"


@pytest.mark.parametrize("sig, status, name", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_interruption_ends_with_one_line_and_the_resume_command(tiny_voc, tmp_path, sig, status, name):
    cmd = train_cmd(tiny_voc, tmp_path, "--initial", "--train_epoch", "50")
    # SIGINT as a terminal delivers it, even when the tests run in a background job (which ignores SIGINT)
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    last = os.path.join(step_dir(tmp_path, 0), "last.pth")
    wait_for(last, process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status, (name, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("interrupted:") and last in lines[0] and "--resume" in lines[0]
    assert not os.path.exists(os.path.join(str(tmp_path), "barm", "15-1", "overlap", LOCK_NAME))  # released


def test_a_failing_run_leaves_a_finished_step_untouched(tiny_voc, trained, tmp_path):
    ckpt = copy_run(trained, tmp_path)
    data = tmp_path / "VOC2012"
    shutil.copytree(tiny_voc, data, ignore=shutil.ignore_patterns(".ciss_cache"))
    image = data / "JPEGImages" / "2012_000003.jpg"
    image.write_bytes(b"")
    folder = step_dir(ckpt, 0)
    before = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}
    assert_user_error(run_inline(train_cmd(str(data), ckpt, "--initial", "--train_epoch", "1")), str(image), "empty",
                      "expected a JPEG or PNG image")
    assert {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)} == before


def test_two_runs_on_one_folder(tiny_voc, tmp_path):
    first = subprocess.Popen(train_cmd(tiny_voc, tmp_path, "--initial", "--train_epoch", "50"), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = os.path.join(str(tmp_path), "barm", "15-1", "overlap", LOCK_NAME)
    try:
        wait_for(lock, first)
        second = run_inline(train_cmd(tiny_voc, tmp_path, "--initial", "--train_epoch", "1"))
        assert_user_error(second, "another run", f"pid {first.pid}", lock)
    finally:
        first.kill()
        first.wait()


def test_a_stale_lock_is_replaced(tiny_voc, tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folder = os.path.join(str(tmp_path), "barm", "15-1", "overlap")
    os.makedirs(folder)
    with open(os.path.join(folder, LOCK_NAME), "w") as handle:
        json.dump({"pid": gone.pid, "host": os.uname().nodename, "started": "earlier"}, handle)
    result = run_inline(train_cmd(tiny_voc, tmp_path, "--initial", "--train_epoch", "1"))
    assert result.returncode == 0, result.stderr
    assert f"process {gone.pid} is gone" in result.stdout
    assert not os.path.exists(os.path.join(folder, LOCK_NAME))


def test_leftover_temporary_files_are_removed(tiny_voc, trained, tmp_path):
    ckpt = copy_run(trained, tmp_path)
    leftover = os.path.join(step_dir(ckpt, 1), ".last.pth.999999.tmp")
    with open(leftover, "wb") as handle:
        handle.write(b"half a checkpoint")
    result = run_inline(train_cmd(tiny_voc, ckpt, "--curr_step", "1", "--end_step", "1", "--train_epoch", "1"))
    assert result.returncode == 0, result.stderr
    assert not os.path.exists(leftover) and "left by an interrupted run" in result.stdout


def test_summary_follows_one_run_and_test_writes_beside(tiny_voc, trained, tmp_path):
    ckpt = copy_run(trained, tmp_path)
    summary = os.path.join(str(ckpt), "barm", "15-1", "overlap", "summary.csv")
    assert [line.split(",")[0] for line in open(summary).read().splitlines()] == ["step", "0", "1"]
    # re-training step 0 makes step 1's results stale: the summary holds step 0 only
    assert run_inline(train_cmd(tiny_voc, ckpt, "--initial", "--train_epoch", "1", "--random_seed", "5")).returncode == 0
    assert [line.split(",")[0] for line in open(summary).read().splitlines()] == ["step", "0"]
    results = open(os.path.join(step_dir(ckpt, 0), "results.json")).read()
    assert run_inline(train_cmd(tiny_voc, ckpt, "--test", "--curr_step", "0")).returncode == 0
    assert open(os.path.join(step_dir(ckpt, 0), "results.json")).read() == results  # --test writes elsewhere
    assert os.path.exists(os.path.join(str(ckpt), "barm", "15-1", "overlap", "eval", "crop65", "summary.csv"))


def test_the_readme_test_line_uses_the_recorded_settings(tiny_voc, trained):
    # no crop, model or backbone flags: the checkpoints' own settings (crop 65, centre crop, resnet18)
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--data_root", tiny_voc, "--ckpt_dir", str(trained),
           "--task", "15-1", "--overlap", "--num_workers", "0", "--test"]
    result = run_inline(cmd)
    assert result.returncode == 0, result.stderr
    for step in (0, 1):
        with open(os.path.join(step_dir(trained, step), "results.json")) as handle:
            assert eval_results(trained, step)["confusion_matrix"] == json.load(handle)["confusion_matrix"]
    # an explicit flag wins, and is said
    explicit = run_inline(cmd + ["--crop_size", "49", "--curr_step", "0"])
    assert explicit.returncode == 0 and "evaluating with --crop_size 49 as asked" in explicit.stdout
    assert eval_results(trained, 0, name="crop49")["evaluation"]["crop_size"] == 49


def test_a_step_continues_the_recorded_model(tiny_voc, trained, tmp_path):
    ckpt = copy_run(trained, tmp_path)
    cmd = train_cmd(tiny_voc, ckpt, "--curr_step", "1", "--end_step", "1", "--train_epoch", "1")
    without = [a for a in cmd if a not in ("--backbone", "resnet18")]
    result = run(without)
    assert result.returncode == 0 and "trained with --backbone resnet18: continuing with it" in result.stdout
    assert_user_error(run_inline(cmd[:cmd.index("resnet18")] + ["resnet50"] + cmd[cmd.index("resnet18") + 1:]),
                      "--backbone resnet18", "--backbone resnet50")
    assert_user_error(run_inline(cmd + ["--output_stride", "8"]), "--output_stride 16", "--output_stride 8")


class Interrupt(Exception):
    pass


def interrupted_step1(tiny_voc, ckpt, monkeypatch, *extra):
    """Train step 1 for 3 epochs in this process, stopped at the first iteration of its second epoch; returns
    the command line (without the interpreter and script)."""
    stop = len(step_image_ids("voc", tiny_voc, "15-1", 1, True)) // 4 + 1
    calls = []
    original = BARM.loss

    def loss(self, *args):
        calls.append(1)
        if len(calls) == stop:
            raise Interrupt()
        return original(self, *args)

    monkeypatch.setattr(BARM, "loss", loss)
    argv = train_cmd(tiny_voc, ckpt, "--curr_step", "1", "--end_step", "1", "--train_epoch", "3",
                     "--print_interval", "1", *extra)[2:]
    with pytest.raises(Interrupt):
        train.run(parse_args(argv))
    monkeypatch.setattr(BARM, "loss", original)
    return argv


def event_steps(path):
    """``(step, kind)`` of every event in a tensorboard events file (kind: summary, session_log, ...)."""
    from tensorboardX.proto import event_pb2
    events = []
    with open(path, "rb") as handle:
        while True:
            header = handle.read(12)
            if len(header) < 12:
                return events
            length = struct.unpack("<Q", header[:8])[0]
            event = event_pb2.Event.FromString(handle.read(length))
            handle.read(4)
            events.append((event.step, event.WhichOneof("what")))


def test_resume_refuses_changed_settings_and_continues_the_logs(tiny_voc, trained, tmp_path, monkeypatch):
    ckpt = copy_run(trained, tmp_path)
    argv = interrupted_step1(tiny_voc, ckpt, monkeypatch)
    last = os.path.join(step_dir(ckpt, 1), "last.pth")
    assert os.path.exists(last)
    for flag, value in (("--lr", "0.02"), ("--train_epoch", "4"), ("--w_fd", "1.0"), ("--random_seed", "2")):
        changed = list(argv)
        if flag in changed:
            changed[changed.index(flag) + 1] = value
        else:
            changed += [flag, value]
        with pytest.raises(UserError, match=f"--resume: {last} was trained with {flag} "):
            train.run(parse_args(changed + ["--resume"]))
    train.run(parse_args(argv + ["--resume"]))
    files = sorted(glob.glob(os.path.join(step_dir(ckpt, 1), "events.out.tfevents.*")), key=os.path.getmtime)
    assert len(files) == 3  # the fixture's run of step 1, the interrupted one, the resumed one
    resumed = event_steps(files[2])
    per_epoch = max(step for step, _ in event_steps(files[1]))
    assert (per_epoch, "session_log") in resumed  # tensorboard drops older events from the resumed iteration on
    assert min(step for step, kind in resumed if kind == "summary") == per_epoch + 1
    log = open(os.path.join(str(ckpt), "barm", "15-1", "overlap", "train.log")).read()
    assert "resuming step 1" in log and "1 new class [16]" in log and "3 epochs" in log


def test_bad_data_root_is_reported_before_any_weights_are_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--data_root", str(tmp_path / "nowhere"), "--ckpt_dir",
           str(tmp_path / "ckpt"), "--initial", "--backbone", "resnet18", "--device", "cpu"]
    assert_user_error(run(cmd, env={**os.environ, "TORCH_HOME": str(tmp_path / "torch")}), "nowhere", "VOC2012")
    assert not os.path.exists(tmp_path / "torch") and not os.path.exists(tmp_path / "ckpt")


def test_keep_only_the_last_checkpoint(tiny_voc, trained, tmp_path):
    ckpt = copy_run(trained, tmp_path)
    result = run_inline(train_cmd(tiny_voc, ckpt, "--curr_step", "2", "--end_step", "2", "--train_epoch", "1",
                           "--keep_checkpoints", "last"))
    assert result.returncode == 0, result.stderr
    assert [os.path.exists(os.path.join(step_dir(ckpt, s), "final.pth")) for s in range(3)] == [False, False, True]
    assert all(os.path.exists(os.path.join(step_dir(ckpt, s), "results.json")) for s in range(3))
    resumed = run_inline(train_cmd(tiny_voc, ckpt, "--end_step", "2", "--train_epoch", "1", "--resume"))
    assert resumed.returncode == 0 and resumed.stdout.count("is finished") == 3
