"""Results files of a step and the summary across steps.

* ``step{t}/results.json``: BARM's metric keys (``Overall Acc``, ``Mean Acc``, ``FreqW Acc``, ``Mean IoU``,
  ``Class IoU``, ``Class Acc``, and its ``"0 to 15 mIoU"``-style old/new keys), the step summary
  (``summary``: mIoU all/old/new, without background, hIoU), the classes, and the confusion matrix.
* ``step{t}/per_class.csv``: one row per channel.
* ``summary.csv`` (in the setting folder): one row per step that has a ``results.json``.
"""
import csv
import glob
import json
import os
import re

import numpy as np

from metrics.stream_metrics import results_from_confusion
from metrics.summary import step_summary

SUMMARY_COLUMNS = ("step", "n_classes", "mIoU", "mIoU_old", "mIoU_new", "hIoU", "mIoU_nobg", "mIoU_old_nobg",
                   "hIoU_nobg", "overall_acc", "mean_acc")


def step_results(confusion, plan, method_name, class_names, checkpoint):
    results = results_from_confusion(confusion)
    n_old, n = len(plan.steps[0]), plan.num_classes
    iou = [results["Class IoU"][c] for c in range(n)]
    acc = [results["Class Acc"][c] for c in range(n)]
    results.update({
        f"0 to {n_old - 1} mIoU": float(np.mean(iou[:n_old])),
        f"0 to {n_old - 1} mAcc": float(np.mean(acc[:n_old])),
    })
    if n > n_old:
        results.update({f"{n_old} to {n - 1} mIoU": float(np.mean(iou[n_old:])),
                        f"{n_old} to {n - 1} mAcc": float(np.mean(acc[n_old:]))})
    results.update({
        "summary": step_summary(confusion, n_old),
        "dataset": plan.dataset, "task": plan.task, "setting": plan.setting, "step": plan.step,
        "method": method_name, "checkpoint": checkpoint,
        "classes": [list(s) for s in plan.steps[:plan.step + 1]],
        "class_names": class_names,
        "confusion_matrix": np.asarray(confusion, dtype=np.int64).tolist(),
    })
    return results


def write_step_results(results, step_dir):
    os.makedirs(step_dir, exist_ok=True)
    with open(os.path.join(step_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)
    confusion = np.asarray(results["confusion_matrix"])
    class_ids = [c for s in results["classes"] for c in s]
    introduced = [t for t, s in enumerate(results["classes"]) for _ in s]
    with open(os.path.join(step_dir, "per_class.csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["channel", "class_id", "name", "step", "iou", "acc", "gt_pixels", "pred_pixels"])
        for channel, (class_id, name) in enumerate(zip(class_ids, results["class_names"])):
            writer.writerow([channel, class_id, name, introduced[channel],
                             f"{results['Class IoU'][channel]:.6f}", f"{results['Class Acc'][channel]:.6f}",
                             int(confusion[channel].sum()), int(confusion[:, channel].sum())])


def write_summary(setting_dir):
    """Rebuild ``summary.csv`` from every ``step*/results.json`` of the setting folder; returns the rows."""
    rows = []
    for path in glob.glob(os.path.join(setting_dir, "step*", "results.json")):
        if not re.fullmatch(r"step\d+", os.path.basename(os.path.dirname(path))):
            continue
        with open(path, encoding="utf-8") as handle:
            results = json.load(handle)
        summary = results["summary"]
        rows.append({"step": results["step"], "n_classes": len(results["Class IoU"]),
                     **{k: summary[k] for k in SUMMARY_COLUMNS[2:9]},
                     "overall_acc": results["Overall Acc"], "mean_acc": results["Mean Acc"]})
    rows.sort(key=lambda row: row["step"])
    with open(os.path.join(setting_dir, "summary.csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row[k] is None else (f"{row[k]:.6f}" if isinstance(row[k], float) else row[k])
                             for k in SUMMARY_COLUMNS})
    return rows


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
