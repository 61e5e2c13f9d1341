"""The method interface: everything method-specific the trainer needs, as hooks with neutral defaults.

A method is a class with a hyper-parameter dataclass (``Hyper``: every field is a command-line flag of the
same name, every loss weight a named field; ``default_hyper(dataset)`` gives the reference values for a
dataset) and the hooks of :class:`Method`. The trainer calls them in the order that
``engine/setup.py::set_up_step`` lists (then, every epoch, ``set_train_mode``; every iteration, ``loss`` and,
with ``uses_gradients``, ``after_backward``; at the end of the step ``end_of_step``, ``predict``,
``eval_convention`` and ``step_files``), and never branches on a method's name. docs/writing-a-method.md
describes every hook and its order. Methods are registered in ``methods/__init__.py``.

A neutral default is no method's protocol: no teacher surgery, every trainable parameter in one group, no
validation unless ``--val_interval`` asks, the last weights as the step's result, the argmax of the upsampled
logits. What a method must say (its loss and its label table) has no default.
"""
import builtins
import dataclasses
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from datasets.transforms import eval_transform, train_transform
from methods.losses import upsample
from network import build_model
from network.abn import ABN
from utils.tasks import is_domain_incremental

DOMAIN_SETTING = "domains"  # the setting (and run folder) of a domain-incremental task


@dataclass(frozen=True)
class StepContext:
    """The step being run: its dataset, the class ids of every step of the task, its index, and (in a run)
    where its data and its files are. Methods read the first three; the trainer the rest.

    On a domain-incremental dataset (``domains`` set: domain ids per step) step 0 holds every class and the later
    steps add none: the model keeps one classifier over all classes, ``num_new`` is 0 and ``num_old`` every class
    at t > 0 (:attr:`adds_classes` is False)."""
    dataset: str
    steps: tuple  # class ids per step of the whole task
    step: int
    data_root: str = None
    task: str = None  # the name runs are filed under
    overlap: bool = False
    root: str = None  # {ckpt_dir}/{subpath}/{task}/{setting}
    domains: tuple = None  # domain ids per step of the whole task (domain-incremental datasets), else None

    @property
    def classes_per_step(self):
        """Classes of each classifier of the model at this step (steps that add no class add no classifier)."""
        return [len(s) for s in self.steps[:self.step + 1] if s]

    @property
    def teacher_classes_per_step(self):
        """Classes of each classifier of the step t-1 model (the teacher)."""
        return [len(s) for s in self.steps[:self.step] if s]

    @property
    def adds_classes(self):
        """Whether this step adds classes (False at the steps t > 0 of a domain-incremental task)."""
        return self.num_new > 0

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

    @property
    def setting(self):
        if self.domains is not None:  # images are chosen by domain: --overlap / disjoint do not apply
            return DOMAIN_SETTING
        return "overlap" if self.overlap else "disjoint"

    def step_dir(self, step=None):
        return os.path.join(self.root, f"step{self.step if step is None else step}")

    def final_path(self, step=None):
        return os.path.join(self.step_dir(step), "final.pth")

    def last_path(self):
        return os.path.join(self.step_dir(), "last.pth")

    def best_path(self, step=None):
        return os.path.join(self.step_dir(step), "best.pth")


@dataclass(frozen=True)
class ModelSpec:
    """The resolved model of a run: model name (family and backbone), backbone and output stride."""
    name: str
    backbone: str
    output_stride: int = 16


@dataclass(frozen=True)
class MemoryUse:
    """The exemplar memory of a step (:meth:`Method.memory`): image ids from the training lists of earlier
    steps; ``mode`` "replace": half of every training batch is replaced by memory samples (SSUL-M), "concat":
    they join the training set (DKD-M); ``label_split``: the label-table split their labels go through."""
    ids: tuple
    mode: str = "replace"
    label_split: str = "memory"


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


def hyper(default, help, low=None, high=None, positive=False, choices=None, type=None):
    """A field of a method's ``Hyper`` dataclass: its default, its ``--help`` text and its valid range
    (``low <= value <= high``; ``positive``: value > 0; ``choices``), checked when the flags are parsed;
    ``type``: the flag's type where the default (None: the method resolves it) does not tell it."""
    metadata = {"help": help, "low": low, "high": high, "positive": positive, "type": type or builtins.type(default)}
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


def epoch_due(iteration, iterations_per_epoch, every):
    """Whether ``iteration`` (1-based, counted over the step) ends an epoch whose number is a multiple of
    ``every`` (None or 0: never)."""
    if not every or iteration % iterations_per_epoch:
        return False
    return (iteration // iterations_per_epoch) % every == 0


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


def module_params(*modules):
    """Parameters of several modules (or module lists) as one list."""
    return [p for m in modules for p in (m.parameters() if isinstance(m, nn.Module) else m)]


#: A dataset no reference ran (one of the user's own) takes, where a method keeps per-dataset values that are not
#: its published run's settings (loss weights, label tables), the references' VOC values: VOC is each
#: repository's generic case (background 0, void 255). Its published run's settings it does not take: a method's
#: ``published()`` is None there, and the trainer's generic defaults apply (``engine.resolve.GENERIC``).
GENERIC_DATASET = "voc"


def per_dataset(table, dataset):
    """``table[dataset]``, or ``table[GENERIC_DATASET]`` for a dataset the table does not list."""
    return table[dataset] if dataset in table else table[GENERIC_DATASET]


#: The trainer's flags a method's published run sets (:class:`Published`), by flag name.
PUBLISHED_FLAGS = ("crop_size", "crop_val", "lr_policy", "train_epoch", "global_batch", "lr", "weight_decay",
                   "random_seed", "output_stride", "amp")


@dataclass(frozen=True)
class Published:
    """A method's published run on one dataset: the values the reference's argparser, configs and scripts give
    the trainer's common flags, at step 0 and at the steps t > 0 (pairs), and where they come from.

    ``global_batch`` is the batch of one optimizer step over all the reference's GPUs (``gpus``: how many
    the published run used); ``lr`` is ``--lr`` (a method may use it for some groups only); ``tasks`` holds
    per-task exceptions, ``{task: {field: value}}`` (e.g. PLOP's 10 epochs at t > 0 on VOC 10-1)."""
    source: str
    train_epoch: tuple
    global_batch: tuple
    lr: tuple
    gpus: tuple = (1, 1)
    sync_gradients: tuple = (True, True)  # False: the reference's processes never averaged their gradients
    bn_chunks: tuple = (1, 1)  # > 1: BatchNorm statistics per GPU of a DataParallel run (one process, N GPUs)
    crop_size: int = 512
    crop_val: bool = True
    lr_policy: str = "poly"
    weight_decay: float = 1e-4
    random_seed: int = 42
    output_stride: int = 16
    amp: bool = False
    tasks: dict = field(default_factory=dict)

    def for_step(self, task, step):
        """``{flag: value}`` of step ``step`` of ``task``: the ``PUBLISHED_FLAGS``, ``gpus``, ``sync_gradients`` and
        ``bn_chunks``."""
        exceptions = self.tasks.get(task, {})
        values = {}
        for name in PUBLISHED_FLAGS + ("gpus", "sync_gradients", "bn_chunks"):
            value = exceptions.get(name, getattr(self, name))
            values[name] = value[0 if step == 0 else 1] if isinstance(value, tuple) else value
        return values


@dataclass(frozen=True)
class Deviation:
    """A place where ciss can depart from a reference's published behaviour that changes numbers: the flag (a
    method's hyper-parameter, or one of the trainer's), its value under ``--clean``, what the reference does,
    and why that is questionable."""
    flag: str
    clean: object
    reference: str
    why: str


class Method:
    name = ""
    Hyper = None  # a dataclass; every field is a flag of the same name
    model_families = ()  # the network families the method runs on; the first is its default
    uses_gradients = False  # True: after_backward runs between the task-loss backward and the optimizer step
    test_split = "test"  # "test": the whole validation list; "test_seen": the images holding a seen class
    deviations = ()  # the method's own Deviation records: hyper-parameters whose default is the reference's
    #: why the method cannot run on a domain-incremental dataset (None: it can; see :meth:`refusal`)
    domain_refusal = "no reference implementation ran it on a domain-incremental dataset"

    def __init__(self, hyper=None, dataset="voc"):
        self.hp = hyper if hyper is not None else self.default_hyper(dataset)
        self.dataset = dataset

    @classmethod
    def default_hyper(cls, dataset):
        """The reference hyper-parameters for ``dataset`` (override for per-dataset values)."""
        return cls.Hyper()

    def hyper_dict(self):
        return dataclasses.asdict(self.hp)

    def published(self):
        """The method's published run on its dataset (a :class:`Published`), or None where it has none (the
        trainer's generic defaults then apply)."""
        return None

    def refusal(self):
        """Why this method (with its hyper-parameters) cannot run on its dataset, in one line, or None when it can.
        Default: on a domain-incremental dataset, :attr:`domain_refusal`."""
        if is_domain_incremental(self.dataset):
            return self.domain_refusal
        return None

    def step0_protocol(self):
        """What this method's step 0 trains, as a hashable key: a step 1 of another method may start from this
        method's step 0 only when their keys are equal (the same network, loss, labels and nothing carried that
        the other lacks). Default: the method alone."""
        return (self.name,)

    # ---- model ----------------------------------------------------------------------------------------
    def build_network(self, spec, classes_per_step, pretrained=None, layout_step=None):
        """A model for ``classes_per_step`` whose state dict fits the checkpoint of ``layout_step`` (None: a
        fresh model of the current step). Default: the spec's family, built as it is."""
        return build_model(spec.name, classes_per_step, backbone=spec.backbone, output_stride=spec.output_stride,
                           pretrained=pretrained)

    def needs_teacher(self, ctx):
        """Whether the step needs the frozen step t-1 model (the teacher) in every iteration."""
        return ctx.step > 0

    def prepare_student(self, model, previous, ctx):
        """Surgery at t > 0, after step t-1's weights were loaded into the student (default: none)."""

    def bn_frozen(self, ctx):
        """Whether every BN runs on running statistics with frozen affine parameters at this step."""
        return False

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
        """Options of ``utils.schedulers.build_scheduler`` for ``--lr_policy``: ``min_lr``, ``warmup``,
        ``round_warmup`` (default: none, the schedule's own)."""
        return {}

    # ---- data -----------------------------------------------------------------------------------------
    def label_policy(self, steps, step, split):
        """The 256-entry table from raw label values to targets for ``split`` ("train", "val", "test" or
        "memory") at ``step`` (see ``datasets.incremental.label_lut``). Every method states its own."""
        raise NotImplementedError(f"method {self.name!r} defines no label_policy")

    def train_transform(self, crop_size):
        """The joint training transform (default: random scale 0.5-2, crop, flip; ``datasets.transforms``)."""
        return train_transform(crop_size)

    def eval_transform(self, crop_size, crop_val):
        """The joint evaluation transform (resize + centre crop with ``crop_val``, else the full image)."""
        return eval_transform(crop_size, crop_val)

    def trains_on_every_image(self, ctx):
        """Whether the step trains on every image of the training list rather than on the images the overlap or
        disjoint filter keeps (default: the filter)."""
        return False

    def extra_maps(self, ctx, data_root):
        """Per-sample maps loaded and transformed with the image: ``{name: image_id -> PNG path}``."""
        return {}

    def memory(self, ctx):
        """The step's exemplar memory as a :class:`MemoryUse`, or None (default: none)."""
        return None

    # ---- passes before the first epoch ----------------------------------------------------------------
    def before_step(self, model, teacher, data, ctx):
        """Passes over data before the first epoch (default: none); results belong in the method's state."""

    # ---- per batch ------------------------------------------------------------------------------------
    def loss(self, outputs, teacher_outputs, batch, ctx):
        """Named loss terms (``total`` is optimised) from ``(logits, features)`` of the student and the
        teacher (None without teacher) and the :class:`Batch` (labels at image resolution)."""
        raise NotImplementedError(f"method {self.name!r} defines no loss")

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
        (epochs; None = the method's rule, 0 = never). Default: every ``--val_interval`` epochs, else never."""
        return epoch_due(iteration, iterations_per_epoch, val_interval)

    def selects_best(self, ctx, select_best):
        """Whether step t's result (its ``final.pth``, test and successor) is its best-validated weights.
        ``select_best`` is ``--select_best`` (True), ``--select_last`` (False) or None (the method's
        default). Default: only with ``--select_best``."""
        return bool(select_best)

    # ---- prediction and evaluation --------------------------------------------------------------------
    def predict(self, logits, size):
        """Labels at ``size`` from logits at feature resolution (default: argmax of the upsampled logits)."""
        return upsample(logits.float(), size).argmax(dim=1)

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
