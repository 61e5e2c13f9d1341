"""The report of one or several runs: ``report.md`` (per task, the runs side by side), ``report.csv``,
``forgetting.csv``, the experiments (runs that differ only by seed and class order: ``groups.md``, ``groups.csv``,
mean ± sample standard deviation) and the figures (:mod:`reports.plots`), written by :func:`write_report`; the runs
are read and measured by :mod:`reports.runs`, grouped into experiments by :mod:`reports.experiments`.
"""
import csv
import json
import math
import os
import re

from reports.experiments import experiment_groups, experiment_panels, order_name, run_seed
from reports.runs import (AVERAGE_ROW, METRICS, check_conventions, class_iou_matrix, convention_key,
                          convention_tags, describe_convention, forgetting, group_runs, label_runs, mean_forgetting,
                          step_rows)
from reports.plots import PANEL_KEYS, plot_class_heatmap, plot_miou_band, plot_miou_per_step
from utils.errors import UserError

PERCENT = 100.0
CSV_DECIMALS = 4
MD_DECIMALS = 2
MISSING = "-"
REPORT_MD = "report.md"
REPORT_CSV = "report.csv"
FORGETTING_CSV = "forgetting.csv"
GROUPS_MD = "groups.md"
GROUPS_CSV = "groups.csv"
PLUS_MINUS = " ± "


def _pct(value, decimals=MD_DECIMALS):
    return MISSING if value is None or (isinstance(value, float) and math.isnan(value)) else \
        f"{PERCENT * value:.{decimals}f}"


def _md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return lines


def slug(text):
    """``text`` as a file-name part: runs of characters other than letters, digits, ``.`` and ``-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", str(text)).strip("_")


def group_slug(group):
    return "_".join(slug(g) for g in group)


def markdown_report(runs, mixed=False, figures=None):
    """The report as Markdown lines (percent). ``mixed``: the runs' conventions differ (each column then
    carries a tag, A, B, ..., naming its convention); ``figures``: ``{"miou": {group: file}, "heatmap":
    {label: file}}`` to link."""
    figures = figures or {"miou": {}, "heatmap": {}}
    tags = convention_tags(runs) if mixed else {}
    lines = ["# Results", "", "mIoU in %; old = classes of step 0 (with background when the convention says so),"
             " new = classes of the later steps, hIoU = harmonic mean of old and new; avg = mean over the steps"
             " where a column is defined; forgetting = best IoU of a class over the steps minus its IoU at the"
             " last step (points).", ""]
    if mixed:
        lines += ["**Mixed evaluation conventions**: these runs were not evaluated the same way, and numbers of"
                  " different conventions are not comparable. Every column names its run's convention:"]
        lines += [f"* [{tag}] {describe_convention(json.loads(key))}" for key, tag in tags.items()] + [""]
    lines += _md_table(["run", "method", "dataset", "task", "setting", "steps", "convention", "folder"],
                       [[_run_cell(r, tags), r.method, *r.group, f"{r.steps[0]}-{r.steps[-1]}",
                         describe_convention(r.convention), f"`{r.folder}`"] for r in runs])
    for run in runs:
        for note in run.notes:
            lines += ["", f"Note ({run.label}): {note}."]
    for group, members in group_runs(runs).items():
        dataset, task, setting = group
        lines += ["", f"## {dataset} {task} ({setting})", ""]
        conventions = {describe_convention(r.convention) for r in members}
        if len(conventions) == 1:
            lines += [f"Evaluation convention: {conventions.pop()}.", ""]
        rows = {r.label: step_rows(r) for r in members}
        forgets = {r.label: forgetting(r) for r in members}
        lines += ["### Last step", ""]
        header = ["run", "step"] + [title for _, title in METRICS] + ["avg all", "avg old", "avg new", "avg hIoU",
                                                                     "mean forgetting"]
        table = []
        for r in members:
            last, average = rows[r.label][-2], rows[r.label][-1]
            table.append([_run_cell(r, tags), last["step"], *[_pct(last[k]) for k, _ in METRICS],
                          *[_pct(average[k]) for k in ("mIoU", "mIoU_old", "mIoU_new", "hIoU")],
                          _pct(mean_forgetting(r, forgets[r.label]))])
        lines += _md_table(header, table)
        steps = sorted({row["step"] for r in members for row in rows[r.label][:-1]})
        for key, title in METRICS[:4]:
            lines += ["", f"### {title} mIoU per step" if key != "hIoU" else "### hIoU per step", ""]
            body = []
            for step in steps + [AVERAGE_ROW]:
                cells = []
                for r in members:
                    row = next((x for x in rows[r.label] if x["step"] == step), None)
                    cells.append(_pct(row[key]) if row else MISSING)
                body.append([step, *cells])
            lines += _md_table(["step", *[_run_cell(r, tags) for r in members]], body)
        lines += ["", "### Forgetting per class (points: best IoU over the steps − IoU at the last step)", ""]
        classes = []
        for r in members:
            for f in forgets[r.label]:
                if (f["class_id"], f["name"]) not in classes:
                    classes.append((f["class_id"], f["name"]))
        body = []
        for class_id, name in classes:
            cells = []
            for r in members:
                f = next((x for x in forgets[r.label] if x["class_id"] == class_id), None)
                cells.append(_pct(f["forgetting"]) if f else MISSING)
            body.append([class_id, name, *cells])
        lines += _md_table(["class", "name", *[_run_cell(r, tags) for r in members]], body)
        if group in figures["miou"]:
            lines += ["", f"![mIoU per step]({figures['miou'][group]})"]
        for r in members:
            if r.label in figures["heatmap"]:
                lines += ["", f"![per-class IoU of {r.label}]({figures['heatmap'][r.label]})"]
    return lines + [""]


def _run_cell(run, tags):
    """A run's column title: its label, and its convention's tag when the report mixes conventions."""
    return f"{run.label} [{tags[convention_key(run.convention)]}]" if tags else run.label


CSV_COLUMNS = ("run", "method", "dataset", "task", "setting", "convention", "step", "n_classes",
               *(k for k, _ in METRICS), "mean_forgetting")


FORGETTING_COLUMNS = ("run", "method", "dataset", "task", "setting", "channel", "class_id", "name", "introduced",
                      "best_iou", "best_step", "final_iou", "forgetting")


def _csv_value(value, percent=True):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and percent:
        return f"{PERCENT * value:.{CSV_DECIMALS}f}"
    return value


def csv_rows(runs):
    """``report.csv`` rows: one per step of every run and its ``avg`` row (percent); ``mean_forgetting`` on
    the last step's row and the ``avg`` row."""
    out = []
    for run in runs:
        forget = mean_forgetting(run)
        rows = step_rows(run)
        for i, row in enumerate(rows):
            out.append({"run": run.label, "method": run.method, "dataset": run.group[0], "task": run.group[1],
                        "setting": run.group[2], "convention": json.dumps(run.convention, sort_keys=True),
                        "step": row["step"], "n_classes": "" if row["n_classes"] is None else row["n_classes"],
                        **{k: _csv_value(row[k]) for k, _ in METRICS},
                        "mean_forgetting": _csv_value(forget) if i >= len(rows) - 2 else ""})
    return out


def forgetting_rows(runs):
    """``forgetting.csv`` rows: one per class of every run (IoU and forgetting in percent)."""
    out = []
    for run in runs:
        for f in forgetting(run):
            row = {"run": run.label, "method": run.method, "dataset": run.group[0], "task": run.group[1],
                   "setting": run.group[2]}
            for key in FORGETTING_COLUMNS[5:]:
                percent = key in ("best_iou", "final_iou", "forgetting")
                row[key] = _csv_value(f[key]) if percent else ("" if f[key] is None else f[key])
            out.append(row)
    return out


def _mean_std_cell(stat):
    """``(mean, std, n)`` as ``"45.00 ± 1.23"`` (percent), the mean alone for one value, ``-`` for none."""
    centre, spread, _ = stat
    if centre is None:
        return MISSING
    return _pct(centre) if spread is None else f"{_pct(centre)}{PLUS_MINUS}{_pct(spread)}"


def experiment_lines(experiment):
    """One experiment as Markdown lines: its runs (seed, class order, folder), then mean ± standard deviation per
    step and column, with the number of runs of each step, and its mean forgetting."""
    rows = experiment.rows
    n_runs = len(experiment.runs)
    lines = [f"### {experiment.label}: {n_runs} run{'s' if n_runs != 1 else ''}", "",
             f"{experiment.method}, {experiment.dataset} {experiment.family} ({experiment.setting}); evaluation"
             f" convention: {describe_convention(experiment.convention)}.", ""]
    lines += _md_table(["run", "seed", "class order", "steps", "folder"],
                       [[r.label, "?" if run_seed(r) is None else run_seed(r), order_name(r),
                         f"{r.steps[0]}-{r.steps[-1]}", f"`{r.folder}`"] for r in experiment.runs])
    lines += [""] + _md_table(["step", "n", *[title for _, title in METRICS]],
                              [[row["step"], row["n"], *[_mean_std_cell(row[key]) for key, _ in METRICS]]
                               for row in rows])
    lines += ["", f"Mean forgetting: {_mean_std_cell(rows[-1]['mean_forgetting'])} points"
              f" (n = {rows[-1]['mean_forgetting'][2]})."]
    return lines


def groups_markdown(experiments, figures=None):
    """``groups.md`` as lines: per dataset, task family and setting, every experiment (:func:`experiment_lines`)
    and the figure of their means with the ± standard deviation band."""
    figures = figures or {}
    lines = ["# Experiments: mean ± standard deviation over seeds and class orders", "",
             "Runs that differ only by their seed and class order are one experiment (docs/reports.md): mIoU in %,"
             " mean ± sample standard deviation (n − 1 in the denominator) over the runs, per step and column;"
             " n = the number of runs that reached the step; avg = the mean over the runs of each run's average over"
             " its steps. One run: its value alone.", ""]
    for panel, members in experiment_panels(experiments).items():
        dataset, family, setting = panel
        lines += [f"## {dataset} {family} ({setting})", ""]
        for experiment in members:
            lines += experiment_lines(experiment) + [""]
        if panel in figures:
            lines += [f"![mean mIoU per step ± standard deviation]({figures[panel]})", ""]
    return lines


GROUP_COLUMNS = ("experiment", "method", "dataset", "task_family", "setting", "convention", "runs", "seeds",
                 "orders", "step", "n", *(f"{k}_{stat}" for k, _ in METRICS for stat in ("mean", "std")),
                 "mean_forgetting_mean", "mean_forgetting_std")
LIST_SEPARATOR = ";"


def group_rows(experiments):
    """``groups.csv`` rows: one per step of every experiment and its ``avg`` row: the mean and sample standard
    deviation of each column over the runs (percent; the std empty for one run), ``n`` runs at the step, the
    experiment's seeds and class orders (``;``-separated, in run order)."""
    out = []
    for experiment in experiments:
        for row in experiment.rows:
            line = {"experiment": experiment.label, "method": experiment.method, "dataset": experiment.dataset,
                    "task_family": experiment.family, "setting": experiment.setting,
                    "convention": json.dumps(experiment.convention, sort_keys=True), "runs": len(experiment.runs),
                    "seeds": LIST_SEPARATOR.join("" if s is None else str(s) for s in experiment.seeds),
                    "orders": LIST_SEPARATOR.join(experiment.orders), "step": row["step"], "n": row["n"]}
            for key, _ in METRICS:
                line[f"{key}_mean"], line[f"{key}_std"] = (_csv_value(v) for v in row[key][:2])
            forget = row.get("mean_forgetting", (None, None, 0))
            line["mean_forgetting_mean"], line["mean_forgetting_std"] = (_csv_value(v) for v in forget[:2])
            out.append(line)
    return out


def band_series(experiments):
    """The series of :func:`reports.plots.plot_miou_band`: per experiment, its label with its number of runs, the
    steps, and the mean and standard deviation of old / new / all per step."""
    series = []
    for experiment in experiments:
        rows = experiment.rows[:-1]
        series.append((f"{experiment.label} (n={len(experiment.runs)})", [row["step"] for row in rows],
                       {key: [row[key][0] for row in rows] for key in PANEL_KEYS},
                       {key: [row[key][1] for row in rows] for key in PANEL_KEYS}))
    return series


def _write_csv(rows, columns, path):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_report(runs, out_dir, allow_mixed=False, plots=True):
    """Write ``report.md``, ``report.csv``, ``forgetting.csv``, ``groups.md``, ``groups.csv`` (the experiments:
    :func:`reports.experiments.experiment_groups`) and (``plots``) the PNG figures of ``runs`` (labelled with
    :func:`label_runs`) into ``out_dir``: ``miou_mean_*.png`` for each dataset, task family and setting where an
    experiment has several runs; returns ``{name: path}`` of the files written.
    Mixed conventions raise :class:`UserError` unless ``allow_mixed``."""
    label_runs(runs)
    mixed = check_conventions(runs, allow_mixed)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the report folder {out_dir} ({err.strerror or err})") from None
    written = {}
    figures = {"miou": {}, "heatmap": {}}
    tags = convention_tags(runs) if mixed else {}
    if plots:
        for group, members in group_runs(runs).items():
            name = f"miou_{group_slug(group)}.png"
            series = [(_run_cell(r, tags), [row["step"] for row in step_rows(r)[:-1]],
                       {key: [row[key] for row in step_rows(r)[:-1]] for key in PANEL_KEYS})
                      for r in members]
            plot_miou_per_step(series, os.path.join(out_dir, name), title=f"{group[0]} {group[1]} ({group[2]})")
            figures["miou"][group] = written[name] = name
        for i, run in enumerate(runs):
            class_ids, names, _, matrix = class_iou_matrix(run)
            name = f"heatmap_{i}_{slug(run.label)}.png"
            plot_class_heatmap(matrix, [f"{c} {n}" for c, n in zip(class_ids, names)], run.steps,
                               os.path.join(out_dir, name), title=f"{run.label}: IoU per class and step")
            figures["heatmap"][run.label] = written[name] = name
    experiments = experiment_groups(runs)
    band_figures = {}
    if plots:
        for panel, members in experiment_panels(experiments).items():
            if max(len(e.runs) for e in members) < 2:
                continue  # no spread to draw
            name = f"miou_mean_{group_slug(panel)}.png"
            plot_miou_band(band_series(members), os.path.join(out_dir, name),
                           title=f"{panel[0]} {panel[1]} ({panel[2]}): mean ± standard deviation")
            band_figures[panel] = written[name] = name
    with open(os.path.join(out_dir, GROUPS_MD), "w", encoding="utf-8") as handle:
        handle.write("\n".join(groups_markdown(experiments, band_figures)))
    _write_csv(group_rows(experiments), GROUP_COLUMNS, os.path.join(out_dir, GROUPS_CSV))
    with open(os.path.join(out_dir, REPORT_MD), "w", encoding="utf-8") as handle:
        handle.write("\n".join(markdown_report(runs, mixed, figures)))
    _write_csv(csv_rows(runs), CSV_COLUMNS, os.path.join(out_dir, REPORT_CSV))
    _write_csv(forgetting_rows(runs), FORGETTING_COLUMNS, os.path.join(out_dir, FORGETTING_CSV))
    for name in (REPORT_MD, REPORT_CSV, FORGETTING_CSV, GROUPS_MD, GROUPS_CSV):
        written[name] = name
    return {name: os.path.join(out_dir, name) for name in written}
