"""The MiB family's shared protocol: :class:`MiBFamily` and its label tables (MiB run.py::main,
train.py::Trainer).

:class:`MiBFamily` is the base class of FT, LwF, LwF-MC, ILT, EWC, PI, RW, MiB, PLOP and RCIL: everything
their reference repositories share and that is not a loss (MiB run.py::main, train.py::Trainer):

* model: MiB's DeepLab-v3 (``model_families = ("mib",)``: ``mod1..mod5`` ResNet with InPlace-ABN numerics, one
  1×1 classifier per step, :mod:`network.mib`); ``sync_batchnorm`` converts to :class:`network.abn.SyncABN`
  (InPlaceABNSync); no BN freezing, one parameter group (SGD settings of the trainer: Nesterov 0.9, wd on
  every parameter, MiB run.py::main);
* new classifier (``prepare_student``): MiB's background initialisation (:func:`init_new_classifier`) when
  :meth:`MiBFamily.background_init` says so ("full": weights and biases, MiB/PLOP; "weights": RCIL's
  weight-only variant; None: PyTorch's default initialisation, the baselines);
* data: RandomResizedCrop + flip (:func:`datasets.transforms.mib_train_transform`), resize + centre-crop
  evaluation; the test images are those with a seen class (``test_split = "test_seen"``, MiB
  dataset/utils.py::filter_images); the label tables are the repository's (:attr:`MiBFamily.default_protocol`:
  ``"mib"`` or ``"plop"``, MiB or PLOP dataset/voc.py::VOCSegmentationIncremental, see :func:`mib_voc_lut`,
  :func:`mib_ade_lut`, :func:`plop_lut`);
* schedule: PolyLR without a floor (``schedule_options`` → ``min_lr`` 0, MiB utils/scheduler.py::PolyLR);
* validation: every epoch for the logs, never used to select (``--val_interval`` N: every N epochs, 0:
  never; ``selects_best`` only with an explicit ``--select_best``), MiB run.py::main;
* prediction: argmax of the upsampled logits (the interface's default, MiB
  metrics/stream_metrics.py::StreamSegMetrics);
* evaluation convention (:meth:`MiBFamily.eval_convention`): background in "old", classes absent from the
  test ground truth excluded (StreamSegMetrics), ADE class 0 ignored (MiB) or scored (PLOP/RCIL).

A method whose hyper-parameters have a ``protocol`` field (:func:`protocol_hyper`: ``--protocol mib|plop``)
may run under the other repository's label tables and evaluation convention: PLOP's paper re-ran MiB and ILT
under PLOP's (PLOP images/plop_voc.png, scripts/voc/mib_15-1.sh).

Subclasses write ``loss`` (and their hyper-parameters); :meth:`MiBFamily.upsampled` gives logits at the
labels' size, as every reference loss uses them.
"""
import numpy as np
import torch
from torch import nn

from datasets import get_layout
from datasets.incremental import IGNORE, LUT_SIZE, channel_order
from datasets.transforms import eval_transform, mib_train_transform
from methods import losses
from methods.base import Method, Published, epoch_due, hyper, per_dataset
from network.abn import convert_sync_abn
from utils.tasks import is_domain_incremental

# label conventions of the reference repositories (MiB dataset/voc.py, PLOP dataset/voc.py)
MIB_PROTOCOL = "mib"
PLOP_PROTOCOL = "plop"
PROTOCOLS = (MIB_PROTOCOL, PLOP_PROTOCOL)
MASKING_VALUE = 0  # old / future classes at training become background (MiB dataset/voc.py, "masking_value")
POLY_MIN_LR = 0.0  # MiB/PLOP's PolyLR has no floor (MiB utils/scheduler.py::PolyLR)

# background initialisation modes of the new classifier (MiB segmentation_module.py::init_new_classifier,
# RCIL's weight-only variant)
INIT_FULL = "full"  # W_new ← W_bg, b_new ← b_bg − log(N+1), b_bg likewise (MiB, PLOP)
INIT_WEIGHTS = "weights"  # W_new ← W_bg only (RCIL on VOC/ADE)


# ---- label policies (MiB dataset/voc.py, dataset/ade.py; PLOP dataset/voc.py, dataset/ade.py) ------------

def _seen(steps, step):
    return [c for s in steps[:step + 1] for c in s]


def _table(fill):
    return np.full(LUT_SIZE, fill, dtype=np.uint8)


def mib_voc_lut(steps, step, split):
    """MiB's VOC label mapping (MiB dataset/voc.py::VOCSegmentationIncremental), raw value → channel.

    * train (and memory): the step's classes → their channel; background, old and future classes → 0;
      **void 255 → 0** (quirk of MiB dataset/voc.py::VOCSegmentationIncremental:
      ``inverted_order[255] = masking_value``);
    * val: the step's classes → their channel, background → 0, old and future classes → 255, void 255;
    * test: every seen class (steps 0..t) → its channel, future classes → 255, void 255.
    """
    order = channel_order(steps)
    if split == "test":
        lut = _table(IGNORE)
        seen = _seen(steps, step)
        lut[seen] = order[seen]
        return lut
    new = list(steps[step])
    if split == "val":
        lut = _table(IGNORE)
        lut[0] = 0
        lut[new] = order[new]
        return lut
    lut = _table(MASKING_VALUE)
    lut[new] = order[new]
    # quirk (MiB dataset/voc.py::VOCSegmentationIncremental): VOC void pixels are background at training
    lut[IGNORE] = MASKING_VALUE
    return lut


def mib_ade_lut(steps, step, split):
    """MiB's ADE20K label mapping (MiB dataset/ade.py::AdeSegmentationIncremental), raw value → channel.

    * train (and memory): the step's classes → their channel; ADE 0, old and future classes → 0;
    * val: the step's classes → their channel; **ADE 0 → 255** (ignored, not scored), old and future → 255;
    * test: every seen class → its channel except ADE 0 → 255; future classes → 255.

    ADE labels have no 255; a 255 stays 255 in every split. With ADE 0 ignored, channel 0 has no test
    ground truth and the "exclude absent classes" convention leaves it out of every mean (150 classes).
    """
    order = channel_order(steps)
    if split in ("val", "test"):
        lut = _table(IGNORE)
        kept = _seen(steps, step) if split == "test" else list(steps[step])
        lut[kept] = order[kept]
        lut[0] = IGNORE  # ADE "other" is not a class at evaluation in MiB (MiB dataset/ade.py)
        return lut
    lut = _table(MASKING_VALUE)
    new = list(steps[step])
    lut[new] = order[new]
    lut[IGNORE] = IGNORE
    return lut


def plop_lut(steps, step, split):
    """PLOP's and RCIL's label mapping, VOC and ADE alike (PLOP dataset/voc.py::VOCSegmentationIncremental,
    dataset/ade.py::AdeSegmentationIncremental, with masking "current"), raw value → channel.

    * train, val (and memory): the step's classes → their channel; background / ADE 0, old and future
      classes → 0; void 255 stays 255 (ignored);
    * test: every seen class → its channel (ADE 0 → 0, a scored class); **future classes → 0**; void 255.
    """
    order = channel_order(steps)
    kept = _seen(steps, step) if split == "test" else list(steps[step])
    lut = _table(MASKING_VALUE)
    lut[kept] = order[kept]
    lut[IGNORE] = IGNORE
    return lut


def cityscapes_domain_lut(steps, step, split):
    """PLOP's and RCIL's Cityscapes label mapping (PLOP dataset/cityscapes_domain.py::id_to_trainid, applied as the
    target transform of every split): raw ``labelIds`` → train id 0..18 (then its channel), every other id → 255.
    The same at every step and split: a domain step masks nothing (the 19 classes are labelled everywhere)."""
    return channel_order(steps)[get_layout("cityscapes_domain").label_table()]


LABEL_TABLES = {
    (MIB_PROTOCOL, "voc"): mib_voc_lut,
    (MIB_PROTOCOL, "ade"): mib_ade_lut,
    (PLOP_PROTOCOL, "voc"): plop_lut,
    (PLOP_PROTOCOL, "ade"): plop_lut,
    (MIB_PROTOCOL, "cityscapes_domain"): cityscapes_domain_lut,
    (PLOP_PROTOCOL, "cityscapes_domain"): cityscapes_domain_lut,
}


def protocol_label_policy(protocol, dataset):
    """The label policy ``(steps, step, split) -> table`` of a repository's protocol (``"mib"`` or
    ``"plop"``) on ``dataset`` (``"voc"`` or ``"ade"``; another dataset takes the VOC table,
    ``methods.base.per_dataset``)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"no label table for protocol {protocol!r}: expected one of {PROTOCOLS}")
    return per_dataset({d: table for (p, d), table in LABEL_TABLES.items() if p == protocol}, dataset)


def protocol_hyper(default=MIB_PROTOCOL):
    """The ``protocol`` hyper-parameter of a family method: whose label tables and evaluation convention
    (MiB or PLOP dataset/voc.py, metrics/stream_metrics.py::StreamSegMetrics) the method follows, ``"mib"``
    or ``"plop"``."""
    return hyper(default, "label tables and evaluation of MiB's repository (mib: VOC void = background at training,"
                          " ADE class 0 not scored, future classes ignored at test) or of PLOP's (plop: void"
                          " ignored, ADE class 0 scored, future classes background at test)",
                 choices=PROTOCOLS)


def kd_alpha_hyper():
    """The ``alpha`` hyper-parameter of the family's distillations (MiB, LwF, ILT, RCIL: ``--alpha``)."""
    return hyper(losses.KD_ALPHA, "teacher logits are multiplied by it before the softmax (MiB's --alpha)",
                 positive=True)


# ---- the published runs ---------------------------------------------------------------------------------

#: Cityscapes domain-incremental: every run of the family was PLOP's code (PLOP
#: scripts/cityscapesDomain/mib_cityscapesDomain_1-1.sh, plop_cityscapesDomain_{1-1,11-1}.sh: 2 GPUs x batch 12,
#: lr 0.01 then 0.001, 50 epochs at every step, apex O1); the MiB repository has no Cityscapes code.
CITYSCAPES_DOMAIN_PUBLISHED = Published(
    "PLOP scripts/cityscapesDomain/*_cityscapesDomain_*.sh (2 GPUs x batch 12, lr 0.01 then 0.001, 50 epochs,"
    " apex O1)",
    train_epoch=(50, 50), global_batch=(24, 24), lr=(0.01, 0.001), gpus=(2, 2), amp=True)
#: The MiB repository's runs (MiB README: 2 GPUs x batch 12, lr 0.01 at step 0 then 0.001, 30 epochs on VOC and
#: 60 on ADE, crop 512, fp32 (apex O0), seed 42).
MIB_PUBLISHED = {
    "voc": Published("MiB README, VOC (2 GPUs x batch 12, lr 0.01 then 0.001, 30 epochs, fp32)",
                     train_epoch=(30, 30), global_batch=(24, 24), lr=(0.01, 0.001), gpus=(2, 2)),
    "ade": Published("MiB README, ADE (2 GPUs x batch 12, lr 0.01 then 0.001, 60 epochs, fp32)",
                     train_epoch=(60, 60), global_batch=(24, 24), lr=(0.01, 0.001), gpus=(2, 2)),
    "cityscapes_domain": CITYSCAPES_DOMAIN_PUBLISHED,
}
#: PLOP's runs and its re-runs of the MiB family (PLOP scripts/voc/plop_*.sh, scripts/ade/plop_ade_*.sh,
#: scripts/voc/mib_15-1.sh): the same, with apex O1 (``--amp``) and 10 epochs at t > 0 on VOC 10-1.
PLOP_PUBLISHED = {
    "voc": Published("PLOP scripts/voc/plop_*.sh, mib_15-1.sh (2 GPUs x batch 12, lr 0.01 then 0.001, 30 epochs;"
                     " 10-1: 10 epochs at t > 0; apex O1)",
                     train_epoch=(30, 30), global_batch=(24, 24), lr=(0.01, 0.001), gpus=(2, 2), amp=True,
                     tasks={"10-1": {"train_epoch": (30, 10)}}),
    "ade": Published("PLOP scripts/ade/plop_ade_*.sh (2 GPUs x batch 12, lr 0.01 then 0.001, 60 epochs, apex O1)",
                     train_epoch=(60, 60), global_batch=(24, 24), lr=(0.01, 0.001), gpus=(2, 2), amp=True),
    "cityscapes_domain": CITYSCAPES_DOMAIN_PUBLISHED,
}
PUBLISHED_BY_PROTOCOL = {MIB_PROTOCOL: MIB_PUBLISHED, PLOP_PROTOCOL: PLOP_PUBLISHED}


# ---- the new classifier's background initialisation (MiB segmentation_module.py::init_new_classifier) ------

def init_new_classifier(cls_old0: nn.Conv2d, cls_new: nn.Conv2d, with_bias=True):
    """Background-aware initialisation of the new step's classifier, in place (MiB
    segmentation_module.py::init_new_classifier).

    ``cls_old0`` is step 0's classifier (``cls[0]``, channel 0 = background) and ``cls_new`` the current
    step's classifier (``cls[-1]``, N_new = ``cls_new.out_channels`` channels); both 1×1 convolutions over
    the same features. With W_bg, b_bg the weight and bias of channel 0 of ``cls_old0``::

        W_new,c ← W_bg                              for every new class c
        b_new,c ← b_bg − log(N_new + 1)             for every new class c      (with_bias)
        b_bg    ← b_bg − log(N_new + 1)                                        (with_bias)

    so the old background probability is split evenly over background + N_new classes. The background
    bias is lowered again at every step (MiB segmentation_module.py::init_new_classifier, reproduced on
    purpose). ``with_bias=False`` is RCIL's VOC/ADE variant (RCIL segmentation_module.py::init_new_classifier):
    only the weights are copied, the biases keep their values. Runs under ``no_grad``; returns None.
    """
    if cls_old0.in_channels != cls_new.in_channels or cls_old0.kernel_size != cls_new.kernel_size:
        raise ValueError(f"init_new_classifier: the classifiers differ in input ({cls_old0.in_channels} vs "
                         f"{cls_new.in_channels} channels) or kernel size ({cls_old0.kernel_size} vs "
                         f"{cls_new.kernel_size})")
    if with_bias and (cls_old0.bias is None or cls_new.bias is None):
        raise ValueError("init_new_classifier: with_bias=True needs both classifiers to have a bias")
    n_new = cls_new.out_channels
    with torch.no_grad():
        cls_new.weight.copy_(cls_old0.weight[0:1].expand_as(cls_new.weight))
        if with_bias:
            # the reference computes log(N_new + 1) as a float32 tensor: same rounding here
            shift = torch.log(torch.tensor(float(n_new + 1), dtype=torch.float32)).to(cls_old0.bias.device)
            new_bias = cls_old0.bias[0] - shift.to(cls_old0.bias.dtype)
            cls_new.bias.copy_(new_bias.expand_as(cls_new.bias))
            # quirk (MiB segmentation_module.py::init_new_classifier): the background bias is lowered as well,
            # at every step
            cls_old0.bias[0] = new_bias


# ---- the family's base class -------------------------------------------------------------------------------

class MiBFamily(Method):
    """Base class of the MiB family, PLOP and RCIL (see the module docstring). Interface for subclasses:

    * :attr:`default_protocol`: ``"mib"`` (MiB's repo: FT, LwF, LwF-MC, ILT, EWC, PI, RW, MiB) or
      ``"plop"`` (PLOP, RCIL); picks the label tables and the evaluation convention, unless the hyper-parameters
      have a ``protocol`` field (:meth:`protocol`).
    * :meth:`background_init` (ctx) → None, :data:`INIT_FULL` or :data:`INIT_WEIGHTS`; default
      :attr:`default_background_init` (None).
    * :meth:`upsampled` (logits, labels) → float32 logits at the labels' size (bilinear,
      ``align_corners=False``).
    * ``loss`` (to write); ``needs_teacher`` defaults to t > 0.
    """

    model_families = ("mib",)
    test_split = "test_seen"  # validation images with a seen class (MiB dataset/utils.py::filter_images)
    default_protocol = MIB_PROTOCOL
    default_background_init = None
    domain_refusal = None  # PLOP and RCIL ran the family on Cityscapes domains (see refusal for the exceptions)
    #: hyper-parameters that only mean something where a step adds classes to a background: on a domain-incremental
    #: dataset they must be off (PLOP's Cityscapes scripts never set them: scripts/cityscapesDomain/*.sh)
    BACKGROUND_ONLY = {"init_balanced": "copies the background classifier's weights to the new classes' classifier",
                       "classif_adaptive_factor": "weighs each image by its background pixels that were"
                                                  " pseudo-labelled"}

    # ---- model ----------------------------------------------------------------------------------------
    def sync_batchnorm(self, model):
        """InPlaceABNSync: every :class:`network.abn.ABN` becomes a :class:`network.abn.SyncABN` (MiB
        segmentation_module.py::make_model)."""
        return convert_sync_abn(model)

    def refusal(self):
        """On a domain-incremental dataset: :attr:`domain_refusal` (the family runs), unless a hyper-parameter of
        :attr:`BACKGROUND_ONLY` is on: there is no background and no new classifier there."""
        refusal = super().refusal()
        if refusal or not is_domain_incremental(self.dataset):
            return refusal
        for name, what in self.BACKGROUND_ONLY.items():
            if getattr(self.hp, name, False):
                return (f"--{name} {what}, and {self.dataset} has no background and adds no class at any step"
                        f" (give --no_{name})")
        return None

    def background_init(self, ctx):
        """How ``prepare_student`` initialises the new classifier at t > 0: None (PyTorch's default, kept),
        :data:`INIT_FULL` (weights and biases, MiB segmentation_module.py::init_new_classifier) or
        :data:`INIT_WEIGHTS` (weights only, RCIL's variant)."""
        return self.default_background_init

    def prepare_student(self, model, previous, ctx):
        """The new classifier's initialisation (:meth:`background_init`), on ``cls[0]`` and ``cls[-1]``; none at a
        step that adds no class (a domain step keeps its one classifier)."""
        mode = self.background_init(ctx)
        if mode is None or not ctx.adds_classes:
            return
        if mode not in (INIT_FULL, INIT_WEIGHTS):
            raise ValueError(f"unknown background initialisation {mode!r}: expected {INIT_FULL!r} or {INIT_WEIGHTS!r}")
        init_new_classifier(model.cls[0], model.cls[-1], with_bias=mode == INIT_FULL)

    def schedule_options(self, ctx):
        """PolyLR without BARM's 1e-6 floor (MiB utils/scheduler.py::PolyLR)."""
        return {"min_lr": POLY_MIN_LR}

    # ---- data -----------------------------------------------------------------------------------------
    #: A small task with an old-to-be and a future class, on which the step-0 training tables are compared.
    STEP0_PROBE = ((0, 1), (2,))

    def step0_protocol(self):
        """The family's step 0 is the same plain CE training for FT, LwF, ILT, MiB and PLOP (MiB run.py::main
        trains step 0 alike whatever ``--method``): shared when the network family and the step-0 training labels
        are the same. The labels are MiB's or PLOP's (``protocol``): on VOC they differ (MiB learns void pixels as
        background), on ADE their training tables are one."""
        return (self.model_families[0], "ce", tuple(self.label_policy(self.STEP0_PROBE, 0, "train").tolist()))

    def published(self):
        """The run of the repository whose protocol the method follows (MiB's, or PLOP's with ``--protocol
        plop``)."""
        return PUBLISHED_BY_PROTOCOL[self.protocol()].get(self.dataset)

    def protocol(self):
        """``"mib"`` or ``"plop"``: the hyper-parameter ``protocol`` when the method has one, else
        :attr:`default_protocol`."""
        return getattr(self.hp, "protocol", self.default_protocol)

    def label_policy(self, steps, step, split):
        """The repository's label table (MiB or PLOP dataset/voc.py, dataset/ade.py): see :func:`mib_voc_lut`,
        :func:`mib_ade_lut`, :func:`plop_lut`."""
        return protocol_label_policy(self.protocol(), self.dataset)(steps, step, split)

    def train_transform(self, crop_size):
        """RandomResizedCrop(crop, scale 0.5-2, ratio 3/4-4/3) + flip (MiB dataset/transform.py)."""
        return mib_train_transform(crop_size)

    def eval_transform(self, crop_size, crop_val):
        """Resize the shorter side + centre crop with ``crop_val`` (the references always crop: MiB
        run.py::get_dataset)."""
        return eval_transform(crop_size, crop_val)

    # ---- validation -----------------------------------------------------------------------------------
    def validation_due(self, iteration, iterations_per_epoch, total_iterations, val_interval):
        """After every epoch (the references validate every epoch for their logs, MiB run.py::main);
        ``--val_interval N``: every N epochs; 0: never."""
        return epoch_due(iteration, iterations_per_epoch, 1 if val_interval is None else val_interval)

    # ---- evaluation -----------------------------------------------------------------------------------
    def upsampled(self, logits, labels):
        """``logits`` (B, C, h, w) as float32 at the labels' (H, W) size, bilinear (MiB train.py::Trainer.train)."""
        return losses.upsample(logits.float(), labels.shape[-2:])

    def eval_convention(self):
        """MiB/PLOP/RCIL's StreamSegMetrics (MiB metrics/stream_metrics.py::StreamSegMetrics): background counted
        in "old", classes absent from the test ground truth excluded from the means; on ADE class 0 ignored (MiB,
        150 classes) or scored (PLOP/RCIL, 151 classes); future classes ignored (MiB) or background (PLOP/RCIL) at
        intermediate steps."""
        protocol = self.protocol()
        if is_domain_incremental(self.dataset):
            # PLOP run.py::main: StreamSegMetrics over the 19 classes on the seen domains' test images; every class
            # is "old" (step 0's), none "new", no background
            return {"background_in_old": False, "exclude_absent": True, "domain_incremental": True,
                    "labels": protocol}
        mib = protocol == MIB_PROTOCOL
        convention = {"background_in_old": True, "exclude_absent": True,
                      "future_classes": "ignored" if mib else "background", "labels": protocol}
        if self.dataset == "ade":
            convention["ade_class0"] = "ignored" if mib else "scored"
        return convention
