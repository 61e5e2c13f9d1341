"""Models of a step: the student for steps 0..t, the previous step's checkpoint, the frozen teacher.

Step t > 0 loads step t-1's ``final.pth`` (or ``--prev_ckpt``, or step 0's ``best.pth`` at step 1 with
``--select_best``). The checkpoint is validated before anything is trained: it must exist, be readable,
and hold the classes of steps 0..t-1 of this task (ciss checkpoints record them; official BARM/SSUL ones
are checked by loading strictly into the step t-1 model). The student is built fresh (seeded, as the
reference re-seeds and rebuilds at every step), receives the old weights, then the method initialises the
new classes. The teacher is the step t-1 model in eval mode without gradients; it is never wrapped in DDP.
"""
import logging
import os

import torch

from network import build_model
from utils.checkpoint import load_checkpoint_file, strip_module_prefix
from utils.errors import UserError

log = logging.getLogger("ciss")


def model_spec(args, method_cls):
    """``(model name, backbone)`` from ``--model``/``--backbone`` and the method's model family."""
    name = args.model or method_cls.model_family
    family = name.partition("_")[0]
    if family not in method_cls.compatible_families:
        raise UserError(f"--model {name}: method {method_cls.name} needs one of the model families"
                        f" {', '.join(method_cls.compatible_families)}")
    return name, args.backbone


def pretrained_source(args):
    """``pretrained`` argument of ``build_model`` for step 0."""
    if args.no_pretrained:
        return None
    return args.pretrained or "imagenet"


def use_channels_last(args, device):
    return args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cuda")


def to_device(model, args, device):
    model = model.to(device)
    if use_channels_last(args, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def previous_checkpoint_path(plan, args, first_step):
    if args.prev_ckpt and plan.step == first_step:
        return args.prev_ckpt
    if args.select_best and plan.step == 1:
        return plan.best_path(0)
    return plan.final_path(plan.step - 1)


def read_checkpoint(path, plan, upto, missing):
    """The checkpoint at ``path`` holding the classes of steps 0..``upto`` of the plan's task; ``missing``
    says what to do when the file is absent. Every problem is a :class:`UserError`."""
    if not os.path.exists(path):
        raise UserError(missing)
    checkpoint = load_checkpoint_file(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model_state", checkpoint), dict):
        raise UserError(f"checkpoint {path} holds no model state: expected a dict with 'model_state'")
    expected = [list(s) for s in plan.steps[:upto + 1]]
    if "classes" in checkpoint:  # ciss checkpoints record them; official BARM/SSUL files are checked by shape
        if checkpoint.get("dataset") != plan.dataset or checkpoint["classes"] != expected:
            raise UserError(
                f"checkpoint {path} was trained on {checkpoint.get('dataset')} task {checkpoint.get('task')}"
                f" (classes per step {checkpoint['classes']}), but step {plan.step} of {plan.dataset} task"
                f" {plan.task} needs classes per step {expected}")
    return checkpoint


def read_previous(plan, args, first_step):
    """The step t-1 checkpoint as ``(path, checkpoint dict)``."""
    path = previous_checkpoint_path(plan, args, first_step)
    missing = (f"previous checkpoint {path} does not exist: train step {plan.step - 1} of {plan.task}"
               f" ({plan.setting}) first, or pass --prev_ckpt")
    return path, read_checkpoint(path, plan, plan.step - 1, missing)


def model_state(checkpoint):
    return strip_module_prefix(checkpoint.get("model_state", checkpoint))


def load_exact(model, state, path):
    """Load ``state`` into ``model`` requiring the same keys and shapes; a mismatch is a UserError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        details = "; ".join(f"{what} {keys[0]}{f' (+{len(keys) - 1} more)' if len(keys) > 1 else ''}"
                            for what, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("wrong shape", wrong)) if keys)
        raise UserError(f"checkpoint {path} does not fit the model for classes per step"
                        f" {model.classes_per_step} ({details})")
    model.load_state_dict(state)


def build_step_models(plan, args, method, first_step):
    """``(student, teacher or None, previous checkpoint or None)`` for the step, on the CPU.

    The student is built first, then the previous model, in the reference's order (the random draws of
    both happen after the step's seed was set).
    """
    name, backbone = model_spec(args, type(method))
    pretrained = pretrained_source(args) if plan.step == 0 else None
    student = build_model(name, plan.classes_per_step, backbone=backbone, output_stride=args.output_stride,
                          pretrained=pretrained)
    if plan.step == 0:
        return student, None, None
    path, checkpoint = read_previous(plan, args, first_step)
    previous = build_model(name, plan.classes_per_step[:-1], backbone=backbone, output_stride=args.output_stride)
    state = model_state(checkpoint)
    load_exact(previous, state, path)
    student.load_state_dict(state, strict=False)
    method.init_new_classes(student, plan)
    method.load_state_dict(checkpoint.get("method_state", {}))
    log.info("step %d starts from %s", plan.step, path)
    if not method.needs_teacher(plan):
        return student, None, checkpoint
    previous.eval()
    previous.requires_grad_(False)
    return student, previous, checkpoint
