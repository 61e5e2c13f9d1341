"""Tables across steps and runs from the results files: per-step mIoU (old / new / all, hIoU, without
background), the average over steps, per-class IoU over steps and forgetting.

A run is read from one folder (see :func:`load_run`):

* a setting folder ``{ckpt_dir}/{subpath}/{task}/{overlap|disjoint}``: the chain of steps that ends at its
  highest ``step{t}/results.json`` (``engine.results.chain_results``: earlier steps must be the ones that
  step started from, ``parent_id``);
* a step folder ``.../step{t}``: the chain that ends at that step;
* a ``--test`` folder ``.../eval/{crop<N>|full}``: the same, from the re-evaluated steps.

Every number is read as recorded, in the run's evaluation convention (``results.json``'s ``convention``:
``background_in_old``, ``exclude_absent``, ...). Runs whose conventions differ are not put in one column
unless asked (``allow_mixed``), and the table then names each run's convention.

Definitions (fractions in the data, percent in the tables):

* per-step values: ``summary`` of each step's ``results.json`` (``metrics.summary.step_summary``);
* average over steps ("avg"): mean of a column over the run's steps where it is defined (old/new/hIoU need
  new classes, so from step 1 on);
* per-class IoU at step t: ``Class IoU`` of the class's channel at step t; with ``exclude_absent`` a class
  absent from step t's ground truth (zero row in the confusion matrix) has no IoU at t;
* forgetting of a class = best IoU over the steps from the one that introduced it to the last, minus its IoU
  at the last step (≥ 0; 0 for the last step's classes); the run's mean forgetting averages the classes of
  the steps before the last (background counted when the convention puts it with the old classes).
"""
import csv
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from engine.results import chain_results
from utils.errors import UserError

log = logging.getLogger("ciss")

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
STEP_FOLDER = re.compile(r"^step(\d+)$")
#: Convention of results files that record none (BARM's: background old, absent classes count as 0).
DEFAULT_CONVENTION = {"background_in_old": True, "exclude_absent": False}
#: Step summary keys reported, with their column titles.
METRICS = (("mIoU_old", "old"), ("mIoU_new", "new"), ("mIoU", "all"), ("hIoU", "hIoU"),
           ("mIoU_nobg", "all w/o bg"), ("mIoU_old_nobg", "old w/o bg"), ("hIoU_nobg", "hIoU w/o bg"))
PERCENT = 100.0
AVERAGE_ROW = "avg"
CSV_DECIMALS = 4
MD_DECIMALS = 2
MISSING = "-"
REPORT_MD = "report.md"
REPORT_CSV = "report.csv"
FORGETTING_CSV = "forgetting.csv"


@dataclass
class Run:
    """One run's chain of steps (``results``: the ``results.json`` dicts, step order) and how to name it."""
    folder: str
    results: list
    label: str = ""
    kind: str = "setting"  # "setting", "step" or "eval"
    subpath: str = ""
    eval_name: str = ""
    notes: list = field(default_factory=list)

    @property
    def last(self):
        return self.results[-1]

    @property
    def method(self):
        return self.last.get("method", "?")

    @property
    def group(self):
        """``(dataset, task, setting)``: runs of one group go side by side."""
        return self.last.get("dataset"), self.last.get("task"), self.last.get("setting")

    @property
    def steps(self):
        return [r["step"] for r in self.results]

    @property
    def convention(self):
        return convention_of(self.last)


def convention_of(results):
    """The evaluation convention recorded in a ``results.json`` dict (BARM's when none is recorded)."""
    return dict(results.get("convention") or DEFAULT_CONVENTION)


def describe_convention(convention):
    """One phrase naming a convention, e.g. "background with the old classes, absent classes count as 0"."""
    bg = "background with the old classes" if convention.get("background_in_old", True) else \
        "background not with the old classes"
    absent = "absent classes left out" if convention.get("exclude_absent", False) else "absent classes count as 0"
    others = [f"{k.replace('_', ' ')}: {v}" for k, v in sorted(convention.items()) if k not in DEFAULT_CONVENTION]
    return ", ".join([bg, absent, *others])


# ---- reading runs ---------------------------------------------------------------------------------------

def _step_numbers(folder):
    found = []
    for name in os.listdir(folder):
        match = STEP_FOLDER.match(name)
        if match and os.path.isfile(os.path.join(folder, name, RESULTS_FILE)):
            found.append(int(match.group(1)))
    return sorted(found)


def _subpath(results, base):
    """The run's ``--subpath``: from the step's ``config.json``, else the checkpoint path
    ``{ckpt_dir}/{subpath}/{task}/{setting}/step{t}/final.pth``."""
    config = os.path.join(base, f"step{results['step']}", CONFIG_FILE)
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as handle:
            args = json.load(handle).get("args", {})
        if args.get("subpath") or args.get("method"):
            return args.get("subpath") or args.get("method")
    parts = os.path.normpath(str(results.get("checkpoint") or "")).split(os.sep)
    return parts[-5] if len(parts) >= 5 else ""


def load_run(folder, label=None):
    """The :class:`Run` in ``folder`` (a setting folder, a step folder ``step{t}`` or a ``--test`` folder
    ``eval/{crop<N>|full}``); a folder without results is a :class:`UserError`."""
    folder = os.path.normpath(folder)
    if not os.path.isdir(folder):
        raise UserError(f"run folder {folder} does not exist: expected a setting folder"
                        f" ({{ckpt_dir}}/{{subpath}}/{{task}}/{{overlap|disjoint}}), a step folder or an eval folder")
    match = STEP_FOLDER.match(os.path.basename(folder))
    if match and os.path.isfile(os.path.join(folder, RESULTS_FILE)):
        base, last, kind = os.path.dirname(folder), int(match.group(1)), "step"
    else:
        steps = _step_numbers(folder)
        if not steps:
            raise UserError(f"run folder {folder} holds no step*/{RESULTS_FILE}: expected a setting folder"
                            f" ({{ckpt_dir}}/{{subpath}}/{{task}}/{{overlap|disjoint}}), a step folder step<t> or a"
                            f" --test folder eval/<crop<N>|full>")
        base, last, kind = folder, steps[-1], "setting"
    if os.path.basename(os.path.dirname(base)) == "eval":
        kind = "eval" if kind == "setting" else kind
    try:
        results = chain_results(base, last)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the results in {base}: {err}") from None
    for r in results:
        missing = [k for k in ("step", "summary", "Class IoU", "classes") if k not in r]
        if missing:
            raise UserError(f"{os.path.join(base, 'step' + str(r.get('step', '?')), RESULTS_FILE)} lacks"
                            f" {', '.join(missing)}: expected a results file written by ciss")
    run = Run(folder=folder, results=results, kind=kind, subpath=_subpath(results[-1], base),
              eval_name=os.path.basename(base) if os.path.basename(os.path.dirname(base)) == "eval" else "")
    if results[0]["step"] != 0:
        run.notes.append(f"steps 0..{results[0]['step'] - 1} of {base} belong to another run (or are missing):"
                         f" only steps {results[0]['step']}..{last} are reported")
        log.warning("%s: %s", folder, run.notes[-1])
    if label:
        run.label = label
    return run


def label_runs(runs):
    """Give every run without a label a unique one: its method (and ``[test <folder>]`` for a ``--test``
    folder), then its subpath, then its folder where needed to tell runs apart, and finally a number (the
    same folder given twice)."""
    def name(run, detail):
        parts = [run.method]
        if detail >= 1 and run.subpath and run.subpath != run.method:
            parts.append(f"({run.subpath})")
        if run.eval_name:
            parts.append(f"[test {run.eval_name}]")
        if detail >= 2:
            parts.append(f"<{run.folder}>")
        return " ".join(parts)

    unlabelled = [r for r in runs if not r.label]
    fixed = [r.label for r in runs if r.label]
    for detail in (0, 1, 2, 1):  # the last: the folders do not tell them apart either
        names = [name(r, detail) for r in unlabelled]
        if len(set(names + fixed)) == len(runs):
            break
    for run, label in zip(unlabelled, names):
        run.label = label
    seen = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run.label = f"{run.label} #{seen[run.label]}"
    return runs


def check_conventions(runs, allow_mixed=False):
    """Refuse runs (or steps of one run) with different evaluation conventions in one report unless
    ``allow_mixed``; returns whether the conventions are mixed."""
    for run in runs:
        for r in run.results:
            if convention_of(r) != run.convention:
                if not allow_mixed:
                    raise UserError(f"run {run.folder} has steps with different evaluation conventions"
                                    f" (step {r['step']}: {describe_convention(convention_of(r))}; step"
                                    f" {run.last['step']}: {describe_convention(run.convention)}): pass"
                                    f" --allow_mixed_conventions to report them anyway")
                return True
    conventions = {json.dumps(r.convention, sort_keys=True): r for r in runs}
    if len(conventions) > 1:
        if not allow_mixed:
            a, b = list(conventions.values())[:2]
            raise UserError(f"runs with different evaluation conventions cannot share a column: {a.label}"
                            f" ({describe_convention(a.convention)}) and {b.label}"
                            f" ({describe_convention(b.convention)}); report them separately or pass"
                            f" --allow_mixed_conventions (the table then names each run's convention)")
        return True
    return False


# ---- numbers ---------------------------------------------------------------------------------------------

def _mean(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else None


def step_rows(run):
    """One dict per step: ``step``, ``n_classes`` and every ``METRICS`` key (fractions, None where
    undefined), then the ``avg`` row (mean over the steps where a column is defined)."""
    rows = []
    for r in run.results:
        summary = r["summary"]
        rows.append({"step": r["step"], "n_classes": len(r["Class IoU"]),
                     **{key: summary.get(key) for key, _ in METRICS}})
    average = {"step": AVERAGE_ROW, "n_classes": None}
    average.update({key: _mean([row[key] for row in rows]) for key, _ in METRICS})
    return rows + [average]


def class_iou_matrix(run):
    """``(class_ids, names, introduced, matrix)`` of the last step's channels: ``matrix[c, i]`` is channel c's
    IoU at the run's i-th step, NaN before the class exists or (``exclude_absent``) when it is absent from
    that step's ground truth. ``introduced[c]`` is the task step that added channel c."""
    last = run.last
    class_ids = [c for s in last["classes"] for c in s]
    introduced = [t for t, s in enumerate(last["classes"]) for _ in s]
    names = list(last.get("class_names") or [str(c) for c in class_ids])
    matrix = np.full((len(class_ids), len(run.results)), np.nan)
    for i, r in enumerate(run.results):
        ious = r["Class IoU"]
        absent = set()
        if convention_of(r).get("exclude_absent", False) and r.get("confusion_matrix") is not None:
            rows = np.asarray(r["confusion_matrix"]).sum(axis=1)
            absent = {c for c in range(len(rows)) if rows[c] == 0}
        for channel in range(min(len(class_ids), len(ious))):
            if channel not in absent:
                matrix[channel, i] = float(ious[str(channel)] if str(channel) in ious else ious[channel])
    return class_ids, names, introduced, matrix


def forgetting(run):
    """Per class of the last step: dicts with ``channel``, ``class_id``, ``name``, ``introduced``,
    ``best_iou``, ``best_step``, ``final_iou``, ``forgetting`` = best − final (fractions; None where the
    class has no IoU at the last step or at any step)."""
    class_ids, names, introduced, matrix = class_iou_matrix(run)
    steps = run.steps
    rows = []
    for c, (class_id, name) in enumerate(zip(class_ids, names)):
        seen = [(matrix[c, i], steps[i]) for i in range(len(steps))
                if steps[i] >= introduced[c] and not math.isnan(matrix[c, i])]
        final = matrix[c, -1]
        best, best_step = max(seen, key=lambda pair: pair[0]) if seen else (None, None)
        final = None if math.isnan(final) else float(final)
        rows.append({"channel": c, "class_id": class_id, "name": name, "introduced": introduced[c],
                     "best_iou": None if best is None else float(best), "best_step": best_step,
                     "final_iou": final,
                     "forgetting": None if final is None or best is None else float(best) - final})
    return rows


def mean_forgetting(run, rows=None):
    """Mean forgetting over the classes of the steps before the run's last step (background included only
    when the convention counts it with the old classes); None at step 0."""
    rows = forgetting(run) if rows is None else rows
    last_step = run.last["step"]
    with_bg = run.convention.get("background_in_old", True)
    return _mean([r["forgetting"] for r in rows
                  if r["introduced"] < last_step and (with_bg or r["channel"] != 0)])


# ---- tables ----------------------------------------------------------------------------------------------

def _pct(value, decimals=MD_DECIMALS):
    return MISSING if value is None or (isinstance(value, float) and math.isnan(value)) else \
        f"{PERCENT * value:.{decimals}f}"


def _md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return lines


def group_runs(runs):
    """``{(dataset, task, setting): [runs]}`` in the order the groups first appear."""
    groups = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return groups


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


def convention_key(convention):
    return json.dumps(convention, sort_keys=True)


def convention_tags(runs):
    """``{convention key: "A", "B", ...}`` in the order the conventions first appear."""
    tags = {}
    for run in runs:
        tags.setdefault(convention_key(run.convention), chr(ord("A") + len(tags) % 26) * (1 + len(tags) // 26))
    return tags


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


def _write_csv(rows, columns, path):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_report(runs, out_dir, allow_mixed=False, plots=True):
    """Write ``report.md``, ``report.csv``, ``forgetting.csv`` and (``plots``) the PNG figures of ``runs``
    (labelled with :func:`label_runs`) into ``out_dir``; returns ``{name: path}`` of the files written.
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
        from utils.plots import plot_class_heatmap, plot_miou_per_step
        for group, members in group_runs(runs).items():
            name = f"miou_{group_slug(group)}.png"
            series = [(_run_cell(r, tags), [row["step"] for row in step_rows(r)[:-1]],
                       {key: [row[key] for row in step_rows(r)[:-1]] for key in ("mIoU_old", "mIoU_new", "mIoU")})
                      for r in members]
            plot_miou_per_step(series, os.path.join(out_dir, name), title=f"{group[0]} {group[1]} ({group[2]})")
            figures["miou"][group] = written[name] = name
        for i, run in enumerate(runs):
            class_ids, names, _, matrix = class_iou_matrix(run)
            name = f"heatmap_{i}_{slug(run.label)}.png"
            plot_class_heatmap(matrix, [f"{c} {n}" for c, n in zip(class_ids, names)], run.steps,
                               os.path.join(out_dir, name), title=f"{run.label}: IoU per class and step")
            figures["heatmap"][run.label] = written[name] = name
    with open(os.path.join(out_dir, REPORT_MD), "w", encoding="utf-8") as handle:
        handle.write("\n".join(markdown_report(runs, mixed, figures)))
    _write_csv(csv_rows(runs), CSV_COLUMNS, os.path.join(out_dir, REPORT_CSV))
    _write_csv(forgetting_rows(runs), FORGETTING_COLUMNS, os.path.join(out_dir, FORGETTING_CSV))
    for name in (REPORT_MD, REPORT_CSV, FORGETTING_CSV):
        written[name] = name
    return {name: os.path.join(out_dir, name) for name in written}
