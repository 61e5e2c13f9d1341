"""End to end: ``--logger tensorboard wandb`` in WandB's offline mode (no network). What WandB wrote is read back
from its ``.wandb`` file: the scalars equal tensorboard's (name, iteration, value), the configuration is
``config.json``'s, the summary table is ``summary.csv``'s rows and the figure is the report's; ``--resume``
continues the step's WandB run; without the wandb package, ``--logger wandb`` stops with one line."""
import glob
import json
import os
import signal
import struct
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO, assert_user_error, copy_run, read_csv, run, step_dir, train_cmd

WANDB_HEADER = b":W&B\xe1\xbe\x00"  # the .wandb file's header, then LevelDB-log records (wandb sdk/internal)
BLOCK = 32768
CHUNK_HEADER = 7  # crc u32, length u16, type u8
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
LOGGERS = ["--logger", "tensorboard", "wandb"]
STEP1 = ["--curr_step", "1", "--end_step", "1", "--print_interval", "1"]


def wandb_env(tmp_path):
    """WandB offline, every folder of its under ``tmp_path``; none of the user's WandB settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    folders = {name: str(tmp_path / name.lower()) for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR",
                                                               "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")}
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    return {**env, **folders, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def wandb_records(path):
    """The records of a ``.wandb`` file (``wandb_internal_pb2.Record``), in order."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as handle:
        data = handle.read()
    assert data[:len(WANDB_HEADER)] == WANDB_HEADER
    position, pending = len(WANDB_HEADER), b""
    while position < len(data):
        left = BLOCK - position % BLOCK
        if left < CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + CHUNK_HEADER])
        chunk = data[position + CHUNK_HEADER:position + CHUNK_HEADER + length]
        position += CHUNK_HEADER + length
        if kind in (FULL, FIRST):
            pending = chunk
        elif kind in (MIDDLE, LAST):
            pending += chunk
        else:  # zero padding
            continue
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def offline_runs(wandb_dir):
    """``(run folder, records)`` of every offline WandB run under ``wandb_dir``, oldest first."""
    folders = sorted(glob.glob(os.path.join(str(wandb_dir), "wandb", "offline-run-*")), key=os.path.getmtime)
    return [(folder, list(wandb_records(glob.glob(os.path.join(folder, "run-*.wandb"))[0]))) for folder in folders]


def history(records):
    """``{(name, step): value}`` of the logged values (WandB's own ``_``-keys left out), and the run record."""
    values, run_record, config = {}, None, {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {}
            for item in record.history.item:  # a table's or an image's fields come one by one, as nested keys
                path = [item.key] if item.key else list(item.nested_key)
                place = items
                for name in path[:-1]:
                    place = place.setdefault(name, {})
                place[path[-1]] = json.loads(item.value_json)
            step = items.pop("_step")
            values.update({(name, step): value for name, value in items.items() if not name.startswith("_")})
        elif kind == "run":
            run_record = record.run
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return values, run_record, config


def tensorboard_scalars(folder):
    """``{(tag, step): value}`` of every events file in ``folder`` (TFRecord framing: length u64, its crc u32,
    data, its crc u32), and the purge steps (a resumed run's first iteration) in file order."""
    from tensorboardX.proto import event_pb2

    scalars, purges = {}, []
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*")), key=os.path.getmtime):
        with open(path, "rb") as handle:
            data = handle.read()
        position = 0
        while position < len(data):
            (length,) = struct.unpack("<Q", data[position:position + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[position + 12:position + 12 + length])
            position += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                purges.append(event.step)
                scalars = {key: v for key, v in scalars.items() if key[1] < event.step}
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars[(value.tag, event.step)] = value.simple_value
    return scalars, purges


def numeric(values):
    return {key: v for key, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@pytest.fixture(scope="module")
def wandb_run(tiny_voc, step0, tmp_path_factory):
    """Step 1 trained with tensorboard and WandB (offline), validating every epoch."""
    pytest.importorskip("wandb")
    tmp_path = tmp_path_factory.mktemp("wandb")
    ckpt = copy_run(step0, tmp_path)
    env = wandb_env(tmp_path)
    result = run(train_cmd(tiny_voc, ckpt, *STEP1, "--train_epoch", "1", "--val_interval", "1", *LOGGERS), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = offline_runs(env["WANDB_DIR"])
    assert len(runs) == 1
    return ckpt, runs[0]


def test_wandb_scalars_equal_tensorboards(wandb_run):
    ckpt, (_, records) = wandb_run
    logged, _, _ = history(records)
    tensorboard, _ = tensorboard_scalars(step_dir(ckpt, 1))
    ours = {key: np.float32(v) for key, v in numeric(logged).items()}  # tensorboard keeps float32
    assert {name for name, _ in tensorboard} >= {"lr", "loss/total", "speed/images_per_s", "val/mIoU_new",
                                                 "test/mIoU", "test/hIoU"}
    assert ours == {key: np.float32(v) for key, v in tensorboard.items()}


def test_wandb_run_is_the_steps_with_its_configuration_table_and_figure(wandb_run):
    ckpt, (folder, records) = wandb_run
    logged, run_record, config = history(records)
    with open(os.path.join(step_dir(ckpt, 1), "results.json"), encoding="utf-8") as handle:
        results = json.load(handle)
    with open(os.path.join(step_dir(ckpt, 1), "config.json"), encoding="utf-8") as handle:
        config_file = json.load(handle)
    assert run_record.run_id == results["run_id"] and run_record.display_name == "step1"
    assert run_record.run_group == os.path.join("barm", "15-1", "overlap") and run_record.project == "ciss"
    assert {key: config[key] for key in config_file} == config_file
    assert config["args"]["logger"] == ["tensorboard", "wandb"]

    last = max(step for _, step in logged)
    table = logged[("summary", last)]
    with open(os.path.join(folder, "files", table["path"]), encoding="utf-8") as handle:
        content = json.load(handle)
    rows = read_csv(os.path.join(str(ckpt), "barm", "15-1", "overlap", "summary.csv"))
    assert content["columns"] == list(rows[0])
    assert [row[:4] for row in content["data"]] == [
        [int(row["step"]), int(row["n_classes"]), pytest.approx(float(row["mIoU"]), abs=1e-6),
         pytest.approx(float(row["mIoU_old"]), abs=1e-6)] for row in rows]
    figure = logged[("mIoU_per_step", last)]
    with Image.open(os.path.join(folder, "files", figure["path"])) as image:
        assert image.size == (1200, 450) == (figure["width"], figure["height"])


def test_resume_continues_the_steps_wandb_run(tiny_voc, step0, tmp_path):
    pytest.importorskip("wandb")
    ckpt = copy_run(step0, tmp_path)
    env = wandb_env(tmp_path)
    cmd = train_cmd(tiny_voc, ckpt, *STEP1, "--train_epoch", "4", *LOGGERS)
    last, final = os.path.join(step_dir(ckpt, 1), "last.pth"), os.path.join(step_dir(ckpt, 1), "final.pth")
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.exists(last) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    assert process.wait() == 143
    assert os.path.exists(last) and not os.path.exists(final), "the run should have been stopped mid-step"

    resumed = run(cmd + ["--resume"], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming step 1" in resumed.stdout
    with open(os.path.join(step_dir(ckpt, 1), "results.json"), encoding="utf-8") as handle:
        run_id = json.load(handle)["run_id"]
    (_, stopped), (_, continued) = offline_runs(env["WANDB_DIR"])
    assert history(stopped)[1].run_id == history(continued)[1].run_id == run_id
    # the resumed run logs from the iteration after last.pth's on, as the resumed tensorboard file does
    tensorboard, purges = tensorboard_scalars(step_dir(ckpt, 1))
    logged = {key: np.float32(v) for key, v in numeric(history(continued)[0]).items()}
    assert len(purges) == 1 and min(step for _, step in logged) == purges[0] + 1
    assert logged == {key: np.float32(v) for key, v in tensorboard.items() if key[1] > purges[0]}


def test_logger_wandb_without_the_package_is_one_line(tiny_voc, tmp_path):
    blocker = tmp_path / "blocked" / "wandb"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named wandb (blocked by the test)')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])}
    ckpt = tmp_path / "ckpt"
    result = run(train_cmd(tiny_voc, ckpt, "--initial", "--train_epoch", "1", "--logger", "wandb"), env=env)
    assert_user_error(result, "--logger wandb needs the wandb package: pip install wandb")
    assert not ckpt.exists()
