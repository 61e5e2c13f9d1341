"""The published protocol end to end: ``--dry_run`` prints every step's resolved settings and writes nothing, and
checkpoints in the reference repositories' layouts evaluate with ``--test --test_ckpt`` and start the next step."""
import json
import os
import sys

import torch

from engine.context import StepContext
from engine.models import model_spec
from methods import get_method
from tests.engine.test_reference_checkpoints import dkd_file, mib_file
from tests.helpers import REPO, assert_user_error, run, run_inline
from utils.tasks import get_task

SMALL = ["--backbone", "resnet18", "--no_pretrained", "--num_workers", "0", "--device", "cpu"]


def train(data_root, ckpt_dir, *flags):
    return [sys.executable, os.path.join(REPO, "train.py"), "--data_root", data_root, "--ckpt_dir", str(ckpt_dir),
            "--task", "15-1", "--overlap", *SMALL, *flags]


def files_under(*roots):
    return sorted(os.path.join(folder, name) for root in roots for folder, _, names in os.walk(root) for name in names)


def test_dry_run_prints_every_step_and_writes_nothing(tiny_voc, tmp_path):
    before = files_under(tiny_voc)
    result = run_inline(train(tiny_voc, tmp_path / "ckpt", "--method", "mib", "--global_batch", "2", "--dry_run"))
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    assert [s["step"] for s in described["steps"]] == [0, 1, 2, 3, 4, 5]
    step0, step1 = described["steps"][:2]
    assert step0["published"]["crop_size"] == {"value": 512, "source": "published: MiB README, VOC (2 GPUs x batch"
                                                                        " 12, lr 0.01 then 0.001, 30 epochs, fp32)"}
    assert step0["settings"]["global_batch"]["source"] == "command line"
    assert (step0["settings"]["lr"]["value"], step1["settings"]["lr"]["value"]) == (0.01, 0.001)
    assert step0["global_batch"] == 2 and step0["batch_per_process"] == 2
    assert step0["training_images"] > 0 and step0["total_iterations"] == 30 * step0["iterations_per_epoch"]
    assert step1["param_groups"] and all({"lr", "weight_decay", "parameters"} <= set(g) for g in step1["param_groups"])
    assert {d["flag"] for d in described["deviations"]} >= {"select_best", "sync_gradients", "bn_chunks"}
    assert not os.path.exists(tmp_path / "ckpt") and files_under(tiny_voc) == before


def test_dry_run_refuses_a_global_batch_that_does_not_divide_over_the_processes(tiny_voc, tmp_path):
    result = run(train(tiny_voc, tmp_path, "--method", "mib", "--dry_run"), env={**os.environ, "WORLD_SIZE": "5"})
    assert_user_error(result, "global batch 24 of step 0 does not divide over 5 processes: run 1, 2, 3, 4, 6, 8, 12,"
                              " 24 processes")


def reference_file(tmp_path, name, step, writer):
    """A random step-``step`` model of ``name`` (ResNet-18, VOC 15-1) saved as the reference code saves it."""
    method = get_method(name)
    spec = model_spec(type("Args", (), {"model": None, "backbone": "resnet18", "output_stride": 16}), type(method))
    torch.manual_seed(0)
    model = method.build_network(spec, StepContext("voc", get_task("voc", "15-1"), step).classes_per_step,
                                 layout_step=step)
    path = str(tmp_path / f"{name}-step{step}.pth")
    torch.save(writer(model.state_dict()), path)
    return path


def test_a_released_checkpoint_evaluates_with_the_methods_own_protocol(tiny_voc, tmp_path):
    path = reference_file(tmp_path, "dkd", 1, dkd_file)
    result = run_inline(train(tiny_voc, tmp_path / "ckpt", "--method", "dkd", "--test", "--test_ckpt", path,
                       "--curr_step", "1", "--crop_size", "65"))
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "ckpt" / "dkd" / "15-1" / "overlap" / "eval" / "crop65" / "step1"
    results = json.loads((folder / "results.json").read_text())
    assert results["checkpoint"] == path and "hIoU" in json.dumps(results)  # DKD's evaluator reports hIoU
    refused = run_inline(train(tiny_voc, tmp_path / "other", "--method", "barm", "--test", "--test_ckpt", path,
                        "--curr_step", "1", "--crop_size", "65"))
    assert_user_error(refused, f"checkpoint {path} holds a dkd (DKD's network), not the deeplabv3bga")


def test_a_reference_step_0_starts_the_next_step(tiny_voc, tmp_path):
    path = reference_file(tmp_path, "rcil", 0, mib_file)  # RCIL's own file: "module." keys, both branches
    result = run_inline(train(tiny_voc, tmp_path / "ckpt", "--method", "rcil", "--curr_step", "1", "--end_step", "1",
                       "--prev_ckpt", path, "--train_epoch", "1", "--crop_size", "65", "--global_batch", "4",
                       "--val_interval", "0"))
    assert result.returncode == 0, result.stderr
    final = tmp_path / "ckpt" / "rcil" / "15-1" / "overlap" / "step1" / "final.pth"
    assert final.exists()
