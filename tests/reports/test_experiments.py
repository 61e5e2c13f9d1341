"""reports/experiments.py: runs that differ only by seed and class order are one experiment, reported as mean ± sample standard
deviation per step and column; values computed by hand from the toy runs of tests/helpers.py."""
import json
import math
import os

import numpy as np
import pytest

from reports import experiments as report_experiments, runs as report_runs, tables as report_tables
from reports.plots import miou_figure
from tests.helpers import IOU_BARM, IOU_FT, MIB, SUMMARY_BARM, SUMMARY_FT, read_csv, write_run
from utils.tasks import get_task, list_tasks, natural_task

ORDER_A = [[0, 1], [2], [3]]
ORDER_B = [[0, 2], [1], [3]]  # another order of the same 2-1 family
ARGS = {"lr": 0.01, "train_epoch": 1, "global_batch": 4, "device": "cpu", "num_workers": 0, "batch_size": 4}


def stamp(setting_dir, seed, order=ORDER_A, task="2-1", **args):
    """Give a toy run the provenance and config.json the trainer writes (seed, class order, arguments)."""
    for step in range(3):
        folder = os.path.join(setting_dir, f"step{step}")
        path = os.path.join(folder, "results.json")
        with open(path, encoding="utf-8") as handle:
            results = json.load(handle)
        results["task"] = task
        results["provenance"] = {"seed": seed, "class_order": order, "task_file": None, "global_batch": 4}
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(results, handle)
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as handle:
            subpath = os.path.basename(os.path.dirname(os.path.dirname(setting_dir)))
            json.dump({"args": {**ARGS, "random_seed": seed, "task": task, "subpath": subpath, **args}}, handle)
    return setting_dir


def two_seeds(tmp_path):
    a = stamp(write_run(tmp_path, "ft", IOU_FT, SUMMARY_FT, subpath="ft-seed1"), 1)
    b = stamp(write_run(tmp_path, "ft", IOU_BARM, SUMMARY_BARM, subpath="ft-seed2"), 2, order=ORDER_B, task="2-1_b",
              device="cuda", num_workers=4, batch_size=2)  # launched otherwise: the same experiment
    return a, b


def test_mean_and_sample_standard_deviation_by_hand():
    assert report_experiments.mean_std([0.1, 0.3]) == (pytest.approx(0.2), pytest.approx(0.2 / math.sqrt(2)), 2)
    centre, spread, n = report_experiments.mean_std([1.0, 2.0, 3.0, 4.0, None, float("nan")])
    assert (centre, n) == (2.5, 4) and spread == pytest.approx(math.sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3))
    assert report_experiments.mean_std([0.4]) == (0.4, None, 1) and report_experiments.mean_std([None]) == (None, None, 0)


def test_task_families_of_the_task_tables_and_their_orders():
    assert report_experiments.family_name([16, 1, 1, 1, 1, 1]) == "15-1"
    assert report_experiments.family_name([101, 50]) == "100-50" and report_experiments.family_name([51, 50, 50]) == "50-50"
    assert report_experiments.family_name([16, 2, 2, 1]) == "15-2" and report_experiments.family_name([11, 2, 5]) == "10-2-5"
    assert report_experiments.family_name([21]) == "offline"
    for dataset in ("voc", "ade"):
        for task in list_tasks(dataset):
            sizes = [len(s) for s in get_task(dataset, task)]
            # the family is a natural name of the same step sizes
            assert [len(s) for s in natural_task(dataset, report_experiments.family_name(sizes)) or [[None] * sizes[0]]] \
                == sizes, task
    family = {t: report_experiments.family_name([len(s) for s in get_task(d, t)])
              for d, t in [("voc", "15-1_b"), ("voc", "15-5s_w"), ("ade", "100-50c"), ("ade", "100-10b"),
                           ("ade", "50b"), ("voc", "19-1b")]}
    assert family == {"15-1_b": "15-1", "15-5s_w": "15-1", "100-50c": "100-50", "100-10b": "100-10", "50b": "50-50",
                      "19-1b": "19-1"}


def test_runs_differing_by_seed_and_order_are_one_experiment_others_are_not(tmp_path):
    a, b = two_seeds(tmp_path)
    other_lr = stamp(write_run(tmp_path, "ft", IOU_FT, SUMMARY_FT, subpath="ft-lr"), 3, lr=0.1)
    other_convention = stamp(write_run(tmp_path, "ft", IOU_FT, SUMMARY_FT, subpath="ft-mib", convention=MIB), 4)
    other_method = stamp(write_run(tmp_path, "lwf", IOU_FT, SUMMARY_FT, subpath="lwf-seed1"), 1)
    unknown = write_run(tmp_path, "ft", IOU_FT, SUMMARY_FT, subpath="old")  # no provenance, no config.json
    runs = report_runs.label_runs([report_runs.load_run(f) for f in (a, other_lr, b, other_convention, other_method,
                                                                     unknown)])
    experiments = report_experiments.experiment_groups(runs)
    assert [[r.subpath for r in e.runs] for e in experiments] == [["ft-seed1", "ft-seed2"], ["ft-lr"], ["ft-mib"],
                                                                  ["lwf-seed1"], ["old"]]
    assert [e.label for e in experiments] == ["ft", "ft (ft-lr)", "ft (ft-mib)", "lwf", "ft (old)"]
    first = experiments[0]
    assert first.seeds == [1, 2] and first.orders == ["2-1", "2-1_b"]
    assert first.family == "1-1"  # the toy task's step sizes [2, 1, 1] (its recorded name, 2-1, is only a name)
    assert experiments[-1].seeds == [None] and experiments[-1].family == "2-1"  # older results: the task name


def test_experiment_rows_csv_and_markdown_by_hand(tmp_path):
    a, b = two_seeds(tmp_path / "ckpt")
    written = report_tables.write_report([report_runs.load_run(a), report_runs.load_run(b)], str(tmp_path / "out"),
                                         plots=False)
    rows = read_csv(written["groups.csv"])
    assert [(r["experiment"], r["step"], r["n"], r["runs"], r["seeds"]) for r in rows] == [
        ("ft", "0", "2", "2", "1;2"), ("ft", "1", "2", "2", "1;2"), ("ft", "2", "2", "2", "1;2"),
        ("ft", "avg", "2", "2", "1;2")]
    assert rows[0]["mIoU_mean"] == "75.0000" and rows[0]["mIoU_std"] == "0.0000"
    assert rows[0]["mIoU_new_mean"] == "" and rows[0]["mIoU_new_std"] == ""  # no new classes at step 0
    # step 1 old: 0.55 and 0.765; step 2 new: 0.35 and 0.375 (std = |a - b| / sqrt(2) for two values)
    assert float(rows[1]["mIoU_old_mean"]) == pytest.approx(65.75, abs=1e-4)
    assert float(rows[1]["mIoU_old_std"]) == pytest.approx(100 * 0.215 / math.sqrt(2), abs=1e-4)
    assert float(rows[2]["mIoU_new_std"]) == pytest.approx(100 * 0.025 / math.sqrt(2), abs=1e-4)
    # avg: each run's mean over its steps, then mean and std over the runs
    ft_avg, barm_avg = (0.75 + 1.6 / 3 + 0.45) / 3, (0.75 + 1.93 / 3 + 0.54) / 3
    assert float(rows[3]["mIoU_mean"]) == pytest.approx(100 * (ft_avg + barm_avg) / 2, abs=1e-4)
    assert float(rows[3]["mIoU_std"]) == pytest.approx(100 * abs(ft_avg - barm_avg) / math.sqrt(2), abs=1e-4)
    # mean forgetting: ft (0.2 + 0.2 + 0.4) / 3, the other (0.04 + 0.1 + 0) / 3
    forget = [(0.2 + 0.2 + 0.4) / 3, (0.04 + 0.1) / 3]
    assert float(rows[3]["mean_forgetting_mean"]) == pytest.approx(100 * sum(forget) / 2, abs=1e-4)
    text = open(written["groups.md"], encoding="utf-8").read()
    assert "### ft: 2 runs" in text and "## voc 1-1 (overlap)" in text
    assert f"| 1 | 2 | 65.75 ± {100 * 0.215 / math.sqrt(2):.2f} |" in text
    assert "| ft (ft-seed2) | 2 | 2-1_b | 0-2 |" in text


@pytest.mark.slow  # ~1 s: matplotlib
def test_the_figure_draws_the_mean_and_a_band_of_one_standard_deviation(tmp_path):
    a, b = two_seeds(tmp_path / "ckpt")
    runs = report_runs.label_runs([report_runs.load_run(a), report_runs.load_run(b)])
    experiments = report_experiments.experiment_groups(runs)
    figure = miou_figure(report_tables.band_series(experiments))
    old_panel = figure.axes[0]
    lines = [line for line in old_panel.get_lines() if len(line.get_xdata()) == 3]
    assert np.allclose(lines[0].get_ydata(), [75.0, 65.75, 100 * (0.55 + 0.705) / 2])
    bands = [c for c in old_panel.collections if type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")]
    vertices = np.concatenate([path.vertices for path in bands[0].get_paths()])
    at_step1 = vertices[np.isclose(vertices[:, 0], 1.0), 1]
    spread = 100 * 0.215 / math.sqrt(2)
    assert at_step1.min() == pytest.approx(65.75 - spread) and at_step1.max() == pytest.approx(65.75 + spread)
    written = report_tables.write_report(runs, str(tmp_path / "out"))
    assert "miou_mean_voc_1-1_overlap.png" in written
    assert "(miou_mean_voc_1-1_overlap.png)" in open(written["groups.md"], encoding="utf-8").read()
