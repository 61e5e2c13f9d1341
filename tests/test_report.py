"""The report (metrics.report, utils.plots, scripts/report.py) on hand-made results files: values, averages and
forgetting computed by hand, mixed conventions refused, figures as PNGs of the expected size."""
import csv
import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from reports import runs as report_runs, tables as report_tables
from reports.plots import heatmap_size
from utils.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = [[0, 1], [2], [3]]  # a 3-step toy task: background + class 1, then class 2, then class 3
NAMES = ["background", "aeroplane", "bicycle", "bird"]
BARM = {"background_in_old": True, "exclude_absent": False}
MIB = {"background_in_old": True, "exclude_absent": True}

# Per-step class IoU (channel order) and the summaries, written out by hand (old = channels 0-1).
IOU_FT = [[0.9, 0.6], [0.8, 0.3, 0.5], [0.7, 0.4, 0.1, 0.6]]
SUMMARY_FT = [
    {"mIoU": 0.75, "mIoU_old": 0.75, "mIoU_new": None, "hIoU": None, "mIoU_nobg": 0.6, "mIoU_old_nobg": 0.6,
     "hIoU_nobg": None},
    {"mIoU": 1.6 / 3, "mIoU_old": 0.55, "mIoU_new": 0.5, "hIoU": 2 * 0.55 * 0.5 / 1.05, "mIoU_nobg": 0.4,
     "mIoU_old_nobg": 0.3, "hIoU_nobg": 2 * 0.3 * 0.5 / 0.8},
    {"mIoU": 0.45, "mIoU_old": 0.55, "mIoU_new": 0.35, "hIoU": 2 * 0.55 * 0.35 / 0.9, "mIoU_nobg": 1.1 / 3,
     "mIoU_old_nobg": 0.4, "hIoU_nobg": 2 * 0.4 * 0.35 / 0.75},
]
IOU_BARM = [[0.9, 0.6], [0.88, 0.65, 0.4], [0.86, 0.55, 0.45, 0.3]]
SUMMARY_BARM = [
    {"mIoU": 0.75, "mIoU_old": 0.75, "mIoU_new": None, "hIoU": None, "mIoU_nobg": 0.6, "mIoU_old_nobg": 0.6,
     "hIoU_nobg": None},
    {"mIoU": 1.93 / 3, "mIoU_old": 0.765, "mIoU_new": 0.4, "hIoU": 2 * 0.765 * 0.4 / 1.165, "mIoU_nobg": 0.525,
     "mIoU_old_nobg": 0.65, "hIoU_nobg": 2 * 0.65 * 0.4 / 1.05},
    {"mIoU": 0.54, "mIoU_old": 0.705, "mIoU_new": 0.375, "hIoU": 2 * 0.705 * 0.375 / 1.08, "mIoU_nobg": 1.3 / 3,
     "mIoU_old_nobg": 0.55, "hIoU_nobg": 2 * 0.55 * 0.375 / 0.925},
]


def write_run(root, method, ious, summaries, convention=BARM, subpath=None, confusions=None, run_ids=None):
    """Results files of one run in the trainer's layout; returns the setting folder."""
    setting_dir = os.path.join(str(root), subpath or method, "2-1", "overlap")
    run_ids = run_ids or [f"{method}-{t}" for t in range(len(ious))]
    for t, (iou, summary) in enumerate(zip(ious, summaries)):
        results = {
            "Mean IoU": float(np.mean(iou)), "Class IoU": {str(c): v for c, v in enumerate(iou)},
            "summary": {**summary, "n_old": 2, "n_new": len(iou) - 2}, "convention": convention,
            "dataset": "voc", "task": "2-1", "setting": "overlap", "step": t, "method": method,
            "checkpoint": os.path.join(str(root), subpath or method, "2-1", "overlap", f"step{t}", "final.pth"),
            "classes": CLASSES[:t + 1], "class_names": NAMES[:len(iou)],
            "run_id": run_ids[t], "parent_id": run_ids[t - 1] if t else None,
        }
        if confusions is not None:
            results["confusion_matrix"] = confusions[t]
        folder = os.path.join(setting_dir, f"step{t}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "results.json"), "w", encoding="utf-8") as handle:
            json.dump(results, handle)
    return setting_dir


def read_csv(path):
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def pct(value):
    return f"{100 * value:.4f}"


def test_step_values_averages_and_forgetting_by_hand(tmp_path):
    ft = write_run(tmp_path / "ckpt", "ft", IOU_FT, SUMMARY_FT)
    barm = write_run(tmp_path / "ckpt", "barm", IOU_BARM, SUMMARY_BARM)
    written = report_tables.write_report([report_runs.load_run(ft), report_runs.load_run(barm)], str(tmp_path / "out"))
    rows = read_csv(written["report.csv"])
    assert [(r["run"], r["step"]) for r in rows] == [("ft", "0"), ("ft", "1"), ("ft", "2"), ("ft", "avg"),
                                                     ("barm", "0"), ("barm", "1"), ("barm", "2"), ("barm", "avg")]
    ft_rows = rows[:4]
    assert ft_rows[1]["mIoU_old"] == "55.0000" and ft_rows[1]["mIoU_new"] == "50.0000"
    assert ft_rows[1]["hIoU"] == pct(0.55 / 1.05) and ft_rows[0]["mIoU_new"] == "" and ft_rows[0]["hIoU"] == ""
    assert ft_rows[2]["n_classes"] == "4"
    # averages over the steps where a column is defined: all over 3 steps, new and hIoU over steps 1-2
    assert ft_rows[3]["mIoU"] == pct((0.75 + 1.6 / 3 + 0.45) / 3)
    assert ft_rows[3]["mIoU_old"] == pct((0.75 + 0.55 + 0.55) / 3)
    assert ft_rows[3]["mIoU_new"] == pct((0.5 + 0.35) / 2)
    assert ft_rows[3]["hIoU"] == pct((0.55 / 1.05 + 0.385 / 0.9) / 2)
    assert ft_rows[3]["mIoU_nobg"] == pct((0.6 + 0.4 + 1.1 / 3) / 3)
    # forgetting = best IoU over the steps - last IoU: ft 0.9-0.7, 0.6-0.4, 0.5-0.1, 0 for the last class
    forgetting = [r for r in read_csv(written["forgetting.csv"]) if r["run"] == "ft"]
    assert [r["forgetting"] for r in forgetting] == [pct(0.2), pct(0.2), pct(0.4), pct(0.0)]
    assert [r["best_step"] for r in forgetting] == ["0", "0", "1", "2"]
    assert [r["introduced"] for r in forgetting] == ["0", "0", "1", "2"]
    assert [r["name"] for r in forgetting] == NAMES
    # mean over the classes of steps 0-1 (background included: it is with the old classes)
    assert ft_rows[2]["mean_forgetting"] == pct((0.2 + 0.2 + 0.4) / 3) == ft_rows[3]["mean_forgetting"]
    assert ft_rows[1]["mean_forgetting"] == ""
    barm_forgetting = [r["forgetting"] for r in read_csv(written["forgetting.csv"]) if r["run"] == "barm"]
    assert barm_forgetting == [pct(0.9 - 0.86), pct(0.65 - 0.55), pct(0.0), pct(0.0)]  # class 2 improved
    assert rows[6]["mean_forgetting"] == pct((0.04 + 0.1 + 0.0) / 3)


def test_markdown_puts_runs_side_by_side(tmp_path):
    ft = write_run(tmp_path / "ckpt", "ft", IOU_FT, SUMMARY_FT)
    barm = write_run(tmp_path / "ckpt", "barm", IOU_BARM, SUMMARY_BARM)
    written = report_tables.write_report([report_runs.load_run(ft), report_runs.load_run(barm)], str(tmp_path / "out"), plots=False)
    text = open(written["report.md"], encoding="utf-8").read()
    assert "## voc 2-1 (overlap)" in text
    assert "Evaluation convention: background with the old classes, absent classes count as 0." in text
    # per-step tables: one column per run; old mIoU at step 1 is 55.00 (ft) and 76.50 (barm)
    assert "| step | ft | barm |" in text
    assert "| 1 | 55.00 | 76.50 |" in text
    # the last step's row of ft: old, new, all, hIoU, ... then the averages and mean forgetting
    row = next(line for line in text.splitlines() if line.startswith("| ft | 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:6] == ["55.00", "35.00", "45.00", f"{100 * 0.385 / 0.9:.2f}"]
    assert cells[-1] == f"{100 * 0.8 / 3:.2f}"
    assert "| 2 | bicycle | 40.00 | 0.00 |" in text  # forgetting per class, side by side


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


def test_mixed_conventions_refused_unless_allowed(tmp_path, capsys):
    ft = write_run(tmp_path, "ft", IOU_FT, SUMMARY_FT)
    mib = write_run(tmp_path, "mib", IOU_BARM, SUMMARY_BARM, convention=MIB)
    with pytest.raises(UserError, match="different evaluation conventions"):
        report_tables.write_report([report_runs.load_run(ft), report_runs.load_run(mib)], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "report.md")
    script = load_script()
    with pytest.raises(SystemExit) as exit_info:
        script.main([ft, mib, "--out", str(tmp_path / "cli")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--allow_mixed_conventions" in lines[0]
    written = script.main([ft, mib, "--out", str(tmp_path / "cli"), "--allow_mixed_conventions", "--no_plots"])
    text = open(written["report.md"], encoding="utf-8").read()
    assert "Mixed evaluation conventions" in text
    assert "| step | ft [A] | mib [B] |" in text
    assert "* [A] background with the old classes, absent classes count as 0" in text
    assert "* [B] background with the old classes, absent classes left out" in text
    conventions = {r["run"]: json.loads(r["convention"]) for r in read_csv(written["report.csv"])}
    assert conventions == {"ft": BARM, "mib": MIB}


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


def test_figures_are_pngs_of_the_expected_size(tmp_path):
    ft = write_run(tmp_path / "ckpt", "ft", IOU_FT, SUMMARY_FT)
    barm = write_run(tmp_path / "ckpt", "barm", IOU_BARM, SUMMARY_BARM)
    out = str(tmp_path / "out")
    written = report_tables.write_report([report_runs.load_run(ft), report_runs.load_run(barm)], out)
    pngs = sorted(name for name in written if name.endswith(".png"))
    assert pngs == ["heatmap_0_ft.png", "heatmap_1_barm.png", "miou_voc_2-1_overlap.png"]
    sizes = {}
    for name in pngs:
        with open(os.path.join(out, name), "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
        with Image.open(os.path.join(out, name)) as image:
            image.verify()
        with Image.open(os.path.join(out, name)) as image:
            sizes[name] = image.size
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.std() > 0  # something is drawn
    assert sizes["miou_voc_2-1_overlap.png"] == (1200, 450)
    assert sizes["heatmap_0_ft.png"] == (800, 200 + 20 * 4) == heatmap_size(4)
    text = open(written["report.md"], encoding="utf-8").read()
    assert "![mIoU per step](miou_voc_2-1_overlap.png)" in text and "(heatmap_1_barm.png)" in text


def load_script():
    spec = importlib.util.spec_from_file_location("report_script", os.path.join(REPO, "scripts", "report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
