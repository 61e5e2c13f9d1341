"""DKD and DKD-M: decomposed knowledge distillation, with an optional exemplar memory (DKD models/loss.py,
train_voc.py, utils/memory.py::memory_sampling_balanced). This module holds DKD's label policy, its reference
hyper-parameters and the method class :class:`DKD` (``--method dkd``; ``--mem_size N`` makes it DKD-M); its loss
terms and prediction rule are in ``methods/dkd_losses.py``.

The method (:class:`DKD`):

* model ``dkd`` (:func:`network.dkd.build_dkd_model`); at t > 0 the new classifier copies the auxiliary one
  (:func:`network.dkd.init_novel_classifier`, only when ``--w_ac`` > 0, as DKD); teacher = step t−1 model;
* t > 0: every BN on running statistics with its affine parameters out of the optimizer, dropout off;
* parameter groups (DKD train_voc.py): backbone at ``--lr``, ASPP + ``last_conv`` and the classifiers at
  ``head_lr_factor`` × ``--lr``; step 0: ``--weight_decay`` everywhere; t > 0: weight decay 0 except on the new
  classifier; poly without a floor (ADE: a 20 % linear warm-up, not rounded, with ``--lr_policy warm_poly``);
* labels (DKD data_loader/dataset.py, :func:`dkd_lut`), prediction (:func:`dkd_predict`), evaluation on the
  images with a seen class, classes without ground truth counted as 0, hIoU (DKD utils/metric.py::Evaluator);
* DKD-M (DKD utils/memory.py::memory_sampling_balanced): before step t ≥ 1 the memory is chosen from the
  step t−1 training images (classes of a randomly augmented, masked crop; at t > 1 teacher pseudo-labels
  ≥ ``mem_pseudo_thresh`` on background first) and the previous memory, with :class:`methods.memory.Memory`
  (SSUL-M's class-balanced selection); it joins the training set with labels masked like the current data, and
  is kept in the method state and ``memory.json``.
"""
import logging
from dataclasses import dataclass

import numpy as np
import torch

from datasets.incremental import IGNORE, LUT_SIZE, channel_order
from datasets.transforms import mib_train_transform
from methods.base import Deviation, MemoryUse, Method, Published, epoch_due, hyper, per_dataset
from methods.dkd_losses import (BACKGROUND, MEMORY_PSEUDO_THRESHOLD, W_AC, W_DKD_NEG, W_DKD_POS, W_KD, W_MBCE,
                                dkd_loss_terms, dkd_memory_pseudo_labels, dkd_predict)
from methods.memory import Memory, collect_candidates
from network.dkd import init_novel_classifier

log = logging.getLogger("ciss")

# mBCE pos_weight (DKD scripts/voc/overlapped/*.sh, configs/config_{voc,ade}.json): VOC 2 at step 0 (scripts'
# --pos_weight 2) and 1 after (config); ADE 35 at every step (config, never overridden)
POS_WEIGHT_VOC_BASE = 2.0
POS_WEIGHT_VOC_INCREMENTAL = 1.0
POS_WEIGHT_ADE = 35.0
POS_WEIGHTS = {"voc": (POS_WEIGHT_VOC_BASE, POS_WEIGHT_VOC_INCREMENTAL), "ade": (POS_WEIGHT_ADE, POS_WEIGHT_ADE)}

# Optimisation (DKD train_voc.py, configs/config_{voc,ade}.json): SGD, Nesterov momentum 0.9; backbone lr
# (step 0, steps ≥ 1); ASPP + last_conv and every classifier (aux included) at HEAD_LR_FACTOR × the backbone lr
BACKBONE_LR = {"voc": (1e-3, 1e-4), "ade": (2.5e-3, 2.5e-4)}
HEAD_LR_FACTOR = 10.0
MOMENTUM = 0.9
NESTEROV = True
# weight decay: step 0 WEIGHT_DECAY on every group; steps ≥ 1 only the new classifier keeps WEIGHT_DECAY,
# backbone, ASPP and old classifiers (aux included) get INCREMENTAL_WEIGHT_DECAY; BN parameters are left out
# of the optimizer at steps ≥ 1 (DKD train_voc.py, ``--freeze_bn``)
WEIGHT_DECAY = 1e-4
INCREMENTAL_WEIGHT_DECAY = 0.0
EPOCHS = {"voc": 60, "ade": 100}
# schedule: poly (power 0.9) per iteration; ADE adds a linear warm-up from WARMUP_START_FACTOR over the first
# WARMUP_FRACTION · I iterations (DKD's WarmupPolyLR: 0.2 · I is not rounded, and there is no lr floor)
POLY_POWER = 0.9
WARMUP_FRACTION = {"voc": 0.0, "ade": 0.2}
WARMUP_START_FACTOR = 0.001

# DKD-M (DKD utils/memory.py::memory_sampling_balanced): memory images in total (not per class)
MEMORY_SIZE = {"voc": 100, "ade": 300}

TRAIN_MASKING_VALUE = BACKGROUND
EVAL_MASKING_VALUE = {"voc": BACKGROUND, "ade": IGNORE}


#: DKD's runs (DKD configs/config_{voc,ade}.json, scripts/{voc,ade}/overlapped/*.sh): 4 GPUs, torch AMP, seed 1,
#: crop 512; VOC 4 x batch 8, 60 epochs, poly; ADE 4 x 6, 100 epochs, a 20% warm-up (``--lr_policy warm_poly``).
DKD_PUBLISHED = {
    "voc": Published("DKD configs/config_voc.json, scripts/voc/overlapped/*.sh (4 GPUs x batch 8, backbone lr 1e-3"
                     " then 1e-4, 60 epochs, AMP)",
                     train_epoch=(EPOCHS["voc"],) * 2, global_batch=(32, 32), lr=BACKBONE_LR["voc"], gpus=(4, 4),
                     random_seed=1, amp=True),
    "ade": Published("DKD configs/config_ade.json, scripts/ade/overlapped/*.sh (4 GPUs x batch 6, backbone lr"
                     " 2.5e-3 then 2.5e-4, 100 epochs, 20% warm-up, AMP)",
                     train_epoch=(EPOCHS["ade"],) * 2, global_batch=(24, 24), lr=BACKBONE_LR["ade"], gpus=(4, 4),
                     lr_policy="warm_poly", random_seed=1, amp=True),
}


def default_pos_weight(dataset, step):
    """The reference mBCE pos_weight for ``dataset`` ("voc" or "ade") at ``step`` (DKD configs/config_{voc,ade}.json;
    VOC's step 0: scripts/voc/overlapped/*.sh)."""
    base, incremental = per_dataset(POS_WEIGHTS, dataset)
    return base if step == 0 else incremental


def backbone_lr(dataset, step):
    """The reference backbone learning rate for ``dataset`` at ``step``; heads use ``HEAD_LR_FACTOR`` × it
    (DKD scripts/{voc,ade}/overlapped/*.sh, configs/config_{voc,ade}.json)."""
    base, incremental = per_dataset(BACKBONE_LR, dataset)
    return base if step == 0 else incremental


def dkd_lut(steps, step, split, dataset):
    """DKD's label table (DKD data_loader/dataset.py::*Incremental.transform_target_masking with the configs'
    ``masking_value``): a 256-entry uint8 table from raw label values to channel positions.

    * train (and memory: DKD-M's memory labels are masked like the current data, DKD
      data_loader/data_loaders.py::get_memory): the step's classes → their channel; background, old and future
      classes → 0; void 255 stays 255 (it is a negative in the mBCE, never ignored: DKD models/loss.py::WBCELoss);
    * val: the step's classes → their channel, background → 0, old and future classes → 0 on VOC, 255 on ADE;
    * test: every seen class (steps 0..t) → its channel, background → 0 (ADE 0 is scored), future classes → 0
      on VOC, 255 on ADE.

    Channel positions equal DKD's raw ids for natural class orders (no re-indexing in DKD).
    """
    order = channel_order(steps)
    if split == "test":
        kept, fill = [c for s in steps[:step + 1] for c in s], per_dataset(EVAL_MASKING_VALUE, dataset)
    elif split == "val":
        kept, fill = list(steps[step]), per_dataset(EVAL_MASKING_VALUE, dataset)
    else:
        kept, fill = list(steps[step]), TRAIN_MASKING_VALUE
    lut = np.full(LUT_SIZE, fill, dtype=np.uint8)
    lut[BACKGROUND] = BACKGROUND
    lut[kept] = order[kept]
    lut[IGNORE] = IGNORE
    return lut


@dataclass
class DKDHyper:
    w_mbce: float = hyper(W_MBCE, "weight of the mBCE on the current classes", low=0.0)
    w_kd: float = hyper(W_KD, "t>0: weight of the KD on the old classes' sigmoid outputs", low=0.0)
    w_dkd_pos: float = hyper(W_DKD_POS, "t>0: weight of the decomposed KD on the positive logit parts", low=0.0)
    w_dkd_neg: float = hyper(W_DKD_NEG, "t>0: weight of the decomposed KD on the negative logit parts", low=0.0)
    w_ac: float = hyper(W_AC, "weight of the auxiliary-classifier loss; 0 also leaves the new classifiers randomly"
                              " initialised instead of copying the auxiliary one (as DKD)", low=0.0)
    pos_weight_base: float = hyper(POS_WEIGHT_VOC_BASE, "step 0: mBCE pos_weight (DKD's --pos_weight at step 0)",
                                   low=0.0)
    pos_weight: float = hyper(POS_WEIGHT_VOC_INCREMENTAL, "t>0: mBCE pos_weight (DKD's config value)", low=0.0)
    head_lr_factor: float = hyper(HEAD_LR_FACTOR, "ASPP, last_conv and every classifier train at this x --lr"
                                                  " (--lr: the backbone's)", positive=True)
    mem_size: int = hyper(0, "DKD-M: memory images in total, chosen before every step t>0 (0: DKD; published:"
                             " 100 on VOC, 300 on ADE)", low=0)
    mem_pseudo_thresh: float = hyper(MEMORY_PSEUDO_THRESHOLD, "DKD-M at t>1: background pixels of a memory"
                                                              " candidate take the teacher's class when its"
                                                              " sigmoid reaches this", low=0.0, high=1.0)
    memory_from_trained_model: bool = hyper(False, "DKD-M at t>1: pseudo-label the memory candidates with the trained"
                                                   " step t-1 model (DKD used it before loading its weights;"
                                                   " --clean: on)")
    reference_lists: bool = hyper(True, "ADE 100-50: train step 0 on all 20,210 images, as DKD's list"
                                        " data/ade/overlap_100-50_train_00.npy (the overlap filter keeps 20,192;"
                                        " --clean: off)")


def memory_key(step):
    """The key of step ``step``'s memory in ``memory.json`` and in the method state (DKD's ``step_{t}``)."""
    return f"step_{step}"


class DKD(Method):
    """DKD / DKD-M (DKD train_voc.py, utils/memory.py::memory_sampling_balanced; see the module docstring)."""

    name = "dkd"
    domain_refusal = ("it models background and unknown classes, and cityscapes_domain has neither: its 19 classes are"
                      " labelled at every step and no step adds a class")
    Hyper = DKDHyper
    model_families = ("dkd",)
    deviations = (
        Deviation("memory_from_trained_model", True,
                  "DKD-M pseudo-labels its memory candidates at t > 1 with an old model whose weights are not loaded"
                  " yet (DKD train_voc.py::main_worker chooses the memory first): ImageNet backbone, random"
                  " classifiers",
                  "the candidates' pseudo-labels are noise; the memory is not what the method describes"),
        Deviation("reference_lists", False,
                  "DKD's ADE 100-50 step-0 list (data/ade/overlap_100-50_train_00.npy) holds all 20,210 images, 18"
                  " of them without a class of step 0 (its 100-10 and 100-5 lists, same classes, hold 20,192)",
                  "the overlap filter the other tasks use would keep 20,192"),
    )
    test_split = "test_seen"  # validation images containing a seen class (DKD data_loader/dataset.py)

    def __init__(self, hyper=None, dataset="voc"):
        super().__init__(hyper, dataset)
        self.step = None  # the step being trained (whose memory the trainer reads)
        self.memories = {}  # memory_key(t) -> Memory.state_dict() of every DKD-M step so far

    @classmethod
    def default_hyper(cls, dataset):
        """DKD's values for ``dataset``: pos_weight 2 at step 0 and 1 after on VOC, 35 at every step on ADE."""
        base, incremental = per_dataset(POS_WEIGHTS, dataset)
        return cls.Hyper(pos_weight_base=base, pos_weight=incremental)

    def published(self):
        return DKD_PUBLISHED.get(self.dataset)

    # ---- model ----------------------------------------------------------------------------------------
    def prepare_student(self, model, previous, ctx):
        """New classifier ← auxiliary classifier (DKD train_voc.py calls ``init_novel_classifier``), only when
        ``w_ac`` > 0 as in DKD's train scripts."""
        if self.hp.w_ac > 0:  # quirk (DKD train_voc.py: ``hyperparameter.ac > 0``): otherwise PyTorch's default init
            init_novel_classifier(model)

    def bn_frozen(self, ctx):
        """t > 0: every BN on running statistics, its affine parameters out of the optimizer (``--freeze_bn``)."""
        return ctx.step > 0

    def set_train_mode(self, model, ctx):
        """Training mode; at t > 0 every BN and every dropout in eval mode (DKD's ``freeze_bn``, ``freeze_dropout``)."""
        super().set_train_mode(model, ctx)
        if ctx.step > 0:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.eval()

    def param_groups(self, model, ctx, lr):
        """DKD's groups (DKD train_voc.py): backbone at ``lr``; ASPP with ``last_conv`` and the
        classifiers (aux included) at ``head_lr_factor`` · lr. Step 0: three groups, every one with the trainer's
        ``--weight_decay``. t > 0: backbone, ASPP and the old classifiers (aux included) with weight decay 0, the
        new classifier with ``--weight_decay``. Frozen parameters (BN at t > 0) are left out."""
        head = model.classifier
        head_lr = lr * self.hp.head_lr_factor

        def params(*modules):
            return [p for m in modules for p in m.parameters() if p.requires_grad]

        if ctx.step == 0:
            return [{"params": params(model.backbone), "lr": lr},
                    {"params": params(head.aspp, head.last_conv), "lr": head_lr},
                    {"params": params(head.cls), "lr": head_lr}]
        return [{"params": params(model.backbone), "lr": lr, "weight_decay": INCREMENTAL_WEIGHT_DECAY},
                {"params": params(head.aspp, head.last_conv), "lr": head_lr,
                 "weight_decay": INCREMENTAL_WEIGHT_DECAY},
                {"params": params(*head.cls[:-1]), "lr": head_lr, "weight_decay": INCREMENTAL_WEIGHT_DECAY},
                {"params": params(head.cls[-1]), "lr": head_lr}]

    def schedule_options(self, ctx):
        """DKD's PolyLR has no floor; on ADE its ``WarmupPolyLR`` warms up over 0.2·I iterations, not rounded
        (DKD utils/lr_scheduler.py), with ``--lr_policy warm_poly``."""
        options = {"min_lr": 0.0}
        if per_dataset(WARMUP_FRACTION, self.dataset) > 0:
            options.update(warmup=per_dataset(WARMUP_FRACTION, self.dataset), round_warmup=False)
        return options

    # ---- data -----------------------------------------------------------------------------------------
    def label_policy(self, steps, step, split):
        """DKD's label table for this dataset (:func:`dkd_lut`)."""
        return dkd_lut(steps, step, split, self.dataset)

    def train_transform(self, crop_size):
        """RandomResizedCrop(crop, scale 0.5-2, ratio 3/4-4/3) + flip, as MiB's
        (DKD data_loader/dataset.py::transform_tr)."""
        return mib_train_transform(crop_size)

    def memory(self, ctx):
        """DKD-M: the step's memory joins the training set (``ConcatDataset``), its labels masked like the current
        data (DKD data_loader/data_loaders.py::get_memory); None for DKD and at step 0."""
        if not self.hp.mem_size or self.step is None:
            return None
        ids = self.memories.get(memory_key(self.step), {}).get("memory_list", [])
        return MemoryUse(tuple(ids), mode="concat", label_split="train") if ids else None

    def before_step(self, model, teacher, data, ctx):
        """DKD-M's memory selection before step t ≥ 1 (DKD utils/memory.py::memory_sampling_balanced).

        Candidates: the previous memory's records (t > 1), then one record per image of step t−1's training
        list, with the classes of its masked step t−1 label on a randomly augmented crop (the training
        transform); at t > 1 background pixels first take the teacher's class where its sigmoid reaches
        ``mem_pseudo_thresh`` (:func:`dkd_memory_pseudo_labels`). Selection: :meth:`methods.memory.Memory.select`
        over the old classes 1..K_old−1 with the step's seed (stops early when the candidates run out, where DKD
        loops forever: docs/differences.md). Every process computes it; rank 0's result is used."""
        self.step = ctx.step
        if ctx.step == 0 or not self.hp.mem_size:
            return
        previous = self.memories.get(memory_key(ctx.step - 1), {}).get("memory_candidates", [])
        labeller = teacher
        if ctx.step > 1 and not self.hp.memory_from_trained_model:
            # quirk (DKD train_voc.py::main_worker): the memory is chosen before the old model receives its
            # weights: a fresh step t-1 network (ImageNet backbone, random classifiers) pseudo-labels the candidates
            labeller = data.fresh_model(ctx.classes_per_step[:-1])

        def pseudo_labelled(batch):
            with torch.no_grad():
                logits, _ = labeller(batch.images)  # fp32, as DKD's memory pass (no autocast there)
            return dkd_memory_pseudo_labels(logits, batch.labels, self.hp.mem_pseudo_thresh)

        relabel = pseudo_labelled if ctx.step > 1 else None
        batches = data.batches(data.previous_samples(), split="train", step=ctx.step - 1, transform="train")
        candidates = list(previous) + collect_candidates(batches, relabel=relabel)
        memory = Memory.select(candidates, range(1, ctx.num_old), self.hp.mem_size, data.seed)
        self.memories[memory_key(ctx.step)] = data.broadcast(memory.state_dict())
        if len(memory.ids) < self.hp.mem_size:
            log.warning("DKD-M step %d: only %d memory images (--mem_size %d): the %d candidates ran out of old"
                        " classes", ctx.step, len(memory.ids), self.hp.mem_size, len(candidates))
        else:
            log.info("DKD-M step %d: %d memory images chosen from %d candidates", ctx.step, len(memory.ids),
                     len(candidates))

    # ---- per batch ------------------------------------------------------------------------------------
    def loss(self, outputs, teacher_outputs, batch, ctx):
        """:func:`dkd_loss_terms` with the step's pos_weight: step 0 ``mbce``, ``ac``; t > 0 also ``kd``,
        ``dkd_pos``, ``dkd_neg``."""
        logits, features = outputs
        hp = self.hp
        weights = dict(w_mbce=hp.w_mbce, w_kd=hp.w_kd, w_dkd_pos=hp.w_dkd_pos, w_dkd_neg=hp.w_dkd_neg, w_ac=hp.w_ac)
        if ctx.step == 0:
            return dkd_loss_terms(logits, features, batch.labels, 1, pos_weight=hp.pos_weight_base, **weights)
        logits_old, features_old = teacher_outputs
        return dkd_loss_terms(logits, features, batch.labels, ctx.num_old, logits_old, features_old,
                              pos_weight=hp.pos_weight, **weights)

    # ---- validation -----------------------------------------------------------------------------------
    def validation_due(self, iteration, iterations_per_epoch, total_iterations, val_interval):
        """After every epoch, for the logs: DKD's configs set ``validation_period`` -1 and its trainer validates
        when ``epoch % validation_period == 0``, true for every epoch (DKD trainer/trainer_voc.py::
        Trainer_base._train_epoch); ``monitor`` off: it never selects. ``--val_interval N``: every N epochs."""
        return epoch_due(iteration, iterations_per_epoch, 1 if val_interval is None else val_interval)

    def trains_on_every_image(self, ctx):
        """ADE 100-50, step 0: DKD's list holds every training image (``reference_lists``)."""
        return self.hp.reference_lists and ctx.dataset == "ade" and ctx.task == "100-50" and ctx.step == 0

    # ---- prediction and evaluation --------------------------------------------------------------------
    def predict(self, logits, size):
        """DKD's rule (:func:`dkd_predict`): upsampled logits, σ, the best non-aux class where one exceeds 0.5."""
        return dkd_predict(logits, size)

    def eval_convention(self):
        """DKD's Evaluator (DKD utils/metric.py::Evaluator): background counted in "old", every seen class
        averaged (a class without ground truth counts as 0), hIoU reported; future classes background on VOC,
        ignored on ADE; ADE 0 scored."""
        convention = {"background_in_old": True, "exclude_absent": False,
                      "future_classes": "background" if per_dataset(EVAL_MASKING_VALUE, self.dataset) == BACKGROUND else "ignored"}
        if self.dataset == "ade":
            convention["ade_class0"] = "scored"
        return convention

    def step_files(self):
        """DKD-M: ``memory.json`` = every step's memory so far (``{"step_t": {"memory_list", "memory_candidates"}}``,
        DKD's file)."""
        if memory_key(self.step) not in self.memories:
            return {}
        return {"memory.json": {key: value for key, value in self.memories.items()}}

    # ---- state ----------------------------------------------------------------------------------------
    def state_dict(self):
        return {"step": self.step, "memories": {k: dict(v) for k, v in self.memories.items()}}

    def load_state_dict(self, state):
        self.step = state.get("step")
        self.memories = {k: dict(v) for k, v in state.get("memories", {}).items()}

    def load_previous_state(self, state, ctx):
        """Step t−1's memories (DKD-M's candidates of step t start with step t−1's memory)."""
        self.load_state_dict(state)
        self.step = ctx.step
