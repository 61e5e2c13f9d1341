"""Training of one incremental step (spec barm-ssul-kproba §4), method-agnostic.

Per iteration: teacher forward (no grad) and student forward (through DDP when distributed) under
autocast with ``--amp``; the method's loss terms in fp32; backward; optimizer and scheduler step. A
non-finite loss (agreed on by every rank) skips the optimizer step and is counted; too many in a row stop
the run. ``last.pth`` is written after every epoch (``--resume`` continues from it, bit for bit on one
process), ``final.pth`` at the end with the test metrics; both atomically, by rank 0.
"""
import hashlib
import json
import logging
import os
import random
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from datasets.transforms import normalize
from engine.data import TrainData, class_names, eval_loader
from engine.evaluate import evaluate_state, validation_score
from engine.models import build_step_models, load_exact, model_spec, to_device, use_channels_last
from engine.results import format_step, step_results, write_step_results, write_summary
from utils.checkpoint import CHECKPOINT_FORMAT, load_checkpoint_file, rng_state, save_atomic, set_rng_state
from utils.distributed import all_gather_objects, all_true, barrier, main_first
from utils.errors import UserError
from utils.logging import ScalarWriter, progress
from utils.schedulers import build_scheduler

log = logging.getLogger("ciss")

MOMENTUM = 0.9  # SGD with Nesterov momentum, as every reference (spec §4.3)
MAX_CONSECUTIVE_NONFINITE = 20
BARM_VALIDATION_ITERATIONS = 100  # spec §4.7: validate after every epoch above this many iterations...
BARM_VALIDATION_PERIOD = 5  # ...else after every 5th epoch


def seed_everything(seed):
    """The reference re-seeds torch, numpy and Python at the start of every step (spec §1)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def grad_scaler(device, amp):
    """The loss scaler of fp16 training on CUDA (disabled otherwise: bf16 and fp32 need none)."""
    enabled = amp and device.type == "cuda"
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


def autocast(device, enabled):
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                          enabled=enabled)


def train_iteration(model, teacher, method, ctx, images, labels, optimizer, scheduler, scaler, amp):
    """One optimisation step; returns ``(terms, finite)``. ``finite`` is the same on every rank, and the
    backward always runs so that DDP's gradient all-reduce stays matched across ranks."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(images.device, amp):
        teacher_outputs = None
        if teacher is not None:
            with torch.no_grad():
                teacher_outputs = teacher(images)
        outputs = model(images)
    terms = method.loss(outputs, teacher_outputs, labels, ctx)
    finite = all_true(torch.isfinite(terms["total"].detach()), images.device)
    scaler.scale(terms["total"]).backward()
    if finite:
        scaler.step(optimizer)
        scaler.update()
    with warnings.catch_warnings():  # the reference steps the schedule even when an update is skipped
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        scheduler.step()
    return terms, finite


def validate_now(args, epoch, iterations_per_epoch):
    if args.val_interval is None:
        return (iterations_per_epoch > BARM_VALIDATION_ITERATIONS
                or epoch % BARM_VALIDATION_PERIOD == BARM_VALIDATION_PERIOD - 1)
    return args.val_interval > 0 and (epoch + 1) % args.val_interval == 0


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

    def __init__(self, plan, args, method, dist_info, first_step):
        self.plan, self.args, self.method, self.dist = plan, args, method, dist_info
        device = dist_info.device
        sync_bn = dist_info.distributed and device.type == "cuda" and method.bn_trains(plan)
        if method.bn_trains(plan) and args.batch_size * (dist_info.world_size if sync_bn else 1) < 2:
            raise UserError(f"step {plan.step} trains BatchNorm statistics, which needs at least 2 images per"
                            f" batch{' across the GPUs' if sync_bn else ''} (got --batch_size {args.batch_size})")
        seed_everything(args.random_seed)
        # rank 0 first: it downloads the ImageNet weights if needed and meets a bad checkpoint first
        student, teacher, _ = main_first(lambda: build_step_models(plan, args, method, first_step), dist_info)
        method.configure(student, self.plan)
        self.data = TrainData(plan, args, dist_info, method.label_policy)
        if dist_info.is_main:  # inputs are valid: make sure the outputs can be written before training
            check_writable(plan.step_dir())
        self.student = to_device(student, args, device)
        self.teacher = to_device(teacher, args, device) if teacher is not None else None
        if sync_bn:
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
        self.optimizer = torch.optim.SGD(method.param_groups(self.student, self.plan, args.lr), lr=args.lr,
                                         momentum=MOMENTUM, nesterov=True, weight_decay=args.weight_decay)
        self.model = self.student
        if dist_info.distributed:
            self.model = DistributedDataParallel(self.student, device_ids=[device] if device.type == "cuda" else None,
                                                 find_unused_parameters=method.find_unused_parameters)
        self.total_iters = args.train_epoch * len(self.data)
        self.scheduler = build_scheduler(args.lr_policy, self.optimizer, self.total_iters, args.step_size)
        self.scaler = grad_scaler(device, args.amp)
        self.channels_last = use_channels_last(args, device)
        self.start_epoch, self.iteration, self.best_score, self.skipped = 0, 0, None, 0
        if args.resume and os.path.exists(plan.last_path()):
            self._restore(plan.last_path())

    # ---- checkpoints ----------------------------------------------------------------------------------
    def _identity(self):
        """What the checkpoint was trained as: method, data, classes and model."""
        plan = self.plan
        return {"method": self.method.name, "dataset": plan.dataset, "task": plan.task, "setting": plan.setting,
                "step": plan.step, "classes": [list(s) for s in plan.steps[:plan.step + 1]],
                "model": model_spec(self.args, type(self.method))[0], "backbone": self.student.backbone.arch,
                "output_stride": self.args.output_stride}

    def _checkpoint(self, epoch, **extra):
        return {
            "format": CHECKPOINT_FORMAT,
            "model_state": self.student.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "scaler_state": self.scaler.state_dict(),
            "epoch": epoch, "iteration": self.iteration, "skipped_iterations": self.skipped,
            "best_score": self.best_score if self.best_score is not None else -1,
            "hyper": self.method.hyper_dict(), "method_state": self.method.state_dict(),
            **self._identity(),
            "args": vars(self.args),
            **extra,
        }

    def _restore(self, path):
        checkpoint = load_checkpoint_file(path)
        ours = self._identity()
        for key in ("method", "classes", "model", "backbone", "output_stride"):
            if checkpoint.get(key) != ours[key]:
                raise UserError(f"{path} belongs to another run ({key} {checkpoint.get(key)}, this run {ours[key]}):"
                                f" remove it or drop --resume")
        load_exact(self.student, checkpoint["model_state"], path)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        self.scheduler.load_state_dict(checkpoint["scheduler_state"])
        if checkpoint["scaler_state"] and self.scaler.is_enabled():  # absent when the run had no CUDA AMP
            self.scaler.load_state_dict(checkpoint["scaler_state"])
        self.start_epoch, self.iteration = checkpoint["epoch"], checkpoint["iteration"]
        self.skipped = checkpoint["skipped_iterations"]
        self.best_score = None if checkpoint["best_score"] == -1 else checkpoint["best_score"]
        states = checkpoint["rng"]
        if len(states) != self.dist.world_size:
            log.warning("%s was written by %d processes, this run has %d: the data order changes",
                        path, len(states), self.dist.world_size)
        set_rng_state(states[self.dist.rank % len(states)])
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
        log.info("%s step %d/%d of %s %s (%s): %d new class(es) %s, %d channels",
                 self.method.name, plan.step, len(plan.steps) - 1, plan.dataset, plan.task, plan.setting,
                 len(new), list(new) if len(new) <= 10 else f"{new[0]}..{new[-1]}", plan.num_classes)
        log.info("%d training images, batch %d per process x %d process(es) = global batch %d, %d iterations"
                 " per epoch, %d epochs, %d iterations", len(self.data.dataset), args.batch_size,
                 self.dist.world_size, args.batch_size * self.dist.world_size, len(self.data), args.train_epoch,
                 self.total_iters)
        log.info("hyper-parameters: %s", json.dumps(self.method.hyper_dict()))
        groups = ", ".join(f"{sum(p.numel() for p in g['params'] if p.requires_grad)}@{g['initial_lr']:g}"
                           for g in self.optimizer.param_groups)
        log.info("trainable parameters per group @ base lr: %s; teacher: %s", groups,
                 "yes" if self.teacher is not None else "no")

    def _write_config(self):
        if self.dist.is_main:
            os.makedirs(self.plan.step_dir(), exist_ok=True)
            config = {"args": vars(self.args), "method": self.method.name, "hyper": self.method.hyper_dict(),
                      "classes": [list(s) for s in self.plan.steps[:self.plan.step + 1]],
                      "world_size": self.dist.world_size, "total_iterations": self.total_iters}
            with open(os.path.join(self.plan.step_dir(), "config.json"), "w", encoding="utf-8") as handle:
                json.dump(config, handle, indent=1)

    def _report(self, writer, batches, sums, count, epoch, index):
        """Running means of the loss terms since the epoch began: tensorboard, and the progress bar on a
        terminal or one log line otherwise (BARM printed every 10 iterations)."""
        means = {name: (v / count).item() for name, v in sums.items()}
        lr = self.optimizer.param_groups[0]["lr"]
        writer.scalars(means, self.iteration, "loss/")
        writer.scalars({"lr": lr}, self.iteration)
        text = " ".join(f"{k} {v:.4f}" for k, v in means.items())
        if hasattr(batches, "set_postfix_str"):
            batches.set_postfix_str(f"{text} lr {lr:.2e}", refresh=False)
        else:
            log.info("step %d epoch %d/%d iteration %d/%d: %s | lr %.2e", self.plan.step, epoch + 1,
                     self.args.train_epoch, index, len(self.data), text, lr)

    def train(self):
        args, plan, device = self.args, self.plan, self.dist.device
        self._write_config()
        self._log_header()
        writer = ScalarWriter(plan.step_dir(), self.dist.is_main)
        self.method.before_step(self.student, self.teacher, self.data, self.plan)
        val_loader = None
        consecutive = 0
        for epoch in range(self.start_epoch, args.train_epoch):
            start = time.time()
            self.method.set_train_mode(self.student, self.plan)
            sums, count = {}, 0
            batches = progress(self.data.epoch(epoch), self.dist.is_main,
                               desc=f"step {plan.step} epoch {epoch + 1}/{args.train_epoch}")
            for index, (images, labels, _) in enumerate(batches, 1):
                images = normalize(images.to(device, non_blocking=True))
                if self.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                labels = labels.to(device, non_blocking=True).long()
                terms, finite = train_iteration(self.model, self.teacher, self.method, self.plan, images, labels,
                                                self.optimizer, self.scheduler, self.scaler, args.amp)
                self.iteration += 1
                if not finite:
                    self.skipped += 1
                    consecutive += 1
                    if consecutive >= MAX_CONSECUTIVE_NONFINITE:
                        raise UserError(
                            f"the loss was not finite in {consecutive} consecutive iterations (step {plan.step},"
                            f" epoch {epoch + 1}): lower --lr, try without --amp, or check the data")
                    continue
                consecutive = 0
                count += 1
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float()
                if self.iteration % args.print_interval == 0:
                    self._report(writer, batches, sums, count, epoch, index)
            means = {name: (v / max(count, 1)).item() for name, v in sums.items()}
            seconds = time.time() - start
            log.info("step %d epoch %d/%d: %s | lr %.2e | %d skipped | %.0f s, %.1f images/s", plan.step,
                     epoch + 1, args.train_epoch, " ".join(f"{k} {v:.4f}" for k, v in means.items()),
                     self.optimizer.param_groups[0]["lr"], self.skipped, seconds,
                     len(self.data) * args.batch_size * self.dist.world_size / max(seconds, 1e-9))
            self._sync_buffers()
            if validate_now(args, epoch, len(self.data)):
                if val_loader is None:
                    val_loader = eval_loader(plan, args, "val", self.dist, self.method.label_policy)
                score = validation_score(self.student, self.method, plan, args, self.dist, val_loader)
                writer.scalars({"val/mIoU_new": score}, self.iteration)
                improved = self.best_score is None or score > self.best_score
                log.info("step %d epoch %d: validation mIoU of the step's classes %.4f%s", plan.step, epoch + 1,
                         score, " (best)" if improved else "")
                if improved:
                    self.best_score = score
                    if args.select_best and plan.step == 0 and self.dist.is_main:
                        save_atomic(self._checkpoint(epoch + 1), plan.best_path())
                self.method.set_train_mode(self.student, self.plan)
            self._save_last(epoch + 1)
        return writer

    def _sync_buffers(self):
        """Without SyncBatchNorm (gloo on the CPU) every rank updates its own BN statistics: adopt rank 0's
        at the end of each epoch, so that all ranks validate, test and save the same model."""
        if self.dist.distributed:
            for buffer in self.student.buffers():
                dist.broadcast(buffer, src=0)

    def finish(self, writer):
        """Test the final weights, write ``final.pth`` and the results files; returns the results."""
        plan = self.plan
        state = self.student.state_dict()
        confusion = evaluate_state(plan, self.args, self.method, state, self.dist)
        results = step_results(confusion, plan, self.method.name, class_names(plan), plan.final_path())
        self._check_replicas()
        if self.dist.is_main:
            save_atomic(self._checkpoint(self.args.train_epoch, metrics=results), plan.final_path())
            write_step_results(results, plan.step_dir())
            write_summary(plan.root)
            if os.path.exists(plan.last_path()):
                os.remove(plan.last_path())
            log.info(format_step(results))
        writer.scalars({k: v for k, v in results["summary"].items() if isinstance(v, float)}, self.iteration, "test/")
        writer.close()
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


def run_step(plan, args, method, dist_info, first_step):
    run = StepRun(plan, args, method, dist_info, first_step)
    writer = run.train()
    return run.finish(writer)
