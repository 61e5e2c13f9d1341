"""Models of a step: the student for steps 0..t, the previous step's checkpoint, the frozen teacher.

Every model is built by the method (``Method.build_network``) from the run's :class:`ModelSpec`, the same
way for training, ``--test`` and ``--resume``. Step t > 0 loads step t-1's ``final.pth`` (or
``--prev_ckpt``). The checkpoint is validated before anything is trained: it must exist, be readable, and
hold the classes of steps 0..t-1 of this task (ciss checkpoints record them; official BARM/SSUL ones are
checked by loading strictly into the step t-1 model). The student is built fresh (seeded, as the reference
re-seeds and rebuilds at every step), receives the old weights, then the method's surgery
(``prepare_student``) initialises the new classes. The teacher is the step t-1 model, frozen (eval mode, no
gradients); it is never wrapped in DDP. ``engine/setup.py`` calls these in order.
"""
import dataclasses
import logging
import os

import torch

from methods import METHODS
from methods.base import ModelSpec
from network import layout_of, split_model_name
from network.dkd import reference_checkpoint_state
from utils.checkpoint import load_checkpoint_file, strip_module_prefix
from utils.errors import UserError

log = logging.getLogger("ciss")


def model_spec(config, method_cls):
    """The run's :class:`ModelSpec` from ``--model``/``--backbone``/``--output_stride`` and the method's
    model family (the backbone resolved: the flag, else the name's suffix, else resnet101)."""
    name = config.model or method_cls.model_families[0]
    family, backbone = split_model_name(name, config.backbone)
    if family not in method_cls.model_families:
        raise UserError(f"--model {name}: method {method_cls.name} needs one of the model families"
                        f" {', '.join(method_cls.model_families)}")
    return ModelSpec(name=name, backbone=backbone, output_stride=config.output_stride)


def pretrained_source(config):
    """``pretrained`` argument of ``build_network`` for step 0."""
    if config.no_pretrained:
        return None
    return config.pretrained or "imagenet"


def use_channels_last(config, device):
    return config.channels_last == "on" or (config.channels_last == "auto" and device.type == "cuda")


def to_device(model, config, device):
    model = model.to(device)
    if use_channels_last(config, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def previous_checkpoint_path(ctx, config, first_step):
    if config.prev_ckpt and ctx.step == first_step:
        return config.prev_ckpt
    return ctx.final_path(ctx.step - 1)


def read_checkpoint(path, ctx, upto, missing):
    """The checkpoint at ``path`` holding the classes of steps 0..``upto`` of the ctx's task; ``missing``
    says what to do when the file is absent. Every problem is a :class:`UserError`."""
    if not os.path.exists(path):
        raise UserError(missing)
    checkpoint = load_checkpoint_file(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model_state", checkpoint), dict):
        raise UserError(f"checkpoint {path} holds no model state: expected a dict with 'model_state'")
    expected = [list(s) for s in ctx.steps[:upto + 1]]
    if "classes" in checkpoint:  # ciss checkpoints record them; official BARM/SSUL files are checked by shape
        if checkpoint.get("dataset") != ctx.dataset or checkpoint["classes"] != expected:
            raise UserError(
                f"checkpoint {path} was trained on {checkpoint.get('dataset')} task {checkpoint.get('task')}"
                f" (classes per step {checkpoint['classes']}), but step {ctx.step} of {ctx.dataset} task"
                f" {ctx.task} needs classes per step {expected}")
    if ctx.domains is not None and "domains" in checkpoint:  # domain tasks: the same classes, other domains
        domains = [list(d) for d in ctx.domains[:upto + 1]]
        if checkpoint["domains"] != domains:
            raise UserError(f"checkpoint {path} was trained on {checkpoint.get('dataset')} task"
                            f" {checkpoint.get('task')} (domains per step {checkpoint['domains']}), but step {ctx.step}"
                            f" of {ctx.dataset} task {ctx.task} needs domains per step {domains}")
    return checkpoint


def recorded_method(checkpoint):
    """The method a ciss checkpoint was trained with, built with its recorded hyper-parameters (None for a
    checkpoint that records no method, or one that ciss does not know)."""
    name = checkpoint.get("method")
    if name not in METHODS:
        return None
    method_cls = METHODS[name]
    dataset = checkpoint.get("dataset", "voc")
    hyper = method_cls.default_hyper(dataset)
    known = {f.name for f in dataclasses.fields(hyper)}
    hyper = dataclasses.replace(hyper, **{k: v for k, v in checkpoint.get("hyper", {}).items() if k in known})
    return method_cls(hyper, dataset=dataset)


def check_start(checkpoint, path, step, method):
    """The one rule for which checkpoint a step of ``method`` may use as step ``step`` (the step before the one
    it trains, or, with ``--test``, the one it evaluates), for training, ``--resume`` and ``--test`` alike.

    A checkpoint of the same method, or one that records no method (the reference repositories'), is accepted;
    a step 0 of another method is accepted when both methods' step 0 trains the same thing
    (:meth:`methods.base.Method.step0_protocol`, e.g. the MiB family's plain CE step 0); anything else is refused
    with one line naming the checkpoint, its method and this run's. Returns the other method's name when a
    checkpoint of another method is adopted (None otherwise)."""
    recorded = checkpoint.get("method")
    if recorded is None or recorded == method.name:
        return None
    other = recorded_method(checkpoint)
    if other is None:
        raise UserError(f"checkpoint {path} was trained with --method {recorded}, which this version of ciss does not"
                        f" know: --method {method.name} cannot start from it")
    if step == 0 and other.step0_protocol() == method.step0_protocol():
        return recorded
    why = ("its step 0 trains another network, loss or labels, or carries state that --method"
           f" {method.name} needs") if step == 0 else "only a step 0 can be shared between methods"
    raise UserError(f"checkpoint {path} (step {step}) was trained with --method {recorded}; --method {method.name}"
                    f" cannot start from it ({why}): train it with --method {method.name}, or run --method"
                    f" {recorded}")


def read_previous(ctx, config, first_step):
    """The step t-1 checkpoint as ``(path, checkpoint dict)``."""
    path = previous_checkpoint_path(ctx, config, first_step)
    missing = (f"previous checkpoint {path} does not exist: train step {ctx.step - 1} of {ctx.task}"
               f" ({ctx.setting}) first, or pass --prev_ckpt")
    return path, read_checkpoint(path, ctx, ctx.step - 1, missing)


def model_state(checkpoint):
    """The model state of a checkpoint file's contents, whichever code wrote it: ciss's, BARM's, KProBA's and
    SSUL's (``model_state``), MiB's, PLOP's and RCIL's (``model_state`` with DDP's ``module.`` prefix), DKD's
    (``state_dict``, renamed by :func:`network.dkd.reference_checkpoint_state`), or a bare state dict. Whether
    the state fits the method's network is :func:`load_exact`'s check."""
    if "model_state" not in checkpoint and "state_dict" in checkpoint:
        return reference_checkpoint_state(checkpoint)
    return strip_module_prefix(checkpoint.get("model_state", checkpoint))


def freeze_teacher(model):
    """The step t-1 model as the teacher: eval mode, no gradients (never wrapped in DDP)."""
    model.eval()
    model.requires_grad_(False)
    return model


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
        theirs, ours = layout_of(state), layout_of(own)
        if theirs != ours:
            raise UserError(f"checkpoint {path} holds a {theirs or 'model of unknown layout'}, not the {ours} this"
                            " run builds: evaluate or continue it with the method that trained it")
        details = "; ".join(f"{what} {keys[0]}{f' (+{len(keys) - 1} more)' if len(keys) > 1 else ''}"
                            for what, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("wrong shape", wrong)) if keys)
        if wrong:
            details += f": {tuple(state[wrong[0]].shape)} in the file, {tuple(own[wrong[0]].shape)} in the model"
        raise UserError(f"checkpoint {path} does not fit the model for classes per step"
                        f" {model.classes_per_step} of this task and step ({details})")
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


def build_eval_model(method, spec, ctx, state, path):
    """The model of step ``ctx.step`` with ``state`` loaded exactly (for the test and ``--test``)."""
    model = method.build_network(spec, ctx.classes_per_step, layout_step=ctx.step)
    load_exact(model, state, path)
    return model


MODEL_KEYS = ("model", "backbone", "output_stride")


def adopt_recorded_model(config, checkpoint, path):
    """The configuration of a step t > 0, which continues the model of its previous checkpoint: the model,
    backbone and output stride a ciss checkpoint records are adopted (and said), unless a flag sets another
    value, which is refused."""
    adopted = {}
    for key in MODEL_KEYS:
        if key not in checkpoint:  # official BARM/SSUL checkpoints: checked by loading
            continue
        recorded, ours = checkpoint[key], getattr(config, key)
        if key in config.explicit and ours != recorded and not (
                key == "model" and split_model_name(recorded, checkpoint.get("backbone"))
                == split_model_name(ours, config.backbone)):
            raise UserError(f"{path} was trained with --{key} {recorded}, but this run asks for --{key} {ours}: a step"
                            f" continues the model of the step before it (drop --{key})")
        if ours != recorded:
            # nothing to say when the flag was left out and the model is the method's family, or when the
            # user's own --model names the backbone (deeplabv3bga_resnet18)
            implied = ours is None and (key == "model" or (
                key == "backbone" and "model" in config.explicit
                and config.model.partition("_")[2] == recorded))
            if not implied:
                log.info("%s was trained with --%s %s: continuing with it", path, key, recorded)
            adopted[key] = recorded
    return config.replace(f"checkpoint {path}", **adopted) if adopted else config
