"""The step being run (:class:`methods.base.StepContext`) from the run's configuration.

Its files go to ``{ckpt_dir}/{subpath}/{task}/{overlap|disjoint|domains}/step{t}/``: ``final.pth`` (end of the
step), ``last.pth`` (end of the latest epoch, while the step runs), ``best.pth`` (while a selecting step runs),
``results.json``, ``per_class.csv``, ``config.json`` and the tensorboard events; ``summary.csv`` in the
setting folder has one row per evaluated step.
"""
import dataclasses
import os

from datasets import num_classes
from methods.base import StepContext
from utils.tasks import check_step, get_domains, get_task, task_name


def task_steps(config):
    """The class lists of ``--task`` / ``--task_file`` for ``--dataset`` (whose number of classes a dataset of
    one's own gives in its folder's description)."""
    return get_task(config.dataset, config.task, config.task_file,
                    num_classes=num_classes(config.dataset, config.data_root))


def make_context(config, step):
    """The :class:`StepContext` of ``step`` of the configured task."""
    steps = task_steps(config)
    name = task_name(config.task, config.task_file)
    check_step(steps, step, task=f"{config.dataset} task {name}")
    domains = get_domains(config.dataset, config.task, config.task_file)
    ctx = StepContext(config.dataset, tuple(tuple(s) for s in steps), step, config.data_root, name, config.overlap,
                      domains=None if domains is None else tuple(tuple(d) for d in domains))
    root = os.path.join(config.ckpt_dir, config.subpath or config.method, name, ctx.setting)
    return dataclasses.replace(ctx, root=root)
