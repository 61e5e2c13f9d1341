"""One optimisation step of the trainer (:func:`train_iteration`) and what it is made of: the optimizer, the
gradient scaler that skips non-finite updates, and the gradient hook of the methods that read gradients.

Per iteration, for each of its micro-batches (one, or ``--accumulate K``): teacher forward (no grad) and student
forward (through DDP when distributed) under autocast with ``--amp``; the method's loss terms in fp32; backward of
the total divided by K (DDP averages the gradients over the processes on the last micro-batch only). Then, for a
method that ``uses_gradients``, the accumulated gradients are unscaled and the method's ``after_backward`` runs
once (statistics, then an optional penalty whose gradients are added unscaled); optimizer and scheduler step once. An update with non-finite gradients is skipped
on the device by the scaler (every rank alike: the gradients are all-reduced); nothing in an iteration waits
for the device.
"""
import random
import warnings
from contextlib import nullcontext

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from engine.passes import autocast
from utils.distributed import all_true

MOMENTUM = 0.9  # SGD with Nesterov momentum, as every reference (BARM trainer/trainer.py::Trainer.init_optimizer)


def seed_everything(seed):
    """The reference re-seeds torch, numpy and Python at the start of every step (BARM train.py::main)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


#: Loss scale of the fixed-scale guard (fp32 and bf16): 1, so unscaling multiplies by exactly 1.
GUARD_SCALE = 1.0


def grad_scaler(device, amp):
    """The scaler that applies every update. On CUDA, fp16 gets a dynamic loss scale and fp32/bf16 a fixed
    scale of 1, used only for its check of the gradients on the device, so that an update with non-finite
    gradients is skipped without waiting for the device (with a fused optimizer). On the CPU there is no
    device to wait for: the scaler is off and the host checks the loss itself (a pass over the gradients
    would cost more)."""
    if device.type != "cuda":
        return torch.amp.GradScaler(device.type, enabled=False)
    if amp:
        return torch.amp.GradScaler(device.type)
    guard = torch.amp.GradScaler(device.type, init_scale=GUARD_SCALE, growth_interval=np.iinfo(np.int32).max)
    guard.fixed_scale = GUARD_SCALE
    return guard


def close_scaler_iteration(scaler):
    """``scaler.update()``; a fixed-scale guard returns to its scale (a skipped step halved it)."""
    scaler.update(getattr(scaler, "fixed_scale", None))


def build_optimizer(groups, lr, weight_decay):
    """SGD with Nesterov momentum (every reference, e.g. BARM trainer/trainer.py::Trainer.init_optimizer), fused
    where this torch has a fused kernel for the device (one kernel per step, and the scaler's skip decision
    stays on the device), else foreach."""
    try:
        return torch.optim.SGD(groups, lr=lr, momentum=MOMENTUM, nesterov=True, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.SGD(groups, lr=lr, momentum=MOMENTUM, nesterov=True, weight_decay=weight_decay,
                               foreach=True)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def gradients_finite(parameters):
    """Whether every gradient of ``parameters`` is finite (one host synchronisation)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return bool(torch.stack([g.isfinite().all() for g in grads]).all()) if grads else True


def add_gradients(loss, parameters):
    """Add the gradients of ``loss`` to ``p.grad`` with ``torch.autograd.grad``: no DDP hook fires, so a
    penalty that every rank computes identically needs no all-reduce and cannot desynchronise the ranks."""
    parameters = list(parameters)
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    for parameter, grad in zip(parameters, grads):
        if grad is not None:
            parameter.grad = grad if parameter.grad is None else parameter.grad.add_(grad)


def gradient_sync_off(model):
    """A context in which a backward through ``model`` does not average the gradients over the processes (DDP's
    ``no_sync``; ``model`` may be compiled); nothing to do for a plain module."""
    wrapped = getattr(model, "_orig_mod", model)
    return wrapped.no_sync() if isinstance(wrapped, DistributedDataParallel) else nullcontext()


def _micro_batch_loss(model, teacher, method, ctx, batch, amp):
    with autocast(batch.images.device, amp):
        teacher_outputs = None
        if teacher is not None:
            with torch.no_grad():
                teacher_outputs = teacher(batch.images)
        outputs = model(batch.images)
    return method.loss(outputs, teacher_outputs, batch, ctx)


def mean_terms(terms_list):
    """The mean of each loss term over the micro-batches of an iteration (detached)."""
    names = dict.fromkeys(name for terms in terms_list for name in terms)
    return {name: sum(terms[name].detach() for terms in terms_list if name in terms) / len(terms_list)
            for name in names}


def train_iteration(model, student, teacher, method, ctx, batches, optimizer, scheduler, scaler, amp):
    """One optimisation step over ``batches`` (a :class:`methods.base.Batch`, or a list of K micro-batches whose
    gradients are accumulated: each micro-batch's total loss is divided by K, so that where BatchNorm is frozen
    or absent the update equals one step on their concatenation when each micro-batch's loss is a mean over the
    same number of elements); returns ``(terms, nonfinite)``: the terms (their mean over the micro-batches) and
    ``nonfinite``, a bool tensor on the device (whether a loss was not finite; read it only when logging: reading
    it synchronises with the device).

    An update whose gradients are not finite is skipped by the scaler, on every rank alike (DDP has
    all-reduced the gradients); the backward always runs so that DDP's all-reduce stays matched across ranks,
    and the schedule steps in any case, as the reference's. ``model`` is what the forward goes through (the DDP
    wrapper when distributed), ``student`` the bare module (for the method's gradient hook)."""
    batches = list(batches) if isinstance(batches, (list, tuple)) else [batches]
    count = len(batches)
    optimizer.zero_grad(set_to_none=True)
    device = batches[0].images.device
    terms_list, nonfinite = [], None
    for index, batch in enumerate(batches):
        # gradients are averaged over the processes once, on the last micro-batch
        with nullcontext() if index == count - 1 else gradient_sync_off(model):
            terms = _micro_batch_loss(model, teacher, method, ctx, batch, amp)
            bad = ~torch.isfinite(terms["total"].detach())
            nonfinite = bad if nonfinite is None else nonfinite | bad
            scaler.scale(terms["total"] if count == 1 else terms["total"] / count).backward()
        terms_list.append(terms)
    terms = terms_list[0] if count == 1 else mean_terms(terms_list)
    # without a scaler (the CPU) the ranks agree on the loss here; with one, the all-reduced gradients decide
    apply = scaler.is_enabled() or all_true(~nonfinite, device)
    if method.uses_gradients:
        scaler.unscale_(optimizer)  # the hook sees the task loss's true (accumulated) gradients, once
        parameters = trainable(student)
        grads_finite = gradients_finite(parameters)  # the hook decides on the host: one synchronisation
        penalty = method.after_backward(student, ctx, grads_finite)
        if penalty is not None:
            if grads_finite:
                add_gradients(penalty["total"], parameters)
            terms = {**terms, **{k: v for k, v in penalty.items() if k != "total"},
                     "total": terms["total"].detach() + penalty["total"].detach()}
    if apply:
        scaler.step(optimizer)  # with a scaler, skipped on the device when the gradients are not finite
    close_scaler_iteration(scaler)
    with warnings.catch_warnings():  # the reference steps the schedule even when an update is skipped
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        scheduler.step()
    return terms, nonfinite
