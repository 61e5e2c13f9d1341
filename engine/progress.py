"""Time left: the planned iterations of the steps a run trains, and estimates for the step and the task.

The estimate counts ``epochs × ⌊images per process / batch⌋`` for every step still to train (the step lists come
from the cached class index; a method's memory joining the training set is not counted). Estimates use the
current step's measured time per iteration for the rest of the task, so they are rough until the teacher's
steps have started (step 0 has none).
"""
import math
import time

from engine.data import train_samples


def iterations_per_epoch(n_images, config, world_size):
    """Iterations of an epoch of ``n_images`` at the step's ``batch_size`` on ``world_size`` processes (the loader
    drops the last partial batch); with ``reference_shards`` > 1, rank 0's share of a published run whose
    processes never synchronised, in batches of ``batch_size`` x ``world_size``."""
    shards = config.reference_shards
    if shards > 1:
        return math.ceil(n_images / shards) // (config.batch_size * world_size)
    return math.ceil(n_images / world_size) // config.batch_size


def planned_iterations(config, ctx, world_size, method, persist=True):
    """Iterations of ``ctx``'s step for its resolved ``config`` on ``world_size`` processes."""
    samples = train_samples(ctx, config, method, persist=persist)
    return config.train_epoch * iterations_per_epoch(len(samples), config, world_size)


def duration(seconds):
    """``"42 s"``, ``"3 min 20 s"``, ``"5 h 07 min"``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class TaskProgress:
    """The iterations left after the current step (``later``) and the current step's pace."""

    def __init__(self, later_iterations=0):
        self.later = later_iterations
        self.start = self.done_at_start = None

    def start_step(self, iteration):
        self.start, self.done_at_start = time.time(), iteration

    def estimates(self, iteration, total):
        """``(seconds left in the step, seconds left in the task)`` at ``iteration`` of ``total``, or None
        before the first measured iteration."""
        done = iteration - self.done_at_start
        if self.start is None or done <= 0:
            return None
        per_iteration = (time.time() - self.start) / done
        step_left = (total - iteration) * per_iteration
        return step_left, step_left + self.later * per_iteration

    def text(self, iteration, total):
        estimate = self.estimates(iteration, total)
        if estimate is None:
            return ""
        step_left, task_left = estimate
        return f" | left: step {duration(step_left)}, task about {duration(task_left)}"
