"""engine/shared_step0.py: which step 0s are the same (the first difference, or None), against hand-made records."""
import os

from engine.cli import parse_args
from engine.shared_step0 import RUN_FLAGS, difference

BASE = {"method": "mib", "classes": [list(range(16))], "model": "deeplabv3_mib", "backbone": "resnet101",
        "output_stride": 16,
        "args": {"task": "15-5", "lr": 0.01, "random_seed": 42, "data_root": "data/VOC2012", "ckpt_dir": "a",
                 "subpath": "mib", "overlap": True, "loss_kd": 10.0}}


def _with(args=None, **top):
    return {**BASE, **top, "args": {**BASE["args"], **(args or {})}}


def test_the_task_name_and_where_a_run_writes_do_not_matter():
    assert difference(BASE, _with({"task": "15-1", "ckpt_dir": "b", "subpath": "other", "num_workers": 3})) is None


def test_the_first_setting_that_shapes_step_0_is_named():
    assert difference(_with({"lr": 0.02}), BASE) == ("--lr", 0.01, 0.02)
    assert difference(_with({"random_seed": 1, "overlap": False}), BASE) == ("--overlap", True, False)
    assert difference(_with(classes=[[0, 2, 1] + list(range(3, 16))]), BASE) == (
        "classes", [list(range(16))], [[0, 2, 1] + list(range(3, 16))])
    assert difference(_with(backbone="resnet50"), BASE) == ("backbone", "resnet101", "resnet50")


def test_a_setting_only_one_record_has_is_not_compared():
    older = {**BASE, "args": {k: v for k, v in BASE["args"].items() if k != "loss_kd"}}
    assert difference(BASE, older) is None


def test_the_same_data_folder_under_another_name_is_the_same(tmp_path):
    (tmp_path / "VOC2012").mkdir()
    os.symlink(tmp_path / "VOC2012", tmp_path / "voc")
    ours = _with({"data_root": str(tmp_path / "voc")})
    assert difference(ours, _with({"data_root": str(tmp_path / "VOC2012")})) is None
    assert difference(ours, _with({"data_root": str(tmp_path / "elsewhere")}))[0] == "--data_root"


def test_every_run_flag_is_a_flag_of_train_py():
    assert RUN_FLAGS <= set(parse_args(["--data_root", "x"]).to_dict())
