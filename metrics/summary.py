"""Step summaries: mIoU over all / old / new classes, without background, and hIoU.

"old" = the classes of step 0 including background (channels ``0..n_old-1``), "new" = the classes of steps
1..t (the papers' convention: PLOP average_csv.py, DKD utils/metric.py::Evaluator). hIoU = 2·old·new /
(old + new) (DKD). The default averages every class, as BARM's ``np.mean`` over its Class IoU (a class
absent from the test ground truth and never predicted counts as 0); ``exclude_absent=True`` averages only
classes present in the ground truth, as MiB/PLOP/RCIL's StreamSegMetrics.
"""
import numpy as np

from metrics.stream_metrics import EPS


def _mean(values):
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else None


def harmonic(old, new):
    if old is None or new is None:
        return None
    return 2 * old * new / (old + new) if old + new > 0 else 0.0


def step_summary(confusion, n_old, exclude_absent=False, background=True):
    """Summary dict of a confusion matrix (rows = ground truth) with ``n_old`` classes in step 0.

    Keys: ``mIoU``, ``mIoU_old``, ``mIoU_new``, ``hIoU``; ``mIoU_nobg``, ``mIoU_old_nobg``, ``hIoU_nobg``
    (background channel 0 left out; "new" never holds it); ``n_old``, ``n_new``. At step 0 the entries
    that need new classes are None; so are the ``_nobg`` entries of a dataset without a background class
    (``background=False``: channel 0 is a class like the others).
    """
    hist = np.asarray(confusion, dtype=np.float64)
    diag, rows, cols = np.diag(hist), hist.sum(axis=1), hist.sum(axis=0)
    iou = diag / (rows + cols - diag + EPS)
    if exclude_absent:
        iou = np.where(rows > 0, iou, np.nan)
    n = len(iou)
    old, new = iou[:n_old], iou[n_old:]
    summary = {
        "n_old": int(n_old),
        "n_new": int(n - n_old),
        "mIoU": _mean(iou),
        "mIoU_old": _mean(old),
        "mIoU_new": _mean(new),
        "mIoU_nobg": _mean(iou[1:]),
        "mIoU_old_nobg": _mean(old[1:]),
    }
    summary["hIoU"] = harmonic(summary["mIoU_old"], summary["mIoU_new"])
    summary["hIoU_nobg"] = harmonic(summary["mIoU_old_nobg"], summary["mIoU_new"])
    if not background:
        summary.update(mIoU_nobg=None, mIoU_old_nobg=None, hIoU_nobg=None)
    return summary
