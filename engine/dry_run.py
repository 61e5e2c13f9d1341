"""``--dry_run``: every input checked, then the resolved settings of every step the command would run, as one JSON
document, without writing anything (no run folder, no checkpoint, no class-index cache, no downloaded weights).

Per step: every flag's value and where it came from (:mod:`engine.resolve`), the global batch and the batch per
process, the step's training images and iterations, and the optimizer's parameter groups (learning rate, weight
decay, trainable parameters) of the model the step would train (built without pretrained weights: the groups
depend on the architecture only).
"""
import os

from datasets import check_data
from engine.context import make_context, task_steps
from engine.data import train_samples
from engine.models import check_start, model_spec, pretrained_source, read_previous
from engine.progress import iterations_per_epoch
from engine.resolve import bn_chunks_per_process, deviations_of, resolve_step
from methods.base import PUBLISHED_FLAGS
from utils.errors import UserError
from utils.tasks import check_step


def _groups(method, spec, ctx, config):
    """The optimizer's parameter groups of the model step ``ctx.step`` trains."""
    layout = ctx.step - 1 if ctx.step > 0 else None
    model = method.build_network(spec, ctx.classes_per_step, layout_step=layout)
    method.configure(model, ctx)
    groups = []
    for group in method.param_groups(model, ctx, config.lr):
        groups.append({"lr": group["lr"], "weight_decay": group.get("weight_decay", config.weight_decay),
                       "parameters": sum(p.numel() for p in group["params"] if p.requires_grad)})
    return groups


def dry_run(config, method_cls, method_hyper, steps, world_size):
    """The JSON-ready description of the steps ``steps`` of the configured task on ``world_size`` processes.
    Raises :class:`UserError` for any bad input, as the run would."""
    if config.pretrained and not os.path.isfile(config.pretrained):
        raise UserError(f"pretrained file {config.pretrained} does not exist")
    described = []
    for step in steps:
        ctx = make_context(config, step)
        method = method_cls(method_hyper, dataset=config.dataset)
        step_config = resolve_step(config, method, step, world_size)
        if not config.test and step == steps[0] and step > 0:  # the first step's previous checkpoint
            path, checkpoint = read_previous(ctx, step_config, steps[0])
            check_start(checkpoint, path, step - 1, method)
        spec = model_spec(step_config, method_cls)
        bn_chunks_per_process(step_config, not method.bn_frozen(ctx), world_size)
        if step == steps[0]:  # every file, where the dataset asks (one of the user's own), as the run would
            check_data(ctx.dataset, ctx.data_root, step_config.cache_dir, persist=False)
        images = len(train_samples(ctx, step_config, method, persist=False))
        per_epoch = iterations_per_epoch(images, step_config, world_size)
        if per_epoch < 1:
            raise UserError(f"step {step} of {config.task} ({ctx.setting}) has {images} training images: fewer than"
                            f" one batch of {step_config.global_batch}")
        settings = {name: {"value": value, "source": step_config.source(name)}
                    for name, value in sorted(step_config.to_dict().items())}
        described.append({
            "step": step, "classes": list(ctx.steps[step]), "channels": ctx.num_classes,
            "model": spec.name, "backbone": spec.backbone, "output_stride": spec.output_stride,
            "pretrained": pretrained_source(step_config) if step == 0 else f"step {step - 1}'s weights",
            "global_batch": step_config.global_batch, "batch_per_process": step_config.batch_size,
            "accumulate": step_config.accumulate, "micro_batch": step_config.micro_batch,
            "processes": world_size, "reference_shards": step_config.reference_shards,
            "training_images": images, "iterations_per_epoch": per_epoch,
            "total_iterations": per_epoch * step_config.train_epoch,
            "published": {name: settings[name] for name in PUBLISHED_FLAGS},
            "param_groups": _groups(method, spec, ctx, step_config),
            "settings": settings,
        })
    reference = [{"flag": d.flag, "clean": d.clean, "reference": d.reference, "why": d.why,
                  "value": described[0]["settings"].get(d.flag, {}).get("value")} for d in deviations_of(method_cls)]
    return {"method": config.method, "dataset": config.dataset, "task": ctx.task, "setting": ctx.setting,
            "run_folder": ctx.root, "processes": world_size, "clean": config.clean, "recipe": config.recipe,
            "deviations": reference, "steps": described}


def steps_of(config, step_range):
    """The steps a command would run: ``step_range(config, steps)`` when training, the tested step(s) with
    ``--test`` (every step of the task without ``--curr_step``)."""
    steps = task_steps(config)
    if config.test:
        if config.curr_step is not None:
            check_step(steps, config.curr_step, task=f"{config.dataset} task {config.task}")
            return [config.curr_step]
        return list(range(len(steps)))
    first, last = step_range(config, steps)
    return list(range(first, last + 1))
