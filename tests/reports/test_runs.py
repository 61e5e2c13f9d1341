"""reports/runs.py: runs read from hand-made results files: labels, step folders and chains, eval folders,
conventions, forgetting with absent classes."""
import json
import os

import numpy as np
import pytest

from reports import runs as report_runs
from tests.helpers import BARM, IOU_FT, MIB, SUMMARY_FT, write_run
from utils.errors import UserError


def test_runs_of_one_method_get_their_subpath_and_labels_can_be_given(tmp_path):
    a = write_run(tmp_path, "ft", IOU_FT, SUMMARY_FT, subpath="lr01")
    b = write_run(tmp_path, "ft", IOU_FT, SUMMARY_FT, subpath="lr001")
    runs = report_runs.label_runs([report_runs.load_run(a), report_runs.load_run(b)])
    assert [r.label for r in runs] == ["ft (lr01)", "ft (lr001)"]
    runs = report_runs.label_runs([report_runs.load_run(a, "mine"), report_runs.load_run(b)])
    assert [r.label for r in runs] == ["mine", "ft"]


def test_step_folder_and_chain_of_one_run(tmp_path):
    setting = write_run(tmp_path, "ft", IOU_FT, SUMMARY_FT)
    run = report_runs.load_run(os.path.join(setting, "step1"))
    assert run.steps == [0, 1] and run.kind == "step"
    # step 0 re-trained by another run: steps 1-2 are reported alone, with a note
    write_run(tmp_path, "ft", IOU_FT[:1], SUMMARY_FT[:1], run_ids=["other-0"])
    run = report_runs.load_run(setting)
    assert run.steps == [1, 2] and "another run" in run.notes[0]
    with pytest.raises(UserError, match="holds no step"):
        report_runs.load_run(str(tmp_path))


def test_eval_folder_is_a_run(tmp_path):
    setting = write_run(tmp_path, "ft", IOU_FT, SUMMARY_FT)
    eval_dir = os.path.join(setting, "eval", "crop65")
    os.makedirs(eval_dir)
    for t in range(3):
        os.rename(os.path.join(setting, f"step{t}"), os.path.join(eval_dir, f"step{t}"))
    run = report_runs.load_run(eval_dir)
    assert run.kind == "eval" and run.steps == [0, 1, 2]
    assert [r.label for r in report_runs.label_runs([run, report_runs.load_run(eval_dir)])] == ["ft [test crop65]",
                                                                            "ft [test crop65] #2"]


def test_steps_of_one_run_with_different_conventions_are_refused(tmp_path):
    setting = write_run(tmp_path, "ft", IOU_FT, SUMMARY_FT)
    path = os.path.join(setting, "step1", "results.json")
    results = json.load(open(path, encoding="utf-8"))
    results["convention"] = MIB
    json.dump(results, open(path, "w", encoding="utf-8"))
    with pytest.raises(UserError, match="steps with different evaluation conventions"):
        report_runs.check_conventions(report_runs.label_runs([report_runs.load_run(setting)]))


def test_absent_classes_are_left_out_under_exclude_absent(tmp_path):
    # class 1 absent from the ground truth at step 1 (zero row), class 2 absent at step 2
    confusions = [np.diag([5, 5]).tolist(), np.diag([5, 0, 5]).tolist(), np.diag([5, 5, 0, 5]).tolist()]
    ious = [[0.9, 0.6], [0.8, 0.0, 0.5], [0.7, 0.4, 0.0, 0.6]]
    setting = write_run(tmp_path, "mib", ious, SUMMARY_FT, convention=MIB, confusions=confusions)
    rows = report_runs.forgetting(report_runs.load_run(setting))
    assert [r["best_iou"] for r in rows] == [0.9, 0.6, 0.5, 0.6]
    assert [r["final_iou"] for r in rows] == [0.7, 0.4, None, 0.6]
    assert rows[0]["forgetting"] == pytest.approx(0.2) and rows[1]["forgetting"] == pytest.approx(0.2)
    assert rows[2]["forgetting"] is None
    # counted as 0 under BARM's convention: class 2 then forgets all of its 0.5
    setting = write_run(tmp_path / "barm", "ft", ious, SUMMARY_FT, convention=BARM, confusions=confusions)
    assert report_runs.forgetting(report_runs.load_run(setting))[2]["forgetting"] == pytest.approx(0.5)
