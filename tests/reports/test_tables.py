"""reports/tables.py: the report's CSV and Markdown tables on hand-made results files: values, averages and
forgetting computed by hand."""
from reports import runs as report_runs, tables as report_tables
from tests.helpers import IOU_BARM, IOU_FT, NAMES, SUMMARY_BARM, SUMMARY_FT, pct, read_csv, write_run


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
    written = report_tables.write_report([report_runs.load_run(ft), report_runs.load_run(barm)], str(tmp_path / "out"),
                                         plots=False)
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
