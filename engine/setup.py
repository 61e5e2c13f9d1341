"""Everything before a step's first iteration, in one function: :func:`set_up_step` lists the method's hooks in
the order the trainer calls them (docs/writing-a-method.md describes each).

Inputs come first (the previous checkpoint, the data, an interrupted run's ``last.pth``), so that a bad input
stops the run before it locks the folder, downloads weights or writes anything; rank 0 goes first where it
may build a cache or meet an error first. Then the models are built after re-seeding (the reference re-seeds
and rebuilds at every step), then the optimisation state; then either the method's before-step passes run
(their results go into the method's state) or, with ``--resume``, the state of ``last.pth`` is restored; then
the memory (if any) joins the data and the schedule is built for the resulting number of iterations.
"""
import logging
import os
import uuid

import torch
from torch.nn.parallel import DistributedDataParallel

from datasets import check_data
from engine.checkpoints import check_identity, check_same_run, check_writable
from engine.data import TrainData
from engine.iteration import build_optimizer, grad_scaler, seed_everything
from engine.models import (adopt_recorded_model, check_start, freeze_teacher, load_exact, load_previous_into,
                           model_spec, model_state, pretrained_source, read_previous, to_device, use_channels_last)
from engine.passes import StepData
from engine.context import make_context
from engine.progress import TaskProgress, planned_iterations
from engine.resolve import bn_chunks_per_process, resolve_step
from engine.shared_step0 import shared_from
from engine.step import StepRun
from network.chunked_bn import convert_chunked_batchnorm
from utils.checkpoint import load_checkpoint_file
from utils.distributed import main_first
from utils.errors import UserError
from utils.schedulers import build_scheduler

log = logging.getLogger("ciss")


def set_up_step(ctx, config, method, dist_info, first_step, run_folder, last_step=None):
    """The :class:`engine.step.StepRun` of step ``ctx.step``, ready for its first (or, resumed, next) epoch.

    ``first_step``: the first step of this run (where ``--prev_ckpt`` applies); ``last_step``: its last (for
    the time-left estimates). The method's hooks are called in this order."""
    device = dist_info.device
    # 1. inputs: the previous checkpoint (whose model the step continues), the data, an interrupted run
    previous = main_first(lambda: read_previous(ctx, config, first_step), dist_info) if ctx.step > 0 else None
    started_from = None
    if previous is not None:
        path, checkpoint = previous
        shared = check_start(checkpoint, path, ctx.step - 1, method)        # method.step0_protocol
        if shared is not None:
            log.info("step %d starts from %s, the step 0 of --method %s, which trains as --method %s's does",
                     ctx.step, path, shared, method.name)
        started_from = {"path": os.path.abspath(path), "step": ctx.step - 1, "method": checkpoint.get("method"),
                        "run_id": checkpoint.get("run_id"), "shared_from": shared_from(path)}
        config = adopt_recorded_model(config, checkpoint, path)
    spec = model_spec(config, type(method))                                     # method.model_families
    bn_trains = not method.bn_frozen(ctx)                                       # method.bn_frozen
    chunks = bn_chunks_per_process(config, bn_trains, dist_info.world_size)
    sync_bn = dist_info.distributed and device.type == "cuda" and bn_trains and config.bn_chunks == 1
    if bn_trains and config.micro_batch * (dist_info.world_size if sync_bn else 1) < 2:
        what = f"--batch_size {config.batch_size}" if config.accumulate == 1 else \
            f"micro-batches of {config.micro_batch}"
        raise UserError(f"step {ctx.step} trains BatchNorm statistics, which needs at least 2 images per"
                        f" batch{' across the GPUs' if sync_bn else ''} (got {what})")
    select_best = method.selects_best(ctx, config.select_best)                 # method.selects_best
    if ctx.step == first_step:  # every file, where the dataset asks (one of the user's own): cached after once
        main_first(lambda: check_data(ctx.dataset, ctx.data_root, config.cache_dir), dist_info)
    data = TrainData(ctx, config, dist_info, method)  # method.extra_maps, train_transform, label_policy
    later = range(ctx.step + 1, (ctx.step if last_step is None else last_step) + 1)
    progress = TaskProgress(sum(planned_iterations(resolve_step(config, method, t, dist_info.world_size),
                                                   make_context(config, t), dist_info.world_size, method)
                                for t in later) if dist_info.is_main else 0)
    resume = None
    if config.resume and os.path.exists(ctx.last_path()):
        resume = load_checkpoint_file(ctx.last_path())
        check_identity(resume, method, ctx, spec, ctx.last_path())
        check_same_run(resume, config, method, dist_info.world_size, ctx.last_path())

    # 2. the run folder: locked, its log file started, an interrupted run's temporary files removed
    run_folder.open()
    if dist_info.is_main:
        check_writable(ctx.step_dir())
    run_folder.clean_step(ctx.step_dir())

    # 3. the models, built after re-seeding (rank 0 first: it may download the ImageNet weights)
    seed_everything(config.random_seed)

    def build_models():
        if ctx.step == 0:
            return method.build_network(spec, ctx.classes_per_step, pretrained=pretrained_source(config)), None
        path, checkpoint = previous
        student = method.build_network(spec, ctx.classes_per_step, layout_step=ctx.step - 1)
        old = method.build_network(spec, ctx.teacher_classes_per_step, layout_step=ctx.step - 1)
        state = model_state(checkpoint)
        load_exact(old, state, path)
        load_previous_into(student, state, path)
        method.load_previous_state(checkpoint.get("method_state", {}), ctx)
        method.prepare_student(student, old, ctx)
        log.info("step %d starts from %s", ctx.step, path)
        return student, (freeze_teacher(old) if method.needs_teacher(ctx) else None)

    student, teacher = main_first(build_models, dist_info)
    method.configure(student, ctx)
    student = to_device(student, config, device)
    teacher = to_device(teacher, config, device) if teacher is not None else None
    if bn_trains and chunks > 1:
        student = convert_chunked_batchnorm(student, chunks)
    if sync_bn:
        student = method.sync_batchnorm(student)

    # 4. the optimisation state
    optimizer = build_optimizer(method.param_groups(student, ctx, config.lr), config.lr, config.weight_decay)
    model = student
    if dist_info.distributed:
        model = DistributedDataParallel(student, device_ids=[device] if device.type == "cuda" else None)
    if config.compile:  # the training forward only; evaluation runs the plain module
        model = torch.compile(model)
    channels_last = use_channels_last(config, device)

    # 5. the method's state: restored from last.pth, or made by its passes over the data
    if resume is not None:
        load_exact(student, resume["model_state"], ctx.last_path())
        method.load_state_dict(resume["method_state"])
    else:
        method.set_train_mode(student, ctx)
        method.before_step(student, teacher, StepData(ctx, config, dist_info, method, data, channels_last, spec),
                           ctx)
    data.set_memory(method.memory(ctx))

    # 6. the schedule, for the iterations the data gives
    total_iterations = config.train_epoch * len(data)
    scheduler = build_scheduler(config.lr_policy, optimizer, total_iterations, config.step_size,
                                **method.schedule_options(ctx))
    if select_best and not any(method.validation_due(i, len(data), total_iterations, config.val_interval)
                               for i in range(1, total_iterations + 1)):
        why = "--select_best" if "select_best" in config.explicit else f"{method.name}'s published protocol"
        raise UserError(f"step {ctx.step} selects its best-validated weights ({why}) but never validates: set"
                        f" --val_interval to 1 or more, or use --select_last (or --clean)")
    # results of a step name the run that produced them and the run of the checkpoint it started from, so that
    # the summary across steps follows one chain (never stale results of an older run)
    run = StepRun(ctx, config, method, dist_info, spec=spec, data=data, student=student, teacher=teacher, model=model,
                  optimizer=optimizer, scheduler=scheduler, scaler=grad_scaler(device, config.amp),
                  channels_last=channels_last, select_best=select_best, total_iterations=total_iterations,
                  progress=progress, run_id=resume["run_id"] if resume is not None else uuid.uuid4().hex,
                  parent_id=previous[1].get("run_id") if previous is not None else None, started_from=started_from)
    if resume is not None:
        run.restore(resume, ctx.last_path())
    return run


def run_step(ctx, config, method, dist_info, first_step, run_folder, last_step=None, end_of_step=None):
    """Set up, train and test one step (``last_step``: the run's last step, for the time-left estimates);
    ``end_of_step(step_log, iteration)``, if given, is called with the step's
    :class:`engine.meter.TrainingLog` and last iteration once the step's results are written, before its loggers
    close (the entry point logs the summary across steps there)."""
    run = set_up_step(ctx, config, method, dist_info, first_step, run_folder, last_step)
    try:
        run.train()
        results = run.finish()
        if end_of_step is not None:
            end_of_step(run.log, run.iteration)
        return results
    finally:
        run.close()
