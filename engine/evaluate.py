"""Evaluation: predictions of a model over a loader into an all-reduced confusion matrix.

The end-of-step test and ``--test`` both go through :func:`evaluate_state` (a fresh model built by the method
and loaded with the step's weights), so they give the same numbers. Evaluation runs in fp32 without autocast
(BARM trainer/trainer.py::Trainer.validate).
"""
import contextlib

import torch

from engine.data import eval_loader, to_batch
from engine.models import build_eval_model, to_device, use_channels_last
from metrics import StreamSegMetrics
from utils.logging import progress


@contextlib.contextmanager
def deterministic_cudnn():
    """cuDNN's deterministic kernels, without autotuning, for the duration: the end-of-step test and a later
    ``--test`` then pick the same algorithms and give the same numbers (training keeps autotuning)."""
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


def evaluate(model, method, loader, num_classes, device, channels_last, show_progress, desc="eval"):
    """Confusion matrix of ``model`` over ``loader`` (summed over ranks). Leaves the model in eval mode."""
    model.eval()
    metrics = StreamSegMetrics(num_classes, device=device)
    with torch.no_grad(), deterministic_cudnn():
        for raw in progress(loader, show_progress, desc=desc):
            batch = to_batch(raw, device, channels_last)
            logits, _ = model(batch.images)
            metrics.update(batch.labels, method.predict(logits, batch.labels.shape[-2:]))
    metrics.all_reduce()
    return metrics


def evaluate_state(ctx, config, method, spec, state, dist_info, path=None):
    """Test-split confusion matrix (float64 numpy) of the step's weights ``state`` (read from ``path``, default
    the step's ``final.pth``: named when the weights do not fit)."""
    model = to_device(build_eval_model(method, spec, ctx, state, path or ctx.final_path()), config, dist_info.device)
    loader = eval_loader(ctx, config, "test", dist_info, method)
    metrics = evaluate(model, method, loader, ctx.num_classes, dist_info.device,
                       use_channels_last(config, dist_info.device), dist_info.is_main, desc=f"test step {ctx.step}")
    return metrics.confusion_matrix
