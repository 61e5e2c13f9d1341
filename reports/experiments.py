"""Experiments (:func:`experiment_groups`): runs read back by ``reports/runs.py`` that differ only by their seed
and class order are one experiment, reported as mean ± sample standard deviation (n − 1 in the denominator, as the papers report it) per step and
column (:func:`experiment_rows`). The same experiment means the same method, dataset, setting, evaluation
convention (and ``--test`` folder name), task *family* (:func:`task_family`: the number of classes of each step,
so VOC ``15-1`` and ``15-1_b``, ADE ``100-50``, ``100-50b`` and ``100-50c``, and a ``--task_file`` order of the same
step sizes are one family) and the same settings in every step's ``config.json`` (arguments and method
hyper-parameters) except :data:`IGNORED_ARGS`: the seed and the task (what an experiment varies), where the files
are, how the run was launched and resumed (the per-process batch and the accumulation: the global batch is
compared), the device and speed-only switches. Runs without ``config.json`` are compared on what their results
record.
"""
import functools
import math
import os
import re
from dataclasses import dataclass
from statistics import mean as _plain_mean

from reports.runs import AVERAGE_ROW, METRICS, convention_key, group_by, mean_forgetting, step_rows

#: ``config.json`` arguments that do not make two runs different experiments: what an experiment varies (the seed,
#: the task name and ``--task_file``: the class order; the recipe's name holds the task), where the files are, how
#: the run was launched, resumed and logged (processes, per-process batch, accumulation, workers: the global batch
#: is compared), the device and switches that change only the speed.
IGNORED_ARGS = frozenset({
    "random_seed", "task", "task_file", "recipe",
    "data_root", "cache_dir", "ckpt_dir", "subpath", "prev_ckpt", "keep_checkpoints",
    "curr_step", "end_step", "initial", "resume", "dry_run", "test", "test_ckpt", "visualize", "print_interval",
    "batch_size", "accumulate", "micro_batch", "val_batch_size", "num_workers",
    "device", "compile", "channels_last", "device_augment", "step0_from", "logger",
})
#: A subpath's seed suffix, as the recipes write it (``{subpath}-seed{S}``): left out of an experiment's name.
SEED_SUFFIX = re.compile(r"-seed\d+$")
OFFLINE_FAMILY = "offline"


def run_seed(run):
    """The run's seed: ``provenance.seed`` of its last step, else ``random_seed`` of its ``config.json``, else
    None (unknown)."""
    seed = (run.last.get("provenance") or {}).get("seed")
    if seed is None and run.configs and run.configs[-1]:
        seed = run.configs[-1].get("args", {}).get("random_seed")
    return seed


def class_order(run):
    """Class ids per step: of the whole task (``provenance.class_order``), else of the steps the run recorded."""
    order = (run.last.get("provenance") or {}).get("class_order") or run.last["classes"]
    return [list(step) for step in order]


def family_name(sizes):
    """The natural task name of a task whose steps hold ``sizes`` classes (step 0 with its background):
    ``[16, 1, 1, 1, 1, 1]`` -> ``"15-1"``, ``[101, 50]`` -> ``"100-50"``, ``[16, 2, 2, 1]`` -> ``"15-2"`` (the
    last step holds the remainder), ``[11, 2, 5]`` -> ``"10-2-5"``, one step -> ``"offline"``."""
    base, increments = sizes[0] - 1, list(sizes[1:])
    if not increments:
        return OFFLINE_FAMILY
    step = increments[0]
    if all(n == step for n in increments[:-1]) and increments[-1] <= step:
        return f"{base}-{step}"
    return "-".join(str(n) for n in [base, *increments])


def task_family(run):
    """The task family of a run: the natural name of its step sizes (:func:`family_name`) when its results record
    the whole class order (``provenance``), so that every order of one task is one family; else (older results,
    domain-incremental tasks) the task name it recorded."""
    provenance = run.last.get("provenance") or {}
    if run.last.get("domains") is not None or not provenance.get("class_order"):
        return str(run.last.get("task"))
    return family_name([len(step) for step in provenance["class_order"]])


def order_name(run):
    """How a run's class order is named: its task, and the ``--task_file`` that set it."""
    task_file = (run.last.get("provenance") or {}).get("task_file")
    return f"{run.last.get('task')} ({os.path.basename(task_file)})" if task_file else str(run.last.get("task"))


def _experiment_key(run):
    return (run.method, run.last.get("dataset"), task_family(run), run.last.get("setting"),
            convention_key(run.convention), run.eval_name)


def _settings(run):
    """``{step: arguments of its config.json but IGNORED_ARGS}`` of the steps that have one."""
    found = {}
    for r, config in zip(run.results, run.configs or [None] * len(run.results)):
        if config:
            found[r["step"]] = {k: v for k, v in config.get("args", {}).items() if k not in IGNORED_ARGS}
    return found


def _same_settings(a, b):
    """Whether two runs' settings agree at every step both have a ``config.json`` for."""
    first, second = _settings(a), _settings(b)
    return all(first[t] == second[t] for t in set(first) & set(second))


@dataclass
class Experiment:
    """Runs of one experiment (the same settings, other seeds or class orders) and its name."""
    runs: list
    label: str = ""

    @property
    def first(self):
        return self.runs[0]

    @property
    def method(self):
        return self.first.method

    @property
    def dataset(self):
        return self.first.last.get("dataset")

    @property
    def family(self):
        return task_family(self.first)

    @property
    def setting(self):
        return self.first.last.get("setting")

    @property
    def convention(self):
        return self.first.convention

    @property
    def panel(self):
        """``(dataset, family, setting)``: experiments of one panel go side by side (one figure)."""
        return self.dataset, self.family, self.setting

    @property
    def seeds(self):
        return [run_seed(r) for r in self.runs]

    @property
    def orders(self):
        return [order_name(r) for r in self.runs]

    @functools.cached_property
    def rows(self):
        """:func:`experiment_rows` of the experiment, computed once (its runs are read-only)."""
        return experiment_rows(self)


def experiment_groups(runs):
    """The runs as :class:`Experiment` s, in the order they first appear: a run joins the first experiment of its
    method, dataset, task family, setting, convention and ``--test`` folder name whose runs all have its settings
    (module docstring). Each gets a unique ``label``: the method, then the subpath (less a ``-seed{S}`` suffix), then
    a number."""
    experiments = []
    for run in runs:
        home = next((e for e in experiments if _experiment_key(e.first) == _experiment_key(run)
                     and all(_same_settings(run, other) for other in e.runs)), None)
        if home is None:
            experiments.append(Experiment([run]))
        else:
            home.runs.append(run)

    def name(experiment, detail):
        parts = [experiment.method]
        stem = SEED_SUFFIX.sub("", experiment.first.subpath)
        if detail and stem and stem != experiment.method:
            parts.append(f"({stem})")
        if experiment.first.eval_name:
            parts.append(f"[test {experiment.first.eval_name}]")
        return " ".join(parts)

    for detail in (0, 1):
        keys = [(e.panel, name(e, detail)) for e in experiments]
        if len(set(keys)) == len(keys):
            break
    seen = {}
    for experiment, key in zip(experiments, keys):
        seen[key] = seen.get(key, 0) + 1
        experiment.label = key[1] if seen[key] == 1 else f"{key[1]} #{seen[key]}"
    return experiments


def experiment_panels(experiments):
    """``{panel: [experiments]}`` (:attr:`Experiment.panel`) in the order the panels first appear."""
    return group_by(experiments, lambda experiment: experiment.panel)


def mean_std(values):
    """``(mean, sample standard deviation, n)`` of the defined values (None and NaN left out); the standard
    deviation divides by n − 1 and is None for fewer than 2 values, the mean None for none."""
    values = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None, 0
    centre = _plain_mean(values)
    if len(values) < 2:
        return centre, None, 1
    return centre, math.sqrt(sum((v - centre) ** 2 for v in values) / (len(values) - 1)), len(values)


def experiment_rows(experiment):
    """Per step of the experiment's runs, then ``avg`` (each run's mean over its steps, :func:`step_rows`): dicts
    with ``step``, ``n`` (runs that have the step) and, for every ``METRICS`` key, ``(mean, std, n)`` over the runs
    (fractions); the ``avg`` row also holds ``mean_forgetting``."""
    per_run = [step_rows(r) for r in experiment.runs]
    steps = sorted({row["step"] for rows in per_run for row in rows[:-1]})
    out = []
    for step in steps + [AVERAGE_ROW]:
        found = [row for rows in per_run for row in rows if row["step"] == step]
        out.append({"step": step, "n": len(found), **{key: mean_std([row[key] for row in found]) for key, _ in METRICS}})
    out[-1]["mean_forgetting"] = mean_std([mean_forgetting(r) for r in experiment.runs])
    return out
