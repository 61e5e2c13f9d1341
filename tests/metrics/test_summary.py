"""metrics/summary.py: step summaries (old / new / harmonic mIoU) computed by hand (DKD
utils/metric.py::Evaluator)."""
import numpy as np
import pytest
import torch

from metrics import StreamSegMetrics, step_summary


def pixels_from_confusion(hist):
    """Label and prediction vectors that produce ``hist`` (rows = ground truth)."""
    labels, preds = [], []
    for gt, row in enumerate(hist):
        for pred, count in enumerate(row):
            labels += [gt] * count
            preds += [pred] * count
    return np.array(labels), np.array(preds)


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
