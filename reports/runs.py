"""Runs read back from their results files, and what the tables across steps and runs are made of: per-step mIoU (old / new / all, hIoU, without
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

Runs that differ only by their seed and class order are grouped into experiments by ``reports/experiments.py``.
"""
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
AVERAGE_ROW = "avg"  # the row of the averages over steps
#: Step summary keys reported, with their column titles.
METRICS = (("mIoU_old", "old"), ("mIoU_new", "new"), ("mIoU", "all"), ("hIoU", "hIoU"),
           ("mIoU_nobg", "all w/o bg"), ("mIoU_old_nobg", "old w/o bg"), ("hIoU_nobg", "hIoU w/o bg"))


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
    configs: list = field(default_factory=list)  # each step's config.json (None where there is none)

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


def _step_numbers(folder):
    found = []
    for name in os.listdir(folder):
        match = STEP_FOLDER.match(name)
        if match and os.path.isfile(os.path.join(folder, name, RESULTS_FILE)):
            found.append(int(match.group(1)))
    return sorted(found)


def _subpath(results, config):
    """The run's ``--subpath``: from the step's ``config.json`` content ``config`` (None: none), else the
    checkpoint path ``{ckpt_dir}/{subpath}/{task}/{setting}/step{t}/final.pth``."""
    args = (config or {}).get("args", {})
    if args.get("subpath") or args.get("method"):
        return args.get("subpath") or args.get("method")
    parts = os.path.normpath(str(results.get("checkpoint") or "")).split(os.sep)
    return parts[-5] if len(parts) >= 5 else ""


def _read_config(setting_dir, step):
    path = os.path.join(setting_dir, f"step{step}", CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


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
    eval_name = os.path.basename(base) if os.path.basename(os.path.dirname(base)) == "eval" else ""
    training = os.path.dirname(os.path.dirname(base)) if eval_name else base  # --test keeps the training config
    configs = [_read_config(training, r["step"]) for r in results]
    last_config = _read_config(base, results[-1]["step"]) if eval_name else configs[-1]  # read once
    run = Run(folder=folder, results=results, kind=kind, subpath=_subpath(results[-1], last_config),
              eval_name=eval_name, configs=configs)
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


def group_by(items, key):
    """``{key(item): [items]}`` in the order the keys first appear."""
    groups = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def group_runs(runs):
    """``{(dataset, task, setting): [runs]}`` in the order the groups first appear."""
    return group_by(runs, lambda run: run.group)


def convention_key(convention):
    return json.dumps(convention, sort_keys=True)


def convention_tags(runs):
    """``{convention key: "A", "B", ...}`` in the order the conventions first appear."""
    tags = {}
    for run in runs:
        tags.setdefault(convention_key(run.convention), chr(ord("A") + len(tags) % 26) * (1 + len(tags) // 26))
    return tags
