"""Models of a step: the student for steps 0..t, the previous step's checkpoint, the frozen teacher.

Every model is built by the method (``Method.build_network``) from the run's :class:`ModelSpec`, the same
way for training, ``--test`` and ``--resume``. Step t > 0 loads step t-1's ``final.pth`` (or
``--prev_ckpt``). The checkpoint is validated before anything is trained: it must exist, be readable, and
hold the classes of steps 0..t-1 of this task (ciss checkpoints record them; official BARM/SSUL ones are
checked by loading strictly into the step t-1 model). The student is built fresh (seeded, as the reference
re-seeds and rebuilds at every step), receives the old weights, then the method's surgery
(``prepare_student``) initialises the new classes. The teacher is the step t-1 model prepared by the method
(eval mode, no gradients); it is never wrapped in DDP.
"""
import logging
import os

import torch

from methods.base import ModelSpec
from network import split_model_name
from utils.checkpoint import load_checkpoint_file, strip_module_prefix
from utils.errors import UserError

log = logging.getLogger("ciss")


def model_spec(args, method_cls):
    """The run's :class:`ModelSpec` from ``--model``/``--backbone``/``--output_stride`` and the method's
    model family (the backbone resolved: the flag, else the name's suffix, else resnet101)."""
    name = args.model or method_cls.model_family
    family, backbone = split_model_name(name, args.backbone)
    if family not in method_cls.compatible_families:
        raise UserError(f"--model {name}: method {method_cls.name} needs one of the model families"
                        f" {', '.join(method_cls.compatible_families)}")
    return ModelSpec(name=name, backbone=backbone, output_stride=args.output_stride)


def pretrained_source(args):
    """``pretrained`` argument of ``build_network`` for step 0."""
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
    """Load ``state`` into ``model`` requiring the same keys and shapes; a mismatch is a UserError. BatchNorm
    counters (``num_batches_tracked``) absent from the file (InPlace-ABN checkpoints have none) keep the
    model's own."""
    own = model.state_dict()
    state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
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


def load_previous_into(student, state, path):
    """Load step t-1's ``state`` into the step t student: every key of the state must exist in the student
    with the same shape (the student's new modules are the only keys the state may lack)."""
    own = student.state_dict()
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if unexpected or wrong:
        what, key = ("unexpected", unexpected[0]) if unexpected else ("wrong shape", wrong[0])
        raise UserError(f"checkpoint {path} does not fit the step's student ({what} {key})")
    student.load_state_dict(state, strict=False)


def build_eval_model(method, spec, plan, state, path):
    """The model of step ``plan.step`` with ``state`` loaded exactly (for the test and ``--test``)."""
    model = method.build_network(spec, plan.classes_per_step, layout_step=plan.step)
    load_exact(model, state, path)
    return model


MODEL_KEYS = ("model", "backbone", "output_stride")


def adopt_recorded_model(args, checkpoint, path):
    """A step t > 0 continues the model of its previous checkpoint: the model, backbone and output stride a
    ciss checkpoint records are adopted (and said), unless a flag sets another value, which is refused."""
    for key in MODEL_KEYS:
        if key not in checkpoint:  # official BARM/SSUL checkpoints: checked by loading
            continue
        recorded, ours = checkpoint[key], getattr(args, key)
        if key in getattr(args, "explicit", ()) and ours != recorded and not (
                key == "model" and split_model_name(recorded, checkpoint.get("backbone"))
                == split_model_name(ours, args.backbone)):
            raise UserError(f"{path} was trained with --{key} {recorded}, but this run asks for --{key} {ours}: a step"
                            f" continues the model of the step before it (drop --{key})")
        if ours != recorded:
            # nothing to say when the flag was left out and the model is the method's family, or when the
            # user's own --model names the backbone (deeplabv3bga_resnet18)
            implied = ours is None and (key == "model" or (
                key == "backbone" and "model" in getattr(args, "explicit", ())
                and args.model.partition("_")[2] == recorded))
            if not implied:
                log.info("%s was trained with --%s %s: continuing with it", path, key, recorded)
            setattr(args, key, recorded)


def build_step_models(plan, args, method, spec, previous_checkpoint):
    """``(student, teacher or None)`` for the step, on the CPU; ``previous_checkpoint`` is ``(path, dict)`` of
    step t-1 (None at step 0).

    The student is built first, then the previous model, in the reference's order (the random draws of
    both happen after the step's seed was set).
    """
    pretrained = pretrained_source(args) if plan.step == 0 else None
    if plan.step == 0:
        return method.build_network(spec, plan.classes_per_step, pretrained=pretrained), None
    student = method.build_network(spec, plan.classes_per_step, layout_step=plan.step - 1)
    path, checkpoint = previous_checkpoint
    previous = method.build_network(spec, plan.classes_per_step[:-1], layout_step=plan.step - 1)
    state = method.convert_previous_state(checkpoint)
    load_exact(previous, state, path)
    load_previous_into(student, state, path)
    method.load_previous_state(checkpoint.get("method_state", {}), plan)
    method.prepare_student(student, previous, plan)
    log.info("step %d starts from %s", plan.step, path)
    if not method.needs_teacher(plan):
        return student, None
    return student, method.prepare_teacher(previous, plan)
