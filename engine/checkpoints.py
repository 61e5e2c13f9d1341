"""What a step's checkpoints hold and the checks that guard them: the identity of the run that wrote one (method,
data, classes, model), the refusal to ``--resume`` a step with settings that would make a hybrid of two runs,
and ``--keep_checkpoints last``'s removal of earlier steps' weights. Writing is
:func:`utils.checkpoint.save_checkpoint`; the contents are assembled by :class:`engine.step.StepRun`.
"""
import hashlib
import json
import logging
import os

from utils.errors import UserError
from utils.jsonfile import write_json

log = logging.getLogger("ciss")

#: Flags a resumed step must share with the run it continues (they shape the schedule, the data or the loss).
RESUME_FLAGS = ("train_epoch", "batch_size", "accumulate", "lr", "lr_policy", "step_size", "weight_decay", "crop_size",
                "random_seed", "amp", "loss_type")


def check_same_run(checkpoint, config, method, world_size, path):
    """Refuse to ``--resume`` from ``path`` with settings that would make a hybrid of two runs."""
    saved = checkpoint.get("args", {})
    for name in RESUME_FLAGS:
        if name in saved and hasattr(config, name) and saved[name] != getattr(config, name):
            raise UserError(f"--resume: {path} was trained with --{name} {saved[name]}, this run has --{name}"
                            f" {getattr(config, name)}: resume with the same flags, or remove it to start the step"
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


def identity(ctx, method, spec):
    """What a checkpoint was trained as: method, data, classes and model."""
    return {"method": method.name, "dataset": ctx.dataset, "task": ctx.task, "setting": ctx.setting,
            "step": ctx.step, "classes": [list(s) for s in ctx.steps[:ctx.step + 1]],
            **({"domains": [list(d) for d in ctx.domains[:ctx.step + 1]]} if ctx.domains is not None else {}),
            "model": spec.name, "backbone": spec.backbone, "output_stride": spec.output_stride}


def check_identity(checkpoint, method, ctx, spec, path):
    """Refuse a ``last.pth`` written by another run (method, classes or model)."""
    ours = identity(ctx, method, spec)
    for key in ("method", "classes", "domains", "model", "backbone", "output_stride"):
        if checkpoint.get(key) != ours.get(key):
            raise UserError(f"{path} belongs to another run ({key} {checkpoint.get(key)}, this run {ours.get(key)}):"
                            f" remove it or drop --resume")


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


def prune_earlier_checkpoints(ctx, parent_id):
    """``--keep_checkpoints last``: remove the ``final.pth`` of the earlier steps of this run's chain (their
    results files stay); the newest step's checkpoint is all the next step needs."""
    for step in range(ctx.step - 1, -1, -1):
        path = ctx.final_path(step)
        results = os.path.join(ctx.step_dir(step), "results.json")
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
