"""The method interface: everything method-specific the trainer needs, as hooks with neutral defaults.

A method is a class with a hyper-parameter dataclass (``Hyper``: defaults are the reference values, every
loss weight a named field; each field becomes a command-line flag of the same name) and hooks called by
the trainer in this order for step t:

1. ``build``: the model family (``model_family``); ``init_new_classes`` after the step t-1 weights are
   loaded into the new model; ``configure`` (frozen parameters); ``param_groups`` (learning rates);
   ``bn_trains`` (whether SyncBatchNorm is worth it); ``needs_teacher``.
2. ``before_step``: passes over the data a method needs before training (none for BARM).
3. per epoch ``set_train_mode``; per batch ``loss`` (a dict of named terms with ``total``).
4. ``predict`` (logits → labels) for validation and test.
5. ``state_dict`` / ``load_state_dict``: state carried across steps in the checkpoint.

Methods are registered in ``methods/__init__.py``; the trainer never branches on a method's name.
"""
import dataclasses
from dataclasses import dataclass

from torch import nn

from methods.losses import CRITERIA, activation, upsample


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
    def num_new(self):
        return len(self.steps[self.step])


def batchnorm_modules(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_batchnorm_affine(model):
    """Stop gradients to every BN weight and bias (BARM's ``freeze_bn``, spec §2.3)."""
    for module in batchnorm_modules(model):
        for parameter in (module.weight, module.bias):
            if parameter is not None:
                parameter.requires_grad_(False)


def batchnorm_to_eval(model):
    """Put every BN in eval mode (running statistics), leaving other modules (dropout) as they are."""
    for module in batchnorm_modules(model):
        module.eval()


class Method:
    name = ""
    Hyper = None  # a dataclass; every field is a flag of the same name
    model_family = "deeplabv3bga"
    compatible_families = ("deeplabv3bga", "deeplabv3", "deeplabv3inc")
    label_policy = "barm"
    find_unused_parameters = False  # DDP: do all trainable parameters get a gradient every iteration?

    def __init__(self, hyper=None, dataset="voc"):
        self.hp = hyper if hyper is not None else self.default_hyper(dataset)

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
    def needs_teacher(self, ctx):
        """Whether the step needs the frozen step t-1 model (the teacher)."""
        return ctx.step > 0

    def init_new_classes(self, model, ctx):
        """Initialise the new step's modules after the previous weights were loaded (default: as built)."""

    def bn_frozen(self, ctx):
        """Whether every BN runs on running statistics with frozen affine parameters at this step."""
        return False

    def bn_trains(self, ctx):
        return not self.bn_frozen(ctx)

    def configure(self, model, ctx):
        """Freeze what the method freezes (``requires_grad``), before the optimizer and DDP see the model."""
        if self.bn_frozen(ctx):
            freeze_batchnorm_affine(model)

    def set_train_mode(self, model, ctx):
        """Called before every training epoch."""
        model.train()
        if self.bn_frozen(ctx):
            batchnorm_to_eval(model)

    def param_groups(self, model, ctx, lr):
        """Optimizer parameter groups (default: every trainable parameter at ``lr``)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]

    # ---- data passes ----------------------------------------------------------------------------------
    def before_step(self, model, teacher, loader, ctx):
        """Passes over the training data before the first epoch (default: none)."""

    # ---- per batch ------------------------------------------------------------------------------------
    def loss(self, outputs, teacher_outputs, labels, ctx):
        """Named loss terms (``total`` is optimised) from ``(logits, features)`` of the student and the
        teacher (None without teacher) and the labels at image resolution."""
        raise NotImplementedError

    def criterion(self, logits, labels):
        return CRITERIA[self.hp.loss_type](upsample(logits.float(), labels.shape[-2:]), labels)

    # ---- prediction -----------------------------------------------------------------------------------
    upsample_probabilities = True  # BARM/SSUL: activation, then upsample (spec §7.2); MiB: upsample logits

    def predict(self, logits, size):
        """Labels at ``size`` from logits at feature resolution."""
        logits = logits.float()
        if self.upsample_probabilities:
            return upsample(activation(self.hp.loss_type)(logits), size).argmax(dim=1)
        return upsample(logits, size).argmax(dim=1)

    # ---- state carried across steps -------------------------------------------------------------------
    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        """Restore what :meth:`state_dict` returned at the previous step."""


def module_params(*modules):
    """Parameters of several modules (or module lists) as one list."""
    return [p for m in modules for p in (m.parameters() if isinstance(m, nn.Module) else m)]

