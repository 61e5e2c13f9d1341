"""The training of one incremental step (BARM trainer/trainer.py::Trainer.train), method-agnostic.

A :class:`StepRun` is made by :func:`engine.setup.set_up_step` (models, data, optimisation state, the method's
state) and then trains its epochs (:meth:`StepRun.train`: one :func:`engine.iteration.train_iteration` per
batch; the method decides when to validate and whether the step's result is its best-validated or its last
weights) and finishes (:meth:`StepRun.finish`: the test of the step's result, ``final.pth`` and the results
files). ``last.pth`` is written after every epoch (``--resume`` continues from it, bit for bit on one process),
``final.pth`` at the end with the test metrics; both atomically, by rank 0.
"""
import json
import logging
import os

import numpy as np
import torch.distributed as dist

from engine.checkpoints import identity, parameter_digest, prune_earlier_checkpoints
from engine.data import class_names, eval_loader, to_batch
from engine.evaluate import evaluate, evaluate_state
from engine.iteration import train_iteration
from engine.meter import TrainingLog
from engine.models import load_exact
from engine.results import format_step, provenance, step_results, write_step_results
from utils.checkpoint import CHECKPOINT_FORMAT, load_checkpoint_file, rng_state, save_checkpoint, set_rng_state
from utils.distributed import all_gather_objects, barrier
from utils.jsonfile import write_json
from utils.logging import plural

log = logging.getLogger("ciss")


def batch_text(config, world_size):
    """``batch 8 per process x 2 processes`` (``(2 micro-batches of 4 accumulated)`` with ``--accumulate``)."""
    text = f"batch {config.batch_size} per process x {plural(world_size, 'process', 'processes')}"
    if config.accumulate > 1:
        text += f" ({config.accumulate} micro-batches of {config.micro_batch} accumulated)"
    return text


def batch_record(config, world_size):
    """What ``config.json`` and the results record of the batch (BatchNorm statistics: per micro-batch of one
    process, per chunk with ``--bn_chunks``, or per batch over the GPUs with SyncBatchNorm)."""
    return {"global": config.global_batch, "per_process": config.batch_size,
            "micro_batch": config.micro_batch, "accumulate": config.accumulate, "processes": world_size,
            "batchnorm_statistics": "per micro-batch" if config.accumulate > 1 else "per batch"}


def selection_score(class_iou, ctx):
    """The score a step selects its best-validated weights by (BARM trainer/trainer.py::Trainer.validate, SSUL
    main.py::main): the mean validation IoU of the step's new classes (at step 0: classes 0..n_0-1, background
    included; at a step that adds no class, a domain step, every class)."""
    first = ctx.num_old if ctx.step > 0 and ctx.adds_classes else 0
    return float(np.mean([class_iou[c] for c in range(first, ctx.num_classes)]))


class StepRun:
    """One step's training: the models, data and optimisation state :func:`engine.setup.set_up_step` made, and
    the progress of the step (epoch, iteration, best validation score, skipped updates)."""

    def __init__(self, ctx, config, method, dist_info, *, spec, data, student, teacher, model, optimizer,
                 scheduler, scaler, channels_last, select_best, total_iterations, progress, run_id, parent_id,
                 started_from=None):
        self.ctx, self.config, self.method, self.dist = ctx, config, method, dist_info
        self.spec, self.data, self.student, self.teacher, self.model = spec, data, student, teacher, model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.channels_last, self.select_best = channels_last, select_best
        self.total_iterations, self.progress = total_iterations, progress
        self.run_id, self.parent_id = run_id, parent_id
        self.started_from = started_from  # the checkpoint of step t-1 this step started from (t > 0)
        self.start_epoch, self.iteration, self.best_score, self.skipped = 0, 0, None, 0
        self.log = None

    # ---- checkpoints ----------------------------------------------------------------------------------
    def checkpoint(self, epoch, final=False, **extra):
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
            "run_id": self.run_id, "parent_id": self.parent_id, "started_from": self.started_from,
            **identity(self.ctx, self.method, self.spec),
            "args": self.config.to_dict(), "sources": self.config.sources(),
            **extra,
        }

    def restore(self, checkpoint, path):
        """Continue from ``last.pth``: optimisation state, progress and every rank's generators."""
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        self.scheduler.load_state_dict(checkpoint["scheduler_state"])
        if checkpoint["scaler_state"]:
            self.scaler.load_state_dict(checkpoint["scaler_state"])
        self.start_epoch, self.iteration = checkpoint["epoch"], checkpoint["iteration"]
        self.skipped = checkpoint["skipped_iterations"]
        self.best_score = None if checkpoint["best_score"] == -1 else checkpoint["best_score"]
        set_rng_state(checkpoint["rng"][self.dist.rank])
        log.info("resuming step %d from %s after epoch %d", self.ctx.step, path, self.start_epoch)

    def _save_last(self, epoch):
        states = all_gather_objects(rng_state())
        if self.dist.is_main:
            save_checkpoint(self.checkpoint(epoch, rng=states), self.ctx.last_path())

    # ---- training -------------------------------------------------------------------------------------
    def _log_header(self):
        ctx, config, memory = self.ctx, self.config, self.data.memory
        new = ctx.steps[ctx.step]
        log.info("=" * 100)
        log.info("%s step %d/%d of %s %s (%s): %s %s, %s%s", self.method.name, ctx.step, len(ctx.steps) - 1,
                 ctx.dataset, ctx.task, ctx.setting, plural(len(new), "new class", "new classes"),
                 list(new) if len(new) <= 10 else f"{new[0]}..{new[-1]}", plural(ctx.num_classes, "channel"),
                 f", domains {list(ctx.domains[ctx.step])}" if ctx.domains is not None else "")
        log.info("%s%s, %s = global batch %d, %s per epoch, %s, %s",
                 plural(len(self.data.current), "training image"),
                 f" + {plural(len(memory), 'memory image')} ({self.data.memory_use.mode})" if memory is not None
                 else "", batch_text(config, self.dist.world_size), config.global_batch,
                 plural(len(self.data), "iteration"), plural(config.train_epoch, "epoch"),
                 plural(self.total_iterations, "iteration"))
        if config.accumulate > 1:
            log.info("gradients accumulated over %d micro-batches of %d per process before each optimizer step:"
                     " BatchNorm statistics (where they train) are per micro-batch", config.accumulate,
                     config.micro_batch)
        log.info("hyper-parameters: %s", json.dumps(self.method.hyper_dict()))
        groups = ", ".join(f"{sum(p.numel() for p in g['params'] if p.requires_grad)}@{g['initial_lr']:g}"
                           for g in self.optimizer.param_groups)
        log.info("trainable parameters per group @ base lr: %s; teacher: %s", groups,
                 "yes" if self.teacher is not None else "no")

    def _validate(self, val_loader, epoch):
        """Score the validation split; keep the best weights when the step selects them."""
        ctx = self.ctx
        metrics = evaluate(self.student, self.method, val_loader, ctx.num_classes, self.dist.device,
                           self.channels_last, self.dist.is_main, desc="validation")
        score = selection_score(metrics.get_results()["Class IoU"], ctx)
        self.log.scalars({"val/mIoU_new": score}, self.iteration)
        improved = self.best_score is None or score > self.best_score
        log.info("step %d epoch %d iteration %d: validation score (mIoU of the step's classes) %.2f%%%s", ctx.step,
                 epoch + 1, self.iteration, 100 * score, " (best)" if improved else "")
        if improved:
            self.best_score = score
            if self.select_best and self.dist.is_main:
                save_checkpoint(self.checkpoint(self.iteration // len(self.data), best_iteration=self.iteration),
                            ctx.best_path())
        self.method.set_train_mode(self.student, ctx)

    def train(self):
        """Train the remaining epochs (the log is closed by :meth:`close`, also when the training is
        interrupted, so that its events are flushed)."""
        config, ctx, device, method, data = self.config, self.ctx, self.dist.device, self.method, self.data
        self._log_header()
        self.log = TrainingLog(ctx, config, self.dist, len(data), self.total_iterations, self.progress,
                               self.iteration, run_id=self.run_id, run_config=self._config_file())
        val_loader = None
        for epoch in range(self.start_epoch, config.train_epoch):
            method.set_train_mode(self.student, ctx)
            memory = data.memory_batches(epoch)
            for index, group in enumerate(self.log.epoch(data.epoch(epoch), epoch), 1):
                batches = []
                for raw in group:  # the micro-batches of one optimizer step (one without --accumulate)
                    batch = to_batch(raw, device, self.channels_last)
                    if memory is not None:
                        batch = data.replace_with_memory(batch, to_batch(next(memory), device, self.channels_last))
                    batches.append(batch)
                terms, nonfinite = train_iteration(self.model, self.student, self.teacher, method, ctx, batches,
                                                   self.optimizer, self.scheduler, self.scaler, config.amp)
                self.iteration += 1
                self.log.iteration(terms, nonfinite, self.iteration, index, self.optimizer.param_groups[0]["lr"])
                if method.validation_due(self.iteration, len(data), self.total_iterations, config.val_interval):
                    if index == len(data):
                        self._sync_buffers()
                    if val_loader is None:
                        val_loader = eval_loader(ctx, config, "val", self.dist, method)
                    self._validate(val_loader, epoch)
            self.skipped += self.log.end_epoch(self.iteration, self.optimizer.param_groups[0]["lr"], self.skipped)
            self._sync_buffers()
            self._save_last(epoch + 1)

    def close(self):
        if self.log is not None:
            self.log.close()

    def _sync_buffers(self):
        """Without SyncBatchNorm (gloo on the CPU) every rank updates its own BN statistics: adopt rank 0's
        at the end of each epoch (and before a validation), so that all ranks validate, test and save the
        same model."""
        if self.dist.distributed:
            for buffer in self.student.buffers():
                dist.broadcast(buffer, src=0)

    # ---- the end of the step --------------------------------------------------------------------------
    def _selected_weights(self):
        """The step's result: its best-validated weights when the method selects them, else the last."""
        if not self.select_best:
            return self.student.state_dict(), {}
        best = load_checkpoint_file(self.ctx.best_path())
        log.info("step %d: the result is the best-validated weights (iteration %d, score %.2f%%)", self.ctx.step,
                 best["best_iteration"], 100 * best["best_score"])
        return best["model_state"], {"selected": {"iteration": best["best_iteration"], "score": best["best_score"]}}

    def _config_file(self):
        """``config.json``: the resolved settings, the classes, the model and the optimizer's groups."""
        return {"args": self.config.to_dict(), "sources": self.config.sources(), "recipe": self.config.recipe,
                "method": self.method.name, "hyper": self.method.hyper_dict(),
                "classes": [list(s) for s in self.ctx.steps[:self.ctx.step + 1]],
                "model": self.spec.name, "backbone": self.spec.backbone, "output_stride": self.spec.output_stride,
                "world_size": self.dist.world_size, "total_iterations": self.total_iterations,
                "batch": batch_record(self.config, self.dist.world_size),
                "param_groups": [{"lr": g["initial_lr"], "weight_decay": g["weight_decay"],
                                  "parameters": sum(p.numel() for p in g["params"])}
                                 for g in self.optimizer.param_groups],
                "run_id": self.run_id, "parent_id": self.parent_id}

    def finish(self):
        """Test the step's result, write ``final.pth`` and the results files; returns the results."""
        ctx = self.ctx
        self.method.end_of_step(self.student, ctx)
        barrier()  # best.pth is written by rank 0
        state, selected = self._selected_weights()
        if selected:
            load_exact(self.student, state, self.ctx.best_path())
        confusion = evaluate_state(ctx, self.config, self.method, self.spec, state, self.dist)
        results = step_results(confusion, ctx, self.method.name, class_names(ctx), ctx.final_path(),
                               self.method.eval_convention())
        results.update(run_id=self.run_id, parent_id=self.parent_id, started_from=self.started_from,
                       provenance=provenance(self.config, ctx, self.dist.world_size, self.dist.device))
        self._check_replicas()
        if self.dist.is_main:
            save_checkpoint(self.checkpoint(self.config.train_epoch, final=True, metrics=results, **selected),
                        ctx.final_path())
            write_step_results(results, ctx.step_dir())
            write_json(self._config_file(), os.path.join(ctx.step_dir(), "config.json"))
            for name, content in self.method.step_files().items():
                write_json(content, os.path.join(ctx.step_dir(), name))
            for leftover in (ctx.last_path(), ctx.best_path()):
                if os.path.exists(leftover):
                    os.remove(leftover)
            if self.config.keep_checkpoints == "last":
                prune_earlier_checkpoints(ctx, self.parent_id)
            log.info(format_step(results))
        self.log.scalars({k: v for k, v in results["summary"].items() if isinstance(v, float)}, self.iteration,
                         "test/")
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
            log.warning("weights differ between ranks at the end of step %d: %s", self.ctx.step, digests)
