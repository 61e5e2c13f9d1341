"""What one incremental step is (dataset, task, classes, setting) and where its files go.

Layout: ``{ckpt_dir}/{subpath}/{task}/{overlap|disjoint}/step{t}/`` holds ``final.pth`` (end of the step),
``last.pth`` (end of the latest epoch, while the step runs), ``best.pth`` (with ``--select_best``),
``results.json``, ``per_class.csv``, ``config.json`` and the tensorboard events; ``summary.csv`` in the
setting folder has one row per evaluated step.
"""
import os
from dataclasses import dataclass

from methods.base import StepContext
from utils.tasks import check_step, get_task, task_name


@dataclass(frozen=True)
class StepPlan(StepContext):
    """A :class:`StepContext` (dataset, class lists, step) with the data and output locations."""
    data_root: str
    task: str  # the name runs are filed under
    overlap: bool
    root: str  # {ckpt_dir}/{subpath}/{task}/{setting}

    @property
    def setting(self):
        return "overlap" if self.overlap else "disjoint"

    def step_dir(self, step=None):
        return os.path.join(self.root, f"step{self.step if step is None else step}")

    def final_path(self, step=None):
        return os.path.join(self.step_dir(step), "final.pth")

    def last_path(self):
        return os.path.join(self.step_dir(), "last.pth")

    def best_path(self, step=None):
        return os.path.join(self.step_dir(step), "best.pth")


def task_steps(args):
    """The class lists of ``--task`` / ``--task_file`` for ``--dataset``."""
    return get_task(args.dataset, args.task, args.task_file)


def make_plan(args, step):
    steps = task_steps(args)
    name = task_name(args.task, args.task_file)
    check_step(steps, step, task=f"{args.dataset} task {name}")
    root = os.path.join(args.ckpt_dir, args.subpath or args.method, name, "overlap" if args.overlap else "disjoint")
    return StepPlan(args.dataset, tuple(tuple(s) for s in steps), step, args.data_root, name, args.overlap, root)
