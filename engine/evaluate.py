"""Evaluation: predictions of a model over a loader into an all-reduced confusion matrix.

The end-of-step test and ``--test`` both go through :func:`evaluate_state` (a fresh model loaded with the
step's weights), so they give the same numbers. Evaluation runs in fp32 without autocast (spec §7.2).
"""
import contextlib

import numpy as np
import torch

from datasets.transforms import normalize
from engine.data import eval_loader
from engine.models import load_exact, model_spec, to_device, use_channels_last
from metrics import StreamSegMetrics
from network import build_model
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
        for images, labels, _ in progress(loader, show_progress, desc=desc):
            images = normalize(images.to(device, non_blocking=True))
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            logits, _ = model(images)
            metrics.update(labels, method.predict(logits, labels.shape[-2:]))
    metrics.all_reduce()
    return metrics


def build_eval_model(plan, args, method, state, device):
    name, backbone = model_spec(args, type(method))
    model = build_model(name, plan.classes_per_step, backbone=backbone, output_stride=args.output_stride)
    load_exact(model, state, plan.final_path())
    return to_device(model, args, device).eval()


def evaluate_state(plan, args, method, state, dist_info):
    """Test-split confusion matrix (float64 numpy) of the step's weights ``state``."""
    model = build_eval_model(plan, args, method, state, dist_info.device)
    loader = eval_loader(plan, args, "test", dist_info, method.label_policy)
    metrics = evaluate(model, method, loader, plan.num_classes, dist_info.device,
                       use_channels_last(args, dist_info.device), dist_info.is_main, desc=f"test step {plan.step}")
    return metrics.confusion_matrix


def validation_score(model, method, plan, args, dist_info, loader):
    """BARM's model-selection score (spec §4.7): mean IoU of the step's new classes on the validation split
    (at step 0: classes 0..n_0-1, background included)."""
    metrics = evaluate(model, method, loader, plan.num_classes, dist_info.device,
                       use_channels_last(args, dist_info.device), dist_info.is_main, desc="validation")
    iou = metrics.get_results()["Class IoU"]
    first = plan.num_classes - len(plan.steps[plan.step]) if plan.step > 0 else 0
    return float(np.mean([iou[c] for c in range(first, plan.num_classes)]))
