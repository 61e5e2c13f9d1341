"""Two seeds of one method (FT, VOC 10-10, the second in another class order set by --task_file) trained on synthetic
data, then scripts/report.py: one experiment of 2 runs, whose mean ± standard deviation per step and column equals
what this test computes from the two runs' own results.json files (json + statistics, no ciss code), and whose
figure draws the band."""
import glob
import json
import os
import re
import statistics
import sys

import numpy as np
import pytest
from PIL import Image

from datasets.synthetic import generate
from tests.helpers import REPO, read_csv, run, run_inline, train_cmd

KEYS = ("mIoU_old", "mIoU_new", "mIoU", "hIoU", "mIoU_nobg", "mIoU_old_nobg", "hIoU_nobg")  # groups.md's columns
OTHER_ORDER = [[0, *range(1, 6), *range(16, 21)], list(range(6, 16))]  # 10-10 with classes 6-15 added


@pytest.fixture(scope="module")
def few_images(tmp_path_factory):
    """A VOC folder of 20 training images: two 2-step runs stay short."""
    root = str(tmp_path_factory.mktemp("few") / "VOC2012")
    generate("voc", root, workers=1, n_train=20, n_val=6, size=64, seed=3)
    return root


def own_numbers(folders):
    """``{step: {key: [value of each run]}}`` from the runs' results.json files."""
    values = {}
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(folder, "step*", "results.json"))):
            with open(path, encoding="utf-8") as handle:
                results = json.load(handle)
            for key in KEYS:
                values.setdefault(results["step"], {}).setdefault(key, []).append(results["summary"][key])
    return values


def test_two_seeds_reported_as_mean_and_standard_deviation_with_a_band(few_images, tmp_path):
    order = tmp_path / "order.json"
    order.write_text(json.dumps(OTHER_ORDER))
    ckpt = tmp_path / "ckpt"
    for seed, extra in ((1, []), (2, ["--task_file", str(order)])):
        result = run_inline(train_cmd(few_images, ckpt, "--method", "ft", "--task", "10-10", "--train_epoch", "1",
                               "--lr", "0.01", "--random_seed", str(seed), "--subpath", f"ft-seed{seed}", *extra))
        assert result.returncode == 0, result.stderr
    folders = [glob.glob(str(ckpt / f"ft-seed{seed}" / "*" / "overlap"))[0] for seed in (1, 2)]
    out = tmp_path / "report"
    result = run([sys.executable, os.path.join(REPO, "scripts", "report.py"), *folders, "--out", str(out)])
    assert result.returncode == 0, result.stderr

    values = own_numbers(folders)
    assert sorted(values) == [0, 1] and all(len(v) == 2 for step in values.values() for v in step.values())
    seeds = [json.load(open(os.path.join(f, "step1", "results.json"), encoding="utf-8"))["provenance"]["seed"]
             for f in folders]
    assert seeds == [1, 2]
    # printed: one experiment of two runs, a row per step: step | n | mean ± std of each column
    assert "### ft: 2 runs" in result.stdout
    for step in (0, 1):
        row = next(line for line in result.stdout.splitlines() if line.startswith(f"| {step} | 2 |"))
        cells = [c.strip() for c in row.strip("|").split("|")][2:]
        for key, cell in zip(KEYS, cells):
            if values[step][key][0] is None:
                assert cell == "-", (step, key)
                continue
            mean, std = (float(x) for x in re.fullmatch(r"(\S+) ± (\S+)", cell).groups())
            assert mean == pytest.approx(100 * statistics.mean(values[step][key]), abs=0.006), (step, key)
            assert std == pytest.approx(100 * statistics.stdev(values[step][key]), abs=0.006), (step, key)
    # groups.csv: the same, at 4 decimals
    rows = {r["step"]: r for r in read_csv(str(out / "groups.csv"))}
    assert rows["1"]["runs"] == "2" and rows["1"]["seeds"] == "1;2" and rows["1"]["task_family"] == "10-10"
    for step in (0, 1):
        for key in KEYS:
            if values[step][key][0] is None:
                assert rows[str(step)][f"{key}_mean"] == ""
                continue
            assert float(rows[str(step)][f"{key}_mean"]) == pytest.approx(
                100 * statistics.mean(values[step][key]), abs=1e-3)
            assert float(rows[str(step)][f"{key}_std"]) == pytest.approx(
                100 * statistics.stdev(values[step][key]), abs=1e-3)

    # the figure: the band of the "all" panel spans mean ± std at each step, and the saved PNG shows it
    from reports import experiments as report_experiments, runs as report_runs, tables as report_tables
    from reports.plots import MIOU_FIGURE_PX, miou_figure, plot_miou_band
    figure_path = out / "miou_mean_voc_10-10_overlap.png"
    with Image.open(figure_path) as image:
        assert image.size == MIOU_FIGURE_PX
        saved = np.asarray(image.convert("RGB")).astype(int)
    runs = report_runs.label_runs([report_runs.load_run(f) for f in folders])
    series = report_tables.band_series(report_experiments.experiment_groups(runs))
    all_panel = miou_figure(series).axes[2]
    bands = [c for c in all_panel.collections if type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")]
    vertices = np.concatenate([path.vertices for path in bands[0].get_paths()])
    for step in (0, 1):
        centre, spread = 100 * statistics.mean(values[step]["mIoU"]), 100 * statistics.stdev(values[step]["mIoU"])
        at_step = vertices[np.isclose(vertices[:, 0], step), 1]
        assert at_step.min() == pytest.approx(centre - spread) and at_step.max() == pytest.approx(centre + spread)
    label, steps, means, _ = series[0]
    plot_miou_band([(label, steps, means, {k: [None] * len(steps) for k in means})], str(tmp_path / "no_band.png"))
    with Image.open(tmp_path / "no_band.png") as image:
        assert np.abs(np.asarray(image.convert("RGB")).astype(int) - saved).sum() > 0  # the band and its bars
