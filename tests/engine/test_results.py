"""engine/results.py: the provenance of a step's numbers (results.json) and its columns in summary.csv."""
import csv

import torch

from engine.config import RunConfig
from engine.results import (PROVENANCE_COLUMNS, SUMMARY_COLUMNS, class_order_text, device_name, provenance,
                            summary_row, write_summary_rows)
from methods.base import StepContext

SUMMARY = {"mIoU": 0.5, "mIoU_old": 0.6, "mIoU_new": 0.2, "hIoU": 0.3, "mIoU_nobg": 0.4, "mIoU_old_nobg": 0.55,
           "hIoU_nobg": 0.29}


def _results(origin=None):
    results = {"step": 1, "Class IoU": [0.1] * 5, "summary": SUMMARY, "Overall Acc": 0.9, "Mean Acc": 0.7}
    if origin is not None:
        results["provenance"] = origin
    return results


def test_provenance_records_seed_order_batch_software_and_device():
    config = RunConfig({"random_seed": 7, "task_file": "order.json", "global_batch": 24, "batch_size": 12,
                        "micro_batch": 6, "accumulate": 2})
    ctx = StepContext("voc", ((0, 2, 1), (4,), (3,)), 1)
    origin = provenance(config, ctx, 2, torch.device("cpu"))
    assert origin == {"seed": 7, "class_order": [[0, 2, 1], [4], [3]], "task_file": "order.json",
                      "global_batch": 24, "batch_per_process": 12, "micro_batch": 6, "accumulate": 2,
                      "processes": 2, "torch": torch.__version__, "cuda": torch.version.cuda,
                      "device": device_name(torch.device("cpu"))}
    assert origin["device"]  # the CPU's model name (or the machine type)


def test_summary_rows_carry_the_provenance_and_old_results_leave_it_empty(tmp_path):
    origin = {"seed": 7, "class_order": [[0, 2, 1], [4], [3]], "global_batch": 24, "accumulate": 2,
              "processes": 2, "torch": "2.5.0", "device": "NVIDIA A100"}
    assert class_order_text(origin["class_order"]) == "0 2 1 | 4 | 3"
    path = tmp_path / "summary.csv"
    write_summary_rows([summary_row(_results(origin)), summary_row(_results())], path)
    with open(path, encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames) == SUMMARY_COLUMNS and SUMMARY_COLUMNS[-len(PROVENANCE_COLUMNS):] == PROVENANCE_COLUMNS
    assert {k: rows[0][k] for k in PROVENANCE_COLUMNS} == {
        "seed": "7", "class_order": "0 2 1 | 4 | 3", "global_batch": "24", "accumulate": "2", "processes": "2",
        "torch": "2.5.0", "device": "NVIDIA A100"}
    assert rows[0]["mIoU"] == "0.500000"
    assert all(rows[1][k] == "" for k in PROVENANCE_COLUMNS)
