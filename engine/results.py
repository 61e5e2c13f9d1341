"""Results files of a step and the summary across steps.

* ``step{t}/results.json``: BARM's metric keys (``Overall Acc``, ``Mean Acc``, ``FreqW Acc``, ``Mean IoU``,
  ``Class IoU``, ``Class Acc``, and its ``"0 to 15 mIoU"``-style old/new keys), the step summary
  (``summary``: mIoU all/old/new, without background, hIoU), the classes, and the confusion matrix.
* ``step{t}/per_class.csv``: one row per channel.
* ``summary.csv`` (in the setting folder): one row per step of the run that produced the newest step (each
  ``results.json`` names its run and the run of the checkpoint it started from: ``run_id``, ``parent_id``).

Every file is written atomically (a temporary file beside it, then a rename).
"""
import csv
import json
import os

import numpy as np
import torch

from datasets import get_layout
from metrics.stream_metrics import results_from_confusion
from metrics.summary import step_summary
from utils.hardware import cpu_model
from utils.jsonfile import write_json

#: What produced a number, in ``results.json`` (``provenance``) and as the last columns of ``summary.csv``.
PROVENANCE_COLUMNS = ("seed", "class_order", "global_batch", "accumulate", "processes", "torch", "device")
SUMMARY_COLUMNS = ("step", "n_classes", "mIoU", "mIoU_old", "mIoU_new", "hIoU", "mIoU_nobg", "mIoU_old_nobg",
                   "hIoU_nobg", "overall_acc", "mean_acc") + PROVENANCE_COLUMNS


def device_name(device):
    """What ran the computation: the GPU's name on CUDA, else the CPU's model."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def provenance(config, ctx, world_size, device):
    """What produced a step's numbers: the seed, the class order (class ids per step of the whole task, and the
    ``--task_file`` that set it, if any), the batch (global, per process, micro-batch, accumulation), the number of
    processes, and the software and device."""
    return {"seed": config.random_seed, "class_order": [list(s) for s in ctx.steps], "task_file": config.task_file,
            "global_batch": config.global_batch, "batch_per_process": config.batch_size,
            "micro_batch": config.micro_batch, "accumulate": config.accumulate, "processes": world_size,
            "torch": str(torch.__version__), "cuda": torch.version.cuda, "device": device_name(device)}


def class_order_text(order):
    """A class order as one field: the steps' class ids, steps separated by ``|`` (``0 1 2 | 3 | 4``)."""
    return " | ".join(" ".join(str(c) for c in step) for step in order)


def step_results(confusion, ctx, method_name, class_names, checkpoint, convention=None):
    """The results dict of a step's test confusion matrix; ``convention`` is the method's evaluation
    convention (``Method.eval_convention``: ``exclude_absent`` and how background and absent classes count),
    recorded under ``convention`` and applied to ``summary``."""
    convention = dict(convention or {"background_in_old": True, "exclude_absent": False})
    results = results_from_confusion(confusion)
    n_old, n = len(ctx.steps[0]), ctx.num_classes
    iou = [results["Class IoU"][c] for c in range(n)]
    acc = [results["Class Acc"][c] for c in range(n)]
    results.update({
        f"0 to {n_old - 1} mIoU": float(np.mean(iou[:n_old])),
        f"0 to {n_old - 1} mAcc": float(np.mean(acc[:n_old])),
    })
    layout = get_layout(ctx.dataset, ctx.data_root)
    if n > n_old:
        results.update({f"{n_old} to {n - 1} mIoU": float(np.mean(iou[n_old:])),
                        f"{n_old} to {n - 1} mAcc": float(np.mean(acc[n_old:]))})
    results.update({
        "summary": step_summary(confusion, n_old, exclude_absent=convention.get("exclude_absent", False),
                                background=getattr(layout, "BACKGROUND_CHANNEL", True)),
        "convention": convention,
        "dataset": ctx.dataset, "task": ctx.task, "setting": ctx.setting, "step": ctx.step,
        "method": method_name, "checkpoint": checkpoint,
        "classes": [list(s) for s in ctx.steps[:ctx.step + 1]],
        "class_names": class_names,
        # domain-incremental tasks: the domains of steps 0..t, whose held-out images the step was tested on
        **({"domains": [list(d) for d in ctx.domains[:ctx.step + 1]],
            "domain_names": [layout.CITIES[d] for s in ctx.domains[:ctx.step + 1] for d in s]}
           if ctx.domains is not None else {}),
        "confusion_matrix": np.asarray(confusion, dtype=np.int64).tolist(),
    })
    return results


def write_step_results(results, step_dir):
    write_json(results, os.path.join(step_dir, "results.json"))
    confusion = np.asarray(results["confusion_matrix"])
    class_ids = [c for s in results["classes"] for c in s]
    introduced = [t for t, s in enumerate(results["classes"]) for _ in s]
    path = os.path.join(step_dir, "per_class.csv")
    tmp = os.path.join(step_dir, f".per_class.csv.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["channel", "class_id", "name", "step", "iou", "acc", "gt_pixels", "pred_pixels"])
            for channel, (class_id, name) in enumerate(zip(class_ids, results["class_names"])):
                writer.writerow([channel, class_id, name, introduced[channel],
                                 f"{results['Class IoU'][channel]:.6f}", f"{results['Class Acc'][channel]:.6f}",
                                 int(confusion[channel].sum()), int(confusion[:, channel].sum())])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_results(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def summary_row(results):
    """One ``summary.csv`` row: the step's summary, then its provenance (empty for results that have none)."""
    summary = results["summary"]
    origin = results.get("provenance") or {}
    return {"step": results["step"], "n_classes": len(results["Class IoU"]),
            **{k: summary[k] for k in SUMMARY_COLUMNS[2:9]},
            "overall_acc": results["Overall Acc"], "mean_acc": results["Mean Acc"],
            **{k: origin.get(k) for k in PROVENANCE_COLUMNS},
            "class_order": class_order_text(origin["class_order"]) if origin.get("class_order") else None}


def chain_results(setting_dir, last_step):
    """The results of steps 0..``last_step`` that belong to one run: from ``step{last_step}/results.json`` back
    through each step's ``parent_id`` (results of other runs, e.g. of an older step 0, are left out)."""
    chain = []
    expected = None
    for step in range(last_step, -1, -1):
        path = os.path.join(setting_dir, f"step{step}", "results.json")
        if not os.path.exists(path):
            break
        results = read_results(path)
        if step < last_step and (expected is None or results.get("run_id") != expected):
            break
        chain.append(results)
        expected = results.get("parent_id")
    return chain[::-1]


def write_summary_rows(rows, path):
    """``summary.csv`` at ``path`` (atomically) from summary rows; returns the rows."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: "" if row[k] is None else (f"{row[k]:.6f}" if isinstance(row[k], float) else row[k])
                                 for k in SUMMARY_COLUMNS})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return rows


def write_summary(setting_dir, last_step):
    """Rebuild ``summary.csv`` in the setting folder from the steps of the run that ends at ``last_step``."""
    rows = [summary_row(r) for r in chain_results(setting_dir, last_step)]
    return write_summary_rows(rows, os.path.join(setting_dir, "summary.csv"))


def _pct(value):
    return "   -  " if value is None else f"{100 * value:6.2f}"


def format_step(results):
    """The per-class table and the summary line of one step, as printed after the step."""
    lines = [f"step {results['step']} of {results['dataset']} {results['task']} ({results['setting']}),"
             f" {results['method']}: test mIoU {100 * results['Mean IoU']:.2f}",
             f"  {'ch':>3} {'class':<20} {'IoU':>6} {'Acc':>6}"]
    for channel, name in enumerate(results["class_names"]):
        lines.append(f"  {channel:>3} {name:<20} {_pct(results['Class IoU'][channel])}"
                     f" {_pct(results['Class Acc'][channel])}")
    s = results["summary"]
    lines.append(f"  mIoU all {_pct(s['mIoU'])} | old {_pct(s['mIoU_old'])} | new {_pct(s['mIoU_new'])}"
                 f" | hIoU {_pct(s['hIoU'])} | without background: all {_pct(s['mIoU_nobg'])}"
                 f" old {_pct(s['mIoU_old_nobg'])}")
    return "\n".join(lines)


def format_summary(rows):
    """The table across steps (mIoU in %)."""
    lines = [f"{'step':>4} {'classes':>7} {'mIoU':>6} {'old':>6} {'new':>6} {'hIoU':>6}"]
    for row in rows:
        lines.append(f"{row['step']:>4} {row['n_classes']:>7} {_pct(row['mIoU'])} {_pct(row['mIoU_old'])}"
                     f" {_pct(row['mIoU_new'])} {_pct(row['hIoU'])}")
    return "\n".join(lines)
