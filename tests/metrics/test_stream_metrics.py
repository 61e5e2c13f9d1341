"""metrics/stream_metrics.py: the streaming confusion matrix and its results against confusion matrices computed by
hand (BARM metrics/stream_metrics.py::StreamSegMetrics)."""
import numpy as np
import pytest
import torch

from metrics import StreamSegMetrics
from metrics.stream_metrics import results_from_confusion


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
