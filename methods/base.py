"""The method interface: everything method-specific the trainer needs, as hooks with neutral defaults.

A method is a class with a hyper-parameter dataclass (``Hyper``: defaults are the reference values, every
loss weight a named field; each field becomes a command-line flag of the same name; ``default_hyper``
gives per-dataset values) and the hooks below. The trainer (``engine/``) calls them in this order for step
t of a task and never branches on a method's name:

1. **Model** (training, ``--test`` and ``--resume`` alike). ``build_network`` builds every model of the step
   (student, teacher, evaluation model) from the resolved :class:`ModelSpec`; ``layout_step`` says whose
   checkpoint it must load (a method whose architecture changes after step 0, such as RCIL's merged
   branches, builds the layout that step saved). At t > 0 the student receives step t-1's weights
   (``strict=False``: the new classes are missing) and ``prepare_student(student, previous, ctx)`` performs
   the surgery (classifier initialisation, branch merge, weight transfer); ``previous`` is the step t-1
   model with its weights, on the CPU. The teacher (``needs_teacher``) is that model after
   ``prepare_teacher`` (frozen, eval). ``configure`` freezes parameters (``requires_grad``);
   ``param_groups`` gives the optimizer's groups (a group may carry its own ``weight_decay``);
   ``bn_trains`` says whether BatchNorm statistics train (SyncBatchNorm and the batch-size check);
   ``sync_batchnorm`` converts the model's norm layers for multi-GPU training.
2. **Data.** ``label_policy`` (a function ``(steps, step, split) -> 256-entry table``, see
   ``datasets.incremental``), ``train_transform`` / ``eval_transform``, ``extra_maps`` (per-sample maps
   transformed with the image, e.g. SSUL's saliency), ``test_split`` (which images the end-of-step test
   uses), and a memory: ``memory_ids`` (image ids chosen by the method, kept in its state),
   ``memory_mode`` ("replace" part of every batch, or "concat" to the training set) and the memory's label
   split.
3. **Before the first epoch** (skipped on ``--resume``, whose checkpoint holds the results):
   ``before_step(student, teacher, data, ctx)`` with ``data`` a :class:`engine.passes.StepData` giving
   ready-to-use batches (normalised, on the device, in the model's memory format) and an autocast context.
4. **Every epoch** ``set_train_mode``; **every iteration**: teacher and student forward (autocast), then
   ``loss(outputs, teacher_outputs, batch, ctx)`` -> named terms with ``total``; the backward of
   ``total``; with ``uses_gradients``: the gradients are unscaled and ``after_backward(model, ctx,
   finite)`` may update statistics from them and return a penalty (named terms with ``total``) whose
   backward is added, unscaled; then the optimizer and scheduler step. ``validation_due`` decides when
   to validate; ``validation_score`` scores the validation confusion matrix; ``selects_best`` whether the
   step's result is its best-validated weights rather than its last ones.
5. **End of the step**: ``end_of_step(model, ctx)`` (statistics carried to the next step), then
   ``predict`` (logits -> labels) for the test, ``eval_convention`` (recorded in the results) and
   ``step_files`` (JSON files written into the step folder).
6. **State**: ``state_dict`` goes into every checkpoint; ``load_state_dict`` restores it exactly
   (``--resume``); ``load_previous_state`` receives step t-1's final state at the start of step t.

Methods are registered in ``methods/__init__.py``.
"""
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from datasets.incremental import barm_lut
from datasets.transforms import eval_transform, train_transform
from methods.losses import CRITERIA, activation, upsample
from network import build_model
from network.abn import ABN
from utils.checkpoint import strip_module_prefix

# BARM's validation cadence (BARM trainer/trainer.py::Trainer.train): after every epoch when an epoch has more
# than this many iterations, else after every 5th epoch.
BARM_VALIDATION_ITERATIONS = 100
BARM_VALIDATION_PERIOD = 5


@dataclass(frozen=True)
class StepContext:
    """What a method may know about the step being trained."""
    dataset: str
    steps: tuple  # class ids per step of the whole task
    step: int

    @property
    def classes_per_step(self):
        return [len(s) for s in self.steps[:self.step + 1]]

    @property
    def num_classes(self):
        """Channels of the model at this step (background included)."""
        return sum(self.classes_per_step)

    @property
    def num_old(self):
        """Classes of steps 0..t-1 (background included)."""
        return self.num_classes - self.num_new if self.step > 0 else 0

    @property
    def num_new(self):
        return len(self.steps[self.step])


@dataclass(frozen=True)
class ModelSpec:
    """The resolved model of a run: model name (family and backbone), backbone and output stride."""
    name: str
    backbone: str
    output_stride: int = 16


@dataclass
class Batch:
    """One training batch on the device.

    ``images``: float (B, 3, H, W), normalised; ``labels``: int64 (B, H, W) of channel positions, 255 =
    ignore; ``extras``: per-sample maps from :meth:`Method.extra_maps` (uint8 (B, H, W) each);
    ``memory``: bool (B,), True for samples drawn from the method's memory; ``ids``: image ids.
    """
    images: torch.Tensor
    labels: torch.Tensor
    extras: dict = field(default_factory=dict)
    memory: torch.Tensor = None
    ids: tuple = ()


def hyper(default, help, low=None, high=None, positive=False, choices=None):
    """A field of a method's ``Hyper`` dataclass: its default, its ``--help`` text and its valid range
    (``low <= value <= high``; ``positive``: value > 0; ``choices``), checked when the flags are parsed."""
    metadata = {"help": help, "low": low, "high": high, "positive": positive}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(default=default, metadata=metadata)


def check_hyper_value(name, value, metadata):
    """The problem with ``value`` for the hyper-parameter ``name`` (None when it is valid)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if metadata.get("positive") and not value > 0:
        return f"--{name} must be positive, got {value}"
    low, high = metadata.get("low"), metadata.get("high")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if low is not None and high is not None else (
            f"at least {low}" if low is not None else f"at most {high}")
        return f"--{name} must be {bounds}, got {value}"
    return None


def batchnorm_modules(model):
    """Every batch-normalisation layer: torch's BatchNorm/SyncBatchNorm and the InPlace-ABN equivalent."""
    return [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, ABN))]


def freeze_batchnorm_affine(model):
    """Stop gradients to every BN weight and bias (BARM network/utils.py::_SimpleSegmentationModel.freeze_bn)."""
    for module in batchnorm_modules(model):
        for parameter in (module.weight, module.bias):
            if parameter is not None:
                parameter.requires_grad_(False)


def batchnorm_to_eval(model):
    """Put every BN in eval mode (running statistics), leaving other modules (dropout) as they are."""
    for module in batchnorm_modules(model):
        module.eval()


def freeze(model):
    """A frozen copy-free view of ``model``: eval mode and no gradients (the teacher)."""
    model.eval()
    model.requires_grad_(False)
    return model


def module_params(*modules):
    """Parameters of several modules (or module lists) as one list."""
    return [p for m in modules for p in (m.parameters() if isinstance(m, nn.Module) else m)]


class Method:
    name = ""
    Hyper = None  # a dataclass; every field is a flag of the same name
    model_family = "deeplabv3bga"
    compatible_families = ("deeplabv3bga", "deeplabv3", "deeplabv3inc")
    find_unused_parameters = False  # DDP: do all trainable parameters get a gradient every iteration?
    uses_gradients = False  # True: after_backward runs between the task-loss backward and the optimizer step
    test_split = "test"  # "test": the whole validation list (BARM/SSUL); "test_seen": images with a seen class
    memory_mode = "replace"  # "replace": part of every batch comes from the memory; "concat": joins the set
    memory_split = "memory"  # label split of memory samples (see datasets.incremental)
    # BARM/SSUL: activation, then upsample (BARM trainer/trainer.py::Trainer.validate); MiB: upsample logits
    upsample_probabilities = True

    def __init__(self, hyper=None, dataset="voc"):
        self.hp = hyper if hyper is not None else self.default_hyper(dataset)
        self.dataset = dataset

    @classmethod
    def default_hyper(cls, dataset):
        """The reference hyper-parameters for ``dataset`` (override for per-dataset values)."""
        return cls.Hyper()

    @classmethod
    def hyper_fields(cls):
        return dataclasses.fields(cls.Hyper)

    def hyper_dict(self):
        return dataclasses.asdict(self.hp)

    # ---- model ----------------------------------------------------------------------------------------
    def network_options(self):
        """Extra keyword arguments of the model family's builder (e.g. SSUL's ``unknown=True``)."""
        return {}

    def build_network(self, spec, classes_per_step, pretrained=None, layout_step=None):
        """A model for ``classes_per_step`` whose state dict fits the checkpoint of ``layout_step`` (None: a
        fresh model of the current step). Default: the spec's family with :meth:`network_options`."""
        return build_model(spec.name, classes_per_step, backbone=spec.backbone, output_stride=spec.output_stride,
                           pretrained=pretrained, **self.network_options())

    def needs_teacher(self, ctx):
        """Whether the step needs the frozen step t-1 model (the teacher) in every iteration."""
        return ctx.step > 0

    def convert_previous_state(self, checkpoint):
        """The model state of a step t-1 checkpoint file's contents (default: ``model_state`` or the bare state
        dict, without ``module.`` prefixes). A method whose reference code saved another layout converts it
        here, so that ``--prev_ckpt`` takes the reference's released checkpoints."""
        return strip_module_prefix(checkpoint.get("model_state", checkpoint))

    def prepare_student(self, model, previous, ctx):
        """Surgery at t > 0, after step t-1's weights were loaded into the student (default: none)."""

    def prepare_teacher(self, teacher, ctx):
        """Make the step t-1 model the teacher (default: eval mode, no gradients)."""
        return freeze(teacher)

    def bn_frozen(self, ctx):
        """Whether every BN runs on running statistics with frozen affine parameters at this step."""
        return False

    def bn_trains(self, ctx):
        return not self.bn_frozen(ctx)

    def sync_batchnorm(self, model):
        """The model with synchronised BatchNorm for multi-GPU CUDA training."""
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def configure(self, model, ctx):
        """Freeze what the method freezes (``requires_grad``), before the optimizer and DDP see the model."""
        if self.bn_frozen(ctx):
            freeze_batchnorm_affine(model)

    def set_train_mode(self, model, ctx):
        """Called before every training epoch (and after every validation)."""
        model.train()
        if self.bn_frozen(ctx):
            batchnorm_to_eval(model)

    def param_groups(self, model, ctx, lr):
        """Optimizer parameter groups (default: every trainable parameter at ``lr``)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]

    def schedule_options(self, ctx):
        """Options of ``utils.schedulers.build_scheduler`` for ``--lr_policy`` (default BARM's: poly's 1e-6
        floor, a 10% warm-up rounded down): ``min_lr``, ``warmup``, ``round_warmup``."""
        return {}

    # ---- data -----------------------------------------------------------------------------------------
    def label_policy(self, steps, step, split):
        """The 256-entry table from raw label values to targets (default: BARM's,
        BARM datasets/voc.py::gt_label_mapping)."""
        return barm_lut(steps, step, split)

    def train_transform(self, crop_size):
        return train_transform(crop_size)

    def eval_transform(self, crop_size, crop_val):
        return eval_transform(crop_size, crop_val)

    def extra_maps(self, ctx, data_root):
        """Per-sample maps loaded and transformed with the image: ``{name: image_id -> PNG path}``."""
        return {}

    def memory_ids(self):
        """Image ids of the step's memory (from the previous steps' training lists); empty: no memory."""
        return []

    def memory_fraction(self):
        """With ``memory_mode == "replace"``: the fraction of every batch taken from the memory."""
        return 0.5

    # ---- passes before the first epoch ----------------------------------------------------------------
    def before_step(self, model, teacher, data, ctx):
        """Passes over data before the first epoch (default: none); results belong in the method's state."""

    # ---- per batch ------------------------------------------------------------------------------------
    def loss(self, outputs, teacher_outputs, batch, ctx):
        """Named loss terms (``total`` is optimised) from ``(logits, features)`` of the student and the
        teacher (None without teacher) and the :class:`Batch` (labels at image resolution)."""
        raise NotImplementedError

    def criterion(self, logits, labels):
        return CRITERIA[self.hp.loss_type](upsample(logits.float(), labels.shape[-2:]), labels)

    def after_backward(self, model, ctx, finite):
        """With ``uses_gradients``: called after the task-loss backward with unscaled gradients in
        ``p.grad`` (``finite``: whether they are finite; the update is skipped when not). Returns named
        penalty terms with ``total`` (backpropagated unscaled, added to the gradients) or None."""
        return None

    def end_of_step(self, model, ctx):
        """After the last epoch, before the step's checkpoint is written (default: nothing)."""

    # ---- validation and checkpoint selection ----------------------------------------------------------
    def validation_due(self, iteration, iterations_per_epoch, total_iterations, val_interval):
        """Validate after ``iteration`` (1-based, counted over the step)? ``val_interval`` is ``--val_interval``
        (epochs; None = the method's rule, 0 = never). Default: BARM's per-epoch rule
        (BARM trainer/trainer.py::Trainer.train)."""
        if iteration % iterations_per_epoch:
            return False
        epoch = iteration // iterations_per_epoch  # epochs completed
        if val_interval is None:
            return (iterations_per_epoch > BARM_VALIDATION_ITERATIONS
                    or epoch % BARM_VALIDATION_PERIOD == 0)
        return val_interval > 0 and epoch % val_interval == 0

    def validation_score(self, class_iou, ctx):
        """Model-selection score from the validation split's per-class IoU (BARM
        trainer/trainer.py::Trainer.validate): mean IoU of the step's new classes (at step 0: classes 0..n_0-1,
        background included)."""
        first = ctx.num_old if ctx.step > 0 else 0
        return float(np.mean([class_iou[c] for c in range(first, ctx.num_classes)]))

    def selects_best(self, ctx, select_best):
        """Whether step t's result (its ``final.pth``, test and successor) is its best-validated weights.
        ``select_best`` is ``--select_best`` (True), ``--select_last`` (False) or None (the method's
        default). Default (BARM): only with ``--select_best`` and only at step 0 (BARM
        trainer/trainer.py::Trainer.init_ckpt loaded step 0's best file; ciss needs the flag:
        docs/differences.md)."""
        return bool(select_best) and ctx.step == 0

    # ---- prediction and evaluation --------------------------------------------------------------------
    def predict(self, logits, size):
        """Labels at ``size`` from logits at feature resolution."""
        logits = logits.float()
        if self.upsample_probabilities:
            return upsample(activation(self.hp.loss_type)(logits), size).argmax(dim=1)
        return upsample(logits, size).argmax(dim=1)

    def eval_convention(self):
        """How the paper reports results (recorded in results.json; see ``metrics.summary``)."""
        return {"background_in_old": True, "exclude_absent": False}

    def step_files(self):
        """JSON-serialisable files written into the step folder at the end of the step: ``{name: content}``."""
        return {}

    # ---- state carried across steps -------------------------------------------------------------------
    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        """Restore exactly what :meth:`state_dict` returned (``--resume``)."""

    def load_previous_state(self, state, ctx):
        """Receive step t-1's final :meth:`state_dict` at the start of step t (default: as on resume)."""
        self.load_state_dict(state)
