"""Streaming confusion matrix with BARM's StreamSegMetrics results (BARM metrics/stream_metrics.py::StreamSegMetrics).

The matrix is accumulated on the tensors' device with one ``bincount`` per update (no host transfer per
batch) and summed across processes by :meth:`StreamSegMetrics.all_reduce` when ``torch.distributed`` is
initialised. Ground-truth values outside ``0..n_classes-1`` (void 255, classes of later steps) are
ignored. Results use the reference formulas, in float64: the ``+1e-6`` in the denominators makes a class
absent from both ground truth and prediction score 0 (not NaN), and it counts in the mean.
"""
import numpy as np
import torch
import torch.distributed as dist

EPS = 1e-6


class StreamSegMetrics:
    def __init__(self, n_classes, device=None):
        if isinstance(n_classes, (list, tuple)):  # BARM passes its per-step list of class counts
            n_classes = sum(n_classes)
        self.n_classes = int(n_classes)
        self.device = device
        self.confusion = None
        self.reset()

    def reset(self):
        self.confusion = torch.zeros(self.n_classes, self.n_classes, dtype=torch.int64, device=self.device)

    def update(self, labels, preds):
        """Add a batch: ``labels`` and ``preds`` are integer tensors or arrays of the same shape."""
        labels = torch.as_tensor(labels)
        preds = torch.as_tensor(preds)
        if labels.shape != preds.shape:
            raise ValueError(f"labels {tuple(labels.shape)} and preds {tuple(preds.shape)} differ in shape")
        if self.confusion.device != labels.device:
            self.confusion = self.confusion.to(labels.device)
        labels = labels.reshape(-1).to(torch.int64)
        preds = preds.reshape(-1).to(device=labels.device, dtype=torch.int64)
        n = self.n_classes
        valid = (labels >= 0) & (labels < n)
        # predictions outside 0..n-1 would land in other cells: checked on the device, without waiting for it
        torch._assert_async(((preds >= 0) & (preds < n)).all(), f"predictions must lie in 0..{n - 1}")
        index = torch.where(valid, n * labels + preds, n * n)  # invalid pixels count in an extra bin, dropped
        counts = torch.bincount(index, minlength=n * n + 1)[:n * n]
        self.confusion += counts.view(n, n)

    def all_reduce(self):
        """Sum the matrix over all processes (no-op when not distributed)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.confusion, op=dist.ReduceOp.SUM)

    @property
    def confusion_matrix(self):
        """The matrix as float64 numpy (rows = ground truth, columns = prediction)."""
        return self.confusion.detach().cpu().numpy().astype(np.float64)

    def get_results(self):
        return results_from_confusion(self.confusion_matrix)


def results_from_confusion(hist):
    """BARM's result dict from a confusion matrix (rows = ground truth)."""
    hist = np.asarray(hist, dtype=np.float64)
    diag, rows, cols = np.diag(hist), hist.sum(axis=1), hist.sum(axis=0)
    total = hist.sum()
    acc = diag.sum() / total if total else 0.0
    acc_cls = diag / (rows + EPS)
    iou = diag / (rows + cols - diag + EPS)
    freq = rows / total if total else rows
    classes = range(len(diag))
    return {
        "Overall Acc": float(acc),
        "Mean Acc": float(np.nanmean(acc_cls)),
        "FreqW Acc": float((freq[freq > 0] * iou[freq > 0]).sum()),
        "Mean IoU": float(np.nanmean(iou)),
        "Class IoU": {c: float(iou[c]) for c in classes},
        "Class Acc": {c: float(acc_cls[c]) for c in classes},
    }
