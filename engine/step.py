"""Training of one incremental step (BARM trainer/trainer.py::Trainer.train), method-agnostic.

Set-up: the method builds the student (and the teacher at t > 0), freezes what it freezes, and gives the
parameter groups; then either the method's before-step passes run (its results go into the method's state)
or, with ``--resume``, the state of ``last.pth`` is restored; then the memory (if any) joins the data and the
schedule is built for the resulting number of iterations.

Per iteration: teacher forward (no grad) and student forward (through DDP when distributed) under autocast
with ``--amp``; the method's loss terms in fp32; backward; for a method that ``uses_gradients``, the
gradients are unscaled and the method's ``after_backward`` runs (statistics, then an optional penalty whose
gradients are added unscaled); optimizer and scheduler step. An update with non-finite gradients is skipped
on the device by the scaler (every rank alike: the gradients are all-reduced) and counted; too many in a row
stop the run (checked at logging points: nothing in an iteration waits for the device). The method decides when to
validate and whether the step's result is its best-validated or its last weights. ``last.pth`` is written
after every epoch (``--resume`` continues from it, bit for bit on one process), ``final.pth`` at the end with
the test metrics; both atomically, by rank 0.
"""
import hashlib
import json
import logging
import os
import random
import time
import uuid
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from engine.data import TrainData, class_names, eval_loader, to_batch
from engine.evaluate import evaluate, evaluate_state
from engine.models import (adopt_recorded_model, build_step_models, load_exact, model_spec, read_previous,
                           to_device, use_channels_last)
from engine.passes import StepData, autocast
from engine.plan import make_plan
from engine.progress import TaskProgress, duration, planned_iterations
from engine.results import format_step, step_results, write_json, write_step_results
from utils.checkpoint import CHECKPOINT_FORMAT, load_checkpoint_file, rng_state, save_atomic, set_rng_state
from utils.distributed import all_gather_objects, all_true, barrier, main_first
from utils.errors import UserError
from utils.logging import ScalarWriter, plural, progress
from utils.schedulers import build_scheduler

log = logging.getLogger("ciss")

MOMENTUM = 0.9  # SGD with Nesterov momentum, as every reference (BARM trainer/trainer.py::Trainer.init_optimizer)
MAX_CONSECUTIVE_NONFINITE = 20


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


def train_iteration(model, student, teacher, method, ctx, batch, optimizer, scheduler, scaler, amp):
    """One optimisation step; returns ``(terms, nonfinite)`` with ``nonfinite`` a bool tensor on the device
    (whether the loss was not finite; read it only when logging: reading it synchronises with the device).

    An update whose gradients are not finite is skipped by the scaler, on every rank alike (DDP has
    all-reduced the gradients); the backward always runs so that DDP's all-reduce stays matched across ranks,
    and the schedule steps in any case, as the reference's. ``model`` is what the forward goes through (the DDP
    wrapper when distributed), ``student`` the bare module (for the method's gradient hook)."""
    optimizer.zero_grad(set_to_none=True)
    device = batch.images.device
    with autocast(device, amp):
        teacher_outputs = None
        if teacher is not None:
            with torch.no_grad():
                teacher_outputs = teacher(batch.images)
        outputs = model(batch.images)
    terms = method.loss(outputs, teacher_outputs, batch, ctx)
    nonfinite = ~torch.isfinite(terms["total"].detach())
    # without a scaler (the CPU) the ranks agree on the loss here; with one, the all-reduced gradients decide
    apply = scaler.is_enabled() or all_true(~nonfinite, device)
    scaler.scale(terms["total"]).backward()
    if method.uses_gradients:
        scaler.unscale_(optimizer)  # the hook sees the task loss's true gradients
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


class LossMeter:
    """Running sums of the loss terms over an epoch's iterations with a finite loss, and the count of the
    others, kept on the device: reading them (:meth:`read`) is the only synchronisation, at logging points."""

    def __init__(self, device):
        zero = torch.zeros((), device=device)
        self.sums, self.count, self.skipped = {}, zero.clone(), zero.clone()
        self.streak, self.longest = zero.clone(), zero.clone()

    def add(self, terms, nonfinite):
        for name, value in terms.items():
            value = torch.where(nonfinite, 0.0, value.detach().float())
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += ~nonfinite
        self.skipped += nonfinite
        self.streak = (self.streak + 1) * nonfinite
        self.longest = torch.maximum(self.longest, self.streak)

    def read(self):
        """``(means of the terms, iterations skipped, longest run of consecutive skips)`` as Python numbers;
        the longest run is the maximum over the processes (every rank stops together)."""
        longest = self.longest.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        count = max(float(self.count), 1.0)
        return ({name: float(v) / count for name, v in self.sums.items()}, int(self.skipped), int(longest))


#: Flags a resumed step must share with the run it continues (they shape the schedule, the data or the loss).
RESUME_FLAGS = ("train_epoch", "batch_size", "lr", "lr_policy", "step_size", "weight_decay", "crop_size",
                "random_seed", "amp", "loss_type")


def check_same_run(checkpoint, args, method, world_size, path):
    """Refuse to ``--resume`` from ``path`` with settings that would make a hybrid of two runs."""
    saved = checkpoint.get("args", {})
    for name in RESUME_FLAGS:
        if name in saved and hasattr(args, name) and saved[name] != getattr(args, name):
            raise UserError(f"--resume: {path} was trained with --{name} {saved[name]}, this run has --{name}"
                            f" {getattr(args, name)}: resume with the same flags, or remove it to start the step"
                            f" anew")
    for name, value in checkpoint.get("hyper", {}).items():
        ours = method.hyper_dict().get(name)
        if ours != value:
            raise UserError(f"--resume: {path} was trained with --{name} {value}, this run has --{name} {ours}:"
                            f" resume with the same flags, or remove it to start the step anew")
    saved_world = len(checkpoint.get("rng", [])) or world_size
    if saved_world != world_size:
        raise UserError(f"--resume: {path} was trained by {saved_world} processes, this run has {world_size}: the"
                        f" batches would differ; resume with {saved_world}, or remove it to start the step anew")


def check_writable(folder):
    """Create ``folder`` or raise a UserError now, rather than fail when the first checkpoint is due."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the run folder {folder} ({err.strerror}): check --ckpt_dir") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"the run folder {folder} is not writable: check --ckpt_dir")


def parameter_digest(model):
    digest = hashlib.sha1()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class StepRun:
    """Everything of one step's training: models, data, optimisation state, logging."""

    def __init__(self, plan, args, method, dist_info, first_step, run_folder, last_step=None):
        self.plan, self.args, self.method, self.dist = plan, args, method, dist_info
        device = dist_info.device
        sync_bn = dist_info.distributed and device.type == "cuda" and method.bn_trains(plan)
        if method.bn_trains(plan) and args.batch_size * (dist_info.world_size if sync_bn else 1) < 2:
            raise UserError(f"step {plan.step} trains BatchNorm statistics, which needs at least 2 images per"
                            f" batch{' across the GPUs' if sync_bn else ''} (got --batch_size {args.batch_size})")
        self.select_best = method.selects_best(plan, args.select_best)
        # inputs first (the previous checkpoint, then the data), so that a bad input stops the run before it
        # downloads weights or writes anything; rank 0 first (it builds the class index, meets errors first)
        previous = main_first(lambda: read_previous(plan, args, first_step), dist_info) if plan.step > 0 else None
        if previous is not None:
            adopt_recorded_model(args, previous[1], previous[0])
        self.spec = model_spec(args, type(method))
        self.data = TrainData(plan, args, dist_info, method)
        later = range(plan.step + 1, (plan.step if last_step is None else last_step) + 1)
        self.progress = TaskProgress(sum(planned_iterations(args, make_plan(args, t), dist_info.world_size)
                                         for t in later) if dist_info.is_main else 0)
        resume = self._read_last() if args.resume and os.path.exists(plan.last_path()) else None
        run_folder.open()  # inputs are valid: lock the run folder, start its log file
        if dist_info.is_main:
            check_writable(plan.step_dir())
        run_folder.clean_step(plan.step_dir())
        seed_everything(args.random_seed)
        student, teacher = main_first(lambda: build_step_models(plan, args, method, self.spec, previous), dist_info)
        method.configure(student, plan)
        self.student = to_device(student, args, device)
        self.teacher = to_device(teacher, args, device) if teacher is not None else None
        if sync_bn:
            self.student = method.sync_batchnorm(self.student)
        self.optimizer = build_optimizer(method.param_groups(self.student, plan, args.lr), args.lr, args.weight_decay)
        self.model = self.student
        if dist_info.distributed:
            self.model = DistributedDataParallel(self.student, device_ids=[device] if device.type == "cuda" else None,
                                                 find_unused_parameters=method.find_unused_parameters)
        if args.compile:  # the training forward only; evaluation runs the plain module
            self.model = torch.compile(self.model)
        self.scaler = grad_scaler(device, args.amp)
        self.channels_last = use_channels_last(args, device)
        self.start_epoch, self.iteration, self.best_score, self.skipped = 0, 0, None, 0
        self.writer = None
        # results of a step name the run that produced them and the run of the checkpoint it started from, so
        # that the summary across steps follows one chain (never stale results of an older run)
        self.run_id = resume["run_id"] if resume is not None else uuid.uuid4().hex
        self.parent_id = previous[1].get("run_id") if previous is not None else None
        if resume is not None:
            load_exact(self.student, resume["model_state"], plan.last_path())
            method.load_state_dict(resume["method_state"])
        else:
            self.method.set_train_mode(self.student, plan)
            method.before_step(self.student, self.teacher,
                               StepData(plan, args, dist_info, method, self.data, self.channels_last), plan)
        self.data.set_memory(method.memory_ids())
        self.total_iters = args.train_epoch * len(self.data)
        self.scheduler = build_scheduler(args.lr_policy, self.optimizer, self.total_iters, args.step_size,
                                         **method.schedule_options(plan))
        if self.select_best and not any(
                method.validation_due(i, len(self.data), self.total_iters, args.val_interval)
                for i in range(1, self.total_iters + 1)):
            raise UserError(f"step {plan.step} selects its best-validated weights but never validates: set"
                            f" --val_interval to 1 or more, or use --select_last")
        if resume is not None:
            self._restore(resume, plan.last_path())

    def _read_last(self):
        """``last.pth`` of an interrupted run of this step, checked to belong to this very run."""
        path = self.plan.last_path()
        checkpoint = load_checkpoint_file(path)
        self._check_identity(checkpoint, path)
        check_same_run(checkpoint, self.args, self.method, self.dist.world_size, path)
        return checkpoint

    # ---- checkpoints ----------------------------------------------------------------------------------
    def _identity(self):
        """What the checkpoint was trained as: method, data, classes and model."""
        plan = self.plan
        return {"method": self.method.name, "dataset": plan.dataset, "task": plan.task, "setting": plan.setting,
                "step": plan.step, "classes": [list(s) for s in plan.steps[:plan.step + 1]],
                "model": self.spec.name, "backbone": self.spec.backbone, "output_stride": self.spec.output_stride}

    def _checkpoint(self, epoch, final=False, **extra):
        """A checkpoint dict; ``final`` leaves out what only resuming the step needs (optimizer, scheduler and
        scaler states): the next step builds its own."""
        training = {} if final else {"optimizer_state": self.optimizer.state_dict(),
                                     "scheduler_state": self.scheduler.state_dict(),
                                     "scaler_state": self.scaler.state_dict()}
        return {
            "format": CHECKPOINT_FORMAT,
            "model_state": self.student.state_dict(),
            **training,
            "epoch": epoch, "iteration": self.iteration, "skipped_iterations": self.skipped,
            "best_score": self.best_score if self.best_score is not None else -1,
            "hyper": self.method.hyper_dict(), "method_state": self.method.state_dict(),
            "run_id": self.run_id, "parent_id": self.parent_id,
            **self._identity(),
            "args": vars(self.args),
            **extra,
        }

    def _check_identity(self, checkpoint, path):
        ours = self._identity()
        for key in ("method", "classes", "model", "backbone", "output_stride"):
            if checkpoint.get(key) != ours[key]:
                raise UserError(f"{path} belongs to another run ({key} {checkpoint.get(key)}, this run {ours[key]}):"
                                f" remove it or drop --resume")

    def _restore(self, checkpoint, path):
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        self.scheduler.load_state_dict(checkpoint["scheduler_state"])
        if checkpoint["scaler_state"]:
            self.scaler.load_state_dict(checkpoint["scaler_state"])
        self.start_epoch, self.iteration = checkpoint["epoch"], checkpoint["iteration"]
        self.skipped = checkpoint["skipped_iterations"]
        self.best_score = None if checkpoint["best_score"] == -1 else checkpoint["best_score"]
        set_rng_state(checkpoint["rng"][self.dist.rank])
        log.info("resuming step %d from %s after epoch %d", self.plan.step, path, self.start_epoch)

    def _save_last(self, epoch):
        states = all_gather_objects(rng_state())
        if self.dist.is_main:
            save_atomic(self._checkpoint(epoch, rng=states), self.plan.last_path())

    # ---- training -------------------------------------------------------------------------------------
    def _log_header(self):
        plan, args = self.plan, self.args
        new = plan.steps[plan.step]
        log.info("=" * 100)
        log.info("%s step %d/%d of %s %s (%s): %s %s, %s", self.method.name, plan.step, len(plan.steps) - 1,
                 plan.dataset, plan.task, plan.setting, plural(len(new), "new class", "new classes"),
                 list(new) if len(new) <= 10 else f"{new[0]}..{new[-1]}", plural(plan.num_classes, "channel"))
        memory = self.data.memory
        log.info("%s%s, batch %d per process x %s = global batch %d, %s per epoch, %s, %s",
                 plural(len(self.data.current), "training image"),
                 f" + {plural(len(memory), 'memory image')} ({self.method.memory_mode})" if memory is not None else "",
                 args.batch_size, plural(self.dist.world_size, "process", "processes"),
                 args.batch_size * self.dist.world_size, plural(len(self.data), "iteration"),
                 plural(args.train_epoch, "epoch"), plural(self.total_iters, "iteration"))
        log.info("hyper-parameters: %s", json.dumps(self.method.hyper_dict()))
        groups = ", ".join(f"{sum(p.numel() for p in g['params'] if p.requires_grad)}@{g['initial_lr']:g}"
                           for g in self.optimizer.param_groups)
        log.info("trainable parameters per group @ base lr: %s; teacher: %s", groups,
                 "yes" if self.teacher is not None else "no")

    def _config(self):
        return {"args": vars(self.args), "method": self.method.name, "hyper": self.method.hyper_dict(),
                "classes": [list(s) for s in self.plan.steps[:self.plan.step + 1]],
                "model": self.spec.name, "backbone": self.spec.backbone, "output_stride": self.spec.output_stride,
                "world_size": self.dist.world_size, "total_iterations": self.total_iters,
                "param_groups": [{"lr": g["initial_lr"], "weight_decay": g["weight_decay"],
                                  "parameters": sum(p.numel() for p in g["params"])}
                                 for g in self.optimizer.param_groups],
                "run_id": self.run_id, "parent_id": self.parent_id}

    def _check_nonfinite(self, longest, epoch):
        if longest >= MAX_CONSECUTIVE_NONFINITE:
            raise UserError(f"the loss was not finite in {longest} consecutive iterations (step {self.plan.step},"
                            f" epoch {epoch + 1}): lower --lr, try without --amp, or check the data")

    def _images_per_second(self, index, start):
        return index * self.args.batch_size * self.dist.world_size / max(time.time() - start, 1e-9)

    def _report(self, writer, batches, meter, epoch, index, start):
        """Running means of the loss terms since the epoch began, the learning rate and the speed: tensorboard,
        and the progress bar on a terminal; without one, a log line only when ``--print_interval`` was given
        (one summary line per epoch otherwise)."""
        means, _, longest = meter.read()
        self._check_nonfinite(longest, epoch)
        lr = self.optimizer.param_groups[0]["lr"]
        speed = self._images_per_second(index, start)
        writer.scalars(means, self.iteration, "loss/")
        writer.scalars({"lr": lr, "speed/images_per_s": speed}, self.iteration)
        text = " ".join(f"{k} {v:.4f}" for k, v in means.items())
        if hasattr(batches, "set_postfix_str"):
            batches.set_postfix_str(f"{text} | lr {lr:.2e} | {speed:.1f} img/s", refresh=False)
        elif "print_interval" in getattr(self.args, "explicit", ()):
            log.info("step %d epoch %d/%d iteration %d/%d: %s | lr %.2e | %.1f images/s", self.plan.step, epoch + 1,
                     self.args.train_epoch, index, len(self.data), text, lr, speed)

    def _validate(self, writer, val_loader, epoch):
        """Score the validation split; keep the best weights when the step selects them."""
        plan = self.plan
        metrics = evaluate(self.student, self.method, val_loader, plan.num_classes, self.dist.device,
                           self.channels_last, self.dist.is_main, desc="validation")
        score = self.method.validation_score(metrics.get_results()["Class IoU"], plan)
        writer.scalars({"val/mIoU_new": score}, self.iteration)
        improved = self.best_score is None or score > self.best_score
        log.info("step %d epoch %d iteration %d: validation score (mIoU of the step's classes) %.2f%%%s", plan.step,
                 epoch + 1, self.iteration, 100 * score, " (best)" if improved else "")
        if improved:
            self.best_score = score
            if self.select_best and self.dist.is_main:
                save_atomic(self._checkpoint(self.iteration // len(self.data), best_iteration=self.iteration),
                            plan.best_path())
        self.method.set_train_mode(self.student, plan)

    def train(self):
        """Train the remaining epochs; returns the scalar writer (closed by :func:`run_step`, also when the
        training is interrupted, so that its events are flushed)."""
        args, plan, device = self.args, self.plan, self.dist.device
        self._log_header()
        writer = self.writer = ScalarWriter(plan.step_dir(), self.dist.is_main, purge_step=self.iteration or None)
        val_loader = None
        self.progress.start_step(self.iteration)
        for epoch in range(self.start_epoch, args.train_epoch):
            start = time.time()
            self.method.set_train_mode(self.student, plan)
            meter = LossMeter(device)
            memory = self.data.memory_batches(epoch)
            batches = progress(self.data.epoch(epoch), self.dist.is_main,
                               desc=f"step {plan.step} epoch {epoch + 1}/{args.train_epoch}")
            for index, raw in enumerate(batches, 1):
                batch = to_batch(raw, device, self.channels_last)
                if memory is not None:
                    batch = self.data.replace_with_memory(batch, to_batch(next(memory), device, self.channels_last))
                terms, nonfinite = train_iteration(self.model, self.student, self.teacher, self.method, plan, batch,
                                                   self.optimizer, self.scheduler, self.scaler, args.amp)
                meter.add(terms, nonfinite)
                self.iteration += 1
                if self.iteration % args.print_interval == 0:
                    self._report(writer, batches, meter, epoch, index, start)
                if self.method.validation_due(self.iteration, len(self.data), self.total_iters, args.val_interval):
                    if index == len(self.data):
                        self._sync_buffers()
                    if val_loader is None:
                        val_loader = eval_loader(plan, args, "val", self.dist, self.method)
                    self._validate(writer, val_loader, epoch)
            means, skipped, longest = meter.read()
            self.skipped += skipped
            self._check_nonfinite(longest, epoch)
            log.info("step %d epoch %d/%d: %s | lr %.2e | %d skipped | %s, %.1f images/s%s", plan.step, epoch + 1,
                     args.train_epoch, " ".join(f"{k} {v:.4f}" for k, v in means.items()),
                     self.optimizer.param_groups[0]["lr"], self.skipped, duration(time.time() - start),
                     self._images_per_second(len(self.data), start), self.progress.text(self.iteration, self.total_iters))
            self._sync_buffers()
            self._save_last(epoch + 1)
        return writer

    def _sync_buffers(self):
        """Without SyncBatchNorm (gloo on the CPU) every rank updates its own BN statistics: adopt rank 0's
        at the end of each epoch (and before a validation), so that all ranks validate, test and save the
        same model."""
        if self.dist.distributed:
            for buffer in self.student.buffers():
                dist.broadcast(buffer, src=0)

    def _selected_weights(self):
        """The step's result: its best-validated weights when the method selects them, else the last."""
        if not self.select_best:
            return self.student.state_dict(), {}
        best = load_checkpoint_file(self.plan.best_path())
        log.info("step %d: the result is the best-validated weights (iteration %d, score %.2f%%)", self.plan.step,
                 best["best_iteration"], 100 * best["best_score"])
        return best["model_state"], {"selected": {"iteration": best["best_iteration"], "score": best["best_score"]}}

    def finish(self, writer):
        """Test the step's result, write ``final.pth`` and the results files; returns the results."""
        plan = self.plan
        self.method.end_of_step(self.student, plan)
        barrier()  # best.pth is written by rank 0
        state, selected = self._selected_weights()
        if selected:
            load_exact(self.student, state, self.plan.best_path())
        confusion = evaluate_state(plan, self.args, self.method, self.spec, state, self.dist)
        results = step_results(confusion, plan, self.method.name, class_names(plan), plan.final_path(),
                               self.method.eval_convention())
        results.update(run_id=self.run_id, parent_id=self.parent_id)
        self._check_replicas()
        if self.dist.is_main:
            save_atomic(self._checkpoint(self.args.train_epoch, final=True, metrics=results, **selected),
                        plan.final_path())
            write_step_results(results, plan.step_dir())
            write_json(self._config(), os.path.join(plan.step_dir(), "config.json"))
            for name, content in self.method.step_files().items():
                write_json(content, os.path.join(plan.step_dir(), name))
            for leftover in (plan.last_path(), plan.best_path()):
                if os.path.exists(leftover):
                    os.remove(leftover)
            if self.args.keep_checkpoints == "last":
                prune_earlier_checkpoints(plan, self.parent_id)
            log.info(format_step(results))
        writer.scalars({k: v for k, v in results["summary"].items() if isinstance(v, float)}, self.iteration, "test/")
        barrier()
        return results

    def _check_replicas(self):
        """Distributed runs: confirm that every rank ends the step with bit-identical weights."""
        if not self.dist.distributed:
            return
        digests = all_gather_objects(parameter_digest(self.student))
        if len(set(digests)) == 1:
            log.info("weights identical on all %d ranks", len(digests))
        else:
            log.warning("weights differ between ranks at the end of step %d: %s", self.plan.step, digests)


def prune_earlier_checkpoints(plan, parent_id):
    """``--keep_checkpoints last``: remove the ``final.pth`` of the earlier steps of this run's chain (their
    results files stay); the newest step's checkpoint is all the next step needs."""
    for step in range(plan.step - 1, -1, -1):
        path = plan.final_path(step)
        results = os.path.join(plan.step_dir(step), "results.json")
        if parent_id is None or not os.path.exists(results):
            return
        with open(results, encoding="utf-8") as handle:
            recorded = json.load(handle)
        if recorded.get("run_id") != parent_id:
            return
        if os.path.exists(path):
            os.remove(path)
            write_json({**recorded, "checkpoint_removed": True}, results)
            log.info("--keep_checkpoints last: removed %s", path)
        parent_id = recorded.get("parent_id")


def run_step(plan, args, method, dist_info, first_step, run_folder, last_step=None):
    """Train and test one step (``last_step``: the run's last step, for the time-left estimates)."""
    run = StepRun(plan, args, method, dist_info, first_step, run_folder, last_step)
    try:
        return run.finish(run.train())
    finally:
        if run.writer is not None:
            run.writer.close()
