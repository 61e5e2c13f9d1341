"""The training loop's logging, kept out of the loop: running means of the loss terms, skipped updates, speed,
time left, the scalars of the chosen loggers (tensorboard, WandB) and the progress bar (one :class:`TrainingLog` per step, in the manner of
torchvision's reference ``MetricLogger``).

The loss terms are summed on the device (:class:`LossMeter`): reading them is the only synchronisation, at
logging points, so nothing in an iteration waits for the device. A loss that is not finite skips the update
and is counted; too many in a row stop the run.
"""
import logging
import os
import time

import torch
import torch.distributed as dist

from engine.progress import duration
from utils.errors import UserError
from utils.logging import StepLoggers, progress

log = logging.getLogger("ciss")

MAX_CONSECUTIVE_NONFINITE = 20


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


class TrainingLog:
    """The logging of one step's training.

    ``iterations_per_epoch`` and ``total_iterations`` of the step; ``images_per_iteration`` = the global batch;
    ``task_progress``: the :class:`engine.progress.TaskProgress` of the run; ``first_iteration``: where the
    step (re)starts (tensorboard drops the events after it). ``run_id`` (the step's, kept by ``--resume``) and
    ``run_config`` (``config.json``'s content) describe the step to the loggers that record runs (WandB: one run
    per step, named ``step{t}``, grouped by the run folder)."""

    def __init__(self, ctx, config, dist_info, iterations_per_epoch, total_iterations, task_progress,
                 first_iteration=0, run_id=None, run_config=None):
        self.ctx, self.config, self.is_main = ctx, config, dist_info.is_main
        self.device = dist_info.device
        self.iterations_per_epoch, self.total_iterations = iterations_per_epoch, total_iterations
        self.images_per_iteration = config.batch_size * dist_info.world_size
        self.task_progress = task_progress
        self.writer = StepLoggers(config.logger, self.is_main, ctx.step_dir(), run_folder=ctx.root, run_id=run_id,
                                  name=f"step{ctx.step}", group=os.path.relpath(ctx.root, config.ckpt_dir),
                                  config=run_config, purge_step=first_iteration or None)
        self.task_progress.start_step(first_iteration)
        self.meter = self.batches = self.epoch_index = self.started = None

    def epoch(self, loader, epoch):
        """``loader`` wrapped for ``epoch`` (0-based): a progress bar on a terminal; the epoch's meter starts."""
        self.epoch_index, self.started, self.meter = epoch, time.time(), LossMeter(self.device)
        self.batches = progress(loader, self.is_main,
                                desc=f"step {self.ctx.step} epoch {epoch + 1}/{self.config.train_epoch}")
        return self.batches

    def iteration(self, terms, nonfinite, iteration, index, lr):
        """Record iteration ``iteration`` of the step (``index``: within the epoch, from 1); every
        ``--print_interval`` iterations, report (the only place that reads the device's sums)."""
        self.meter.add(terms, nonfinite)
        if iteration % self.config.print_interval == 0:
            self._report(iteration, index, lr)

    def end_epoch(self, iteration, lr, skipped_before):
        """The epoch's line: the loss means, the updates skipped in the step so far (``skipped_before`` + the
        epoch's), its duration and speed, time left. Returns the epoch's skipped updates."""
        means, skipped, longest = self.meter.read()
        self._check_nonfinite(longest)
        log.info("step %d epoch %d/%d: %s | lr %.2e | %d skipped | %s, %.1f images/s%s", self.ctx.step,
                 self.epoch_index + 1, self.config.train_epoch, _terms_text(means), lr, skipped_before + skipped,
                 duration(time.time() - self.started), self._speed(self.iterations_per_epoch),
                 self.task_progress.text(iteration, self.total_iterations))
        return skipped

    def scalars(self, values, iteration, prefix=""):
        self.writer.scalars(values, iteration, prefix)

    @property
    def takes_media(self):
        """Whether a logger takes tables and figures (on this rank): see :meth:`table` and :meth:`image`."""
        return self.writer.takes_media

    def table(self, name, columns, rows, iteration):
        self.writer.table(name, columns, rows, iteration)

    def image(self, name, path, iteration):
        self.writer.image(name, path, iteration)

    def close(self):
        self.writer.close()

    def _speed(self, iterations):
        return iterations * self.images_per_iteration / max(time.time() - self.started, 1e-9)

    def _check_nonfinite(self, longest):
        if longest >= MAX_CONSECUTIVE_NONFINITE:
            raise UserError(f"the loss was not finite in {longest} consecutive iterations (step {self.ctx.step},"
                            f" epoch {self.epoch_index + 1}): lower --lr, try without --amp, or check the data")

    def _report(self, iteration, index, lr):
        """Running means of the loss terms since the epoch began, the learning rate and the speed: tensorboard,
        and the progress bar on a terminal; without one, a log line only when ``--print_interval`` was given
        (one summary line per epoch otherwise)."""
        means, _, longest = self.meter.read()
        self._check_nonfinite(longest)
        speed = self._speed(index)
        self.writer.scalars(means, iteration, "loss/")
        self.writer.scalars({"lr": lr, "speed/images_per_s": speed}, iteration)
        text = _terms_text(means)
        if hasattr(self.batches, "set_postfix_str"):
            self.batches.set_postfix_str(f"{text} | lr {lr:.2e} | {speed:.1f} img/s", refresh=False)
        elif "print_interval" in self.config.explicit:
            log.info("step %d epoch %d/%d iteration %d/%d: %s | lr %.2e | %.1f images/s", self.ctx.step,
                     self.epoch_index + 1, self.config.train_epoch, index, self.iterations_per_epoch, text, lr, speed)


def _terms_text(means):
    return " ".join(f"{k} {v:.4f}" for k, v in means.items())
