"""Metrics against confusion matrices and summaries computed by hand
(BARM metrics/stream_metrics.py::StreamSegMetrics, DKD utils/metric.py::Evaluator)."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metrics import StreamSegMetrics, step_summary
from metrics.stream_metrics import results_from_confusion


def pixels_from_confusion(hist):
    """Label and prediction vectors that produce ``hist`` (rows = ground truth)."""
    labels, preds = [], []
    for gt, row in enumerate(hist):
        for pred, count in enumerate(row):
            labels += [gt] * count
            preds += [pred] * count
    return np.array(labels), np.array(preds)


def test_confusion_and_results_by_hand():
    labels = torch.tensor([[0, 0, 1], [1, 2, 255], [3, 2, 1]])  # 255 and 3 (>= n_classes) are ignored
    preds = torch.tensor([[0, 1, 1], [1, 0, 2], [0, 2, 2]])
    metrics = StreamSegMetrics(3)
    metrics.update(labels, preds)
    expected = np.array([[1, 1, 0], [0, 2, 1], [1, 0, 1]])
    assert (metrics.confusion_matrix == expected).all()
    results = metrics.get_results()
    # diag 1,2,1; rows 2,3,2; cols 2,3,2; total 7
    assert results["Overall Acc"] == pytest.approx(4 / 7)
    assert results["Mean Acc"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3, abs=1e-6)
    iou = [1 / 3, 2 / 4, 1 / 3]
    assert [results["Class IoU"][c] for c in range(3)] == pytest.approx(iou, abs=1e-6)
    assert results["Mean IoU"] == pytest.approx(sum(iou) / 3, abs=1e-6)
    assert results["FreqW Acc"] == pytest.approx(2 / 7 * iou[0] + 3 / 7 * iou[1] + 2 / 7 * iou[2], abs=1e-6)
    assert results["Class Acc"][1] == pytest.approx(2 / 3, abs=1e-6)


def test_absent_class_scores_zero_not_nan():
    hist = np.array([[2, 0], [0, 0]])
    results = results_from_confusion(hist)
    assert results["Class IoU"][1] == 0.0
    assert results["Mean IoU"] == pytest.approx(0.5, abs=1e-6)


def test_updates_accumulate_and_accept_numpy():
    metrics = StreamSegMetrics([2, 1])  # BARM passes the per-step list
    assert metrics.n_classes == 3
    metrics.update(np.array([0, 1]), np.array([0, 1]))
    metrics.update(torch.tensor([2, 2]), torch.tensor([2, 0]))
    assert metrics.confusion_matrix.tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    metrics.reset()
    assert metrics.confusion_matrix.sum() == 0
    with pytest.raises(RuntimeError, match="predictions must lie in 0..2"):  # a device-side assertion
        metrics.update(torch.tensor([0, 1]), torch.tensor([0, 5]))


HIST = np.array([[3, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])  # class 3 absent


def test_step_summary_by_hand():
    metrics = StreamSegMetrics(4)
    metrics.update(*map(torch.as_tensor, pixels_from_confusion(HIST)))
    summary = step_summary(metrics.confusion_matrix, n_old=2)
    iou = [3 / 5, 2 / 3, 1 / 2, 0.0]
    old, new = (iou[0] + iou[1]) / 2, (iou[2] + iou[3]) / 2
    assert summary["mIoU"] == pytest.approx(sum(iou) / 4, abs=1e-6)
    assert summary["mIoU_old"] == pytest.approx(old, abs=1e-6)
    assert summary["mIoU_new"] == pytest.approx(new, abs=1e-6)
    assert summary["hIoU"] == pytest.approx(2 * old * new / (old + new), abs=1e-6)
    assert summary["mIoU_nobg"] == pytest.approx(sum(iou[1:]) / 3, abs=1e-6)
    assert summary["mIoU_old_nobg"] == pytest.approx(iou[1], abs=1e-6)
    assert summary["hIoU_nobg"] == pytest.approx(2 * iou[1] * new / (iou[1] + new), abs=1e-6)
    assert summary["mIoU"] == pytest.approx(metrics.get_results()["Mean IoU"])
    assert (summary["n_old"], summary["n_new"]) == (2, 2)


def test_step_summary_excluding_absent_classes():
    summary = step_summary(HIST, n_old=2, exclude_absent=True)
    iou = [3 / 5, 2 / 3, 1 / 2]
    assert summary["mIoU"] == pytest.approx(sum(iou) / 3, abs=1e-6)
    assert summary["mIoU_new"] == pytest.approx(0.5, abs=1e-6)
    old = (iou[0] + iou[1]) / 2
    assert summary["hIoU"] == pytest.approx(2 * old * 0.5 / (old + 0.5), abs=1e-6)


def test_step_zero_summary_has_no_new_classes():
    summary = step_summary(np.eye(3), n_old=3)
    assert summary["mIoU_new"] is None and summary["hIoU"] is None
    assert summary["mIoU_old"] == pytest.approx(1.0, abs=1e-6)


def _all_reduce_worker(rank, world, init_file, queue):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    metrics = StreamSegMetrics(3)
    metrics.update(torch.tensor([rank, 2]), torch.tensor([rank, 1]))
    metrics.all_reduce()
    queue.put((rank, metrics.confusion_matrix.tolist()))
    dist.destroy_process_group()


def test_all_reduce_sums_over_processes(tmp_path):
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_all_reduce_worker, args=(2, os.path.join(tmp_path, "init"), queue), nprocs=2,
                       start_method="spawn")
    results = dict(queue.get() for _ in range(2))
    expected = [[1, 0, 0], [0, 1, 0], [0, 2, 0]]
    assert results[0] == expected and results[1] == expected
