"""SSUL / SSUL-M: semantic segmentation with an unknown label (SSUL main.py::main).

* Model: the ``SSULHead`` (one Sequential(3x3 conv, BN, ReLU, 1x1 conv) entry per step); with ``--unknown``
  the entries have [1 (unknown), 1 (background), n_0 − 1, n_1, …] outputs (SSUL
  network/_deeplab.py::DeepLabHead). Logits stay at feature resolution in ciss; SSUL upsampled them inside its
  model, so every function here that needs them at label resolution upsamples them first (bilinear,
  align_corners False).
* Labels (SSUL datasets/voc.py::__getitem__): ciss labels are channel positions of the concatenated class
  order (0 = background, 255 = ignore). With ``--unknown`` they are shifted by one on the training split
  (channel k+1 = class k) and background pixels become unknown 0 where the saliency map is positive (VOC) or
  everywhere (ADE).
* Step t ≥ 1 with ``--freeze`` (SSUL main.py::main): only the new head, the unknown head (lr) and the background head
  (lr·1e−4) train; ``--w_transfer`` copies the unknown head into the new one; pseudo-labels from the
  previous model (σ, threshold 0.7, on labels ≤ fg_idx); loss ``bce_with_ignore`` over all channels.
* Prediction (SSUL main.py): upsample logits, σ, unknown probability added to the background, argmax.
* Validation every ``max(100, T // 100)`` iterations; each step's result is its best-validated weights
  (SSUL main.py::main).
* SSUL-M memory (``--mem_size N``): :mod:`methods.memory` (SSUL utils/memory.py::memory_sampling_balanced),
  selected before the step with the previous model and kept in the method's state.

The numerics are plain functions of tensors; :class:`SSUL` assembles them as a method of the trainer.
"""
import functools
import logging
import os
from dataclasses import dataclass

import torch

from datasets import SALIENCY_DIR, saliency_path
from methods import losses, memory
from methods.base import Method, freeze, hyper, module_params
from utils.errors import UserError

log = logging.getLogger("ciss")

IGNORE_INDEX = losses.IGNORE_INDEX
# the unknown label (SSUL datasets/voc.py::__getitem__)
UNKNOWN_LABEL = 0  # label / channel of the unknown class with --unknown
SHIFTED_BACKGROUND = 1  # the background's label / channel with --unknown
SALIENCY = "saliency"  # name of the saliency map among a batch's extras (VOC with --unknown)

# pseudo-labels (SSUL main.py::main; THRESH in SSUL run.sh)
SSUL_PSEUDO_THRESH = 0.7  # --pseudo_thresh default and the scripts' THRESH
SSUL_FG_IDX_UNKNOWN = 1  # fg_idx with --unknown: labels ≤ 1 (unknown, background) can be relabelled
SSUL_FG_IDX_PLAIN = 0  # fg_idx without --unknown

# learning rates (SSUL main.py::main)
SSUL_BACKBONE_LR0 = 0.001  # step 0, and t > 0 without --freeze: backbone (hard-coded in SSUL)
SSUL_CLASSIFIER_LR0 = 0.01  # step 0, and t > 0 without --freeze: classifier (hard-coded in SSUL)
SSUL_NEW_LR_FACTOR = 1.0  # t > 0 with --freeze: new head at --lr
SSUL_UNKNOWN_LR_FACTOR = 1.0  # t > 0 with --freeze --unknown: unknown head at --lr
SSUL_BG_LR_FACTOR = 1e-4  # t > 0 with --freeze --unknown: background head at --lr × 1e−4

# validation cadence (SSUL main.py::main): every max(100, total_itrs // 100) iterations
SSUL_VAL_INTERVAL_MIN = 100
SSUL_VAL_INTERVAL_DIVISOR = 100


@dataclass(frozen=True)
class SSULSetting:
    """One published SSUL / SSUL-M recipe (SSUL README)."""
    epochs: int
    batch_size: int
    lr: float
    lr_policy: str
    mem_size: int  # SSUL-M's memory size (SSUL: 0)


# Published settings (SSUL README): VOC (SSUL run.sh uses batch 16) and ADE
SSUL_PUBLISHED = {
    "voc": SSULSetting(epochs=50, batch_size=32, lr=0.01, lr_policy="poly", mem_size=100),
    "ade": SSULSetting(epochs=100, batch_size=24, lr=0.05, lr_policy="warm_poly", mem_size=300),
}


def fg_index(unknown):
    """SSUL's ``fg_idx`` (SSUL main.py::main): 1 with ``--unknown`` (channels 0 unknown, 1 background), else 0."""
    return SSUL_FG_IDX_UNKNOWN if unknown else SSUL_FG_IDX_PLAIN


def validation_interval(total_iterations):
    """SSUL's validation cadence (SSUL main.py::main): ``max(100, total_iterations // 100)`` iterations."""
    return max(SSUL_VAL_INTERVAL_MIN, int(total_iterations) // SSUL_VAL_INTERVAL_DIVISOR)


def total_iterations(epochs, n_images, batch_size):
    """SSUL's ``total_itrs = epochs × ⌊N / batch⌋`` (SSUL main.py::main; the train loader drops the last
    batch)."""
    return int(epochs) * (int(n_images) // int(batch_size))


def unknown_labels(labels, saliency=None):
    """SSUL's unknown relabelling of training labels (SSUL datasets/voc.py::__getitem__,
    datasets/ade.py::__getitem__).

    ``labels``: integer tensor of any shape, typically (B, H, W) or (H, W), with 255 = ignore.
    ``saliency``: same shape (VOC's saliency map after the joint transforms), or ``None`` (ADE)::

        y' = 255        where y = 255
        y' = y + 1      elsewhere          (background 0 → 1, class k → k + 1)
        y' = 0          where y' = 1 and (saliency > 0, or everywhere when saliency is None)

    Returns a tensor of the labels' dtype and shape.
    """
    if saliency is not None and tuple(saliency.shape) != tuple(labels.shape):
        raise UserError(f"saliency map of shape {tuple(saliency.shape)} does not match its label map of shape "
                        f"{tuple(labels.shape)}: expected the same size")
    ignore = labels == IGNORE_INDEX
    shifted = torch.where(ignore, torch.full_like(labels, IGNORE_INDEX), labels + 1)
    unknown = shifted == SHIFTED_BACKGROUND
    if saliency is not None:
        unknown = unknown & (saliency > 0)
    return torch.where(unknown, torch.full_like(shifted, UNKNOWN_LABEL), shifted)


def _entry_layers(entry):
    """(3x3 conv, BN, 1x1 conv) of one ``SSULHead`` entry: Sequential(conv3x3, BN, ReLU, conv1x1)."""
    return entry[0], entry[1], entry[3]


@torch.no_grad()
def transfer_unknown_head(head, step):
    """SSUL's ``--w_transfer`` (SSUL main.py::main): initialise the new head entry from the unknown entry, in place.

    ``head``: an ``SSULHead`` with ``unknown=True`` already grown to step ``step`` ≥ 1, so that its entries are
    [unknown, background, n_0 − 1, n_1, …, n_t] and the new entry is ``head.head[step + 2]`` (the last one).
    The new entry receives the unknown entry's (``head.head[0]``) 3x3 conv weight, BN weight, bias,
    running_mean and running_var, and every output channel c of its 1x1 conv gets the unknown entry's single
    1x1 filter and bias::

        W_new[c] = W_unk[0],  b_new[c] = b_unk[0]   for c = 0 … n_t − 1

    Unlike BARM's ear copy (BARM trainer/trainer.py::Trainer.init_ckpt), the BN running statistics are copied
    too. ``num_batches_tracked`` is not copied (SSUL loaded every key but this one from the old checkpoint; it
    only matters for BN momentum None). All other entries are untouched.
    """
    if not getattr(head, "unknown", False):
        raise ValueError("transfer_unknown_head needs an SSULHead built with unknown=True")
    if step < 1 or len(head.head) != step + 3:
        raise ValueError(f"transfer_unknown_head: step {step} needs an SSULHead with {step + 3} entries "
                         f"(unknown, background, step 0 classes, one per step 1..{step}), got {len(head.head)}")
    conv_u, bn_u, cls_u = _entry_layers(head.head[0])
    conv_n, bn_n, cls_n = _entry_layers(head.head[step + 2])
    conv_n.weight.copy_(conv_u.weight)
    bn_n.weight.copy_(bn_u.weight)
    bn_n.bias.copy_(bn_u.bias)
    bn_n.running_mean.copy_(bn_u.running_mean)
    bn_n.running_var.copy_(bn_u.running_var)
    cls_n.weight.copy_(cls_u.weight.expand_as(cls_n.weight))  # every output channel gets the single filter
    cls_n.bias.copy_(cls_u.bias.expand_as(cls_n.bias))


def trainable_heads(head, step, unknown=True, bg_lr_factor=SSUL_BG_LR_FACTOR):
    """What SSUL trains at step ``step`` ≥ 1 with ``--freeze`` (SSUL main.py::main), as ``[(module, lr factor), …]``.

    Everything not listed (backbone, ASPP, the other head entries, and the whole previous model) is frozen
    (``requires_grad = False``). The learning rate of a group is ``--lr × factor``:

    * ``head.head[-1]`` (new classes): factor 1;
    * with ``unknown``: ``head.head[0]`` (unknown): factor 1, and ``head.head[1]`` (background): factor
      ``bg_lr_factor`` (1e−4).

    The order is SSUL's parameter-group order. ``--bn_freeze`` still puts every BN, including those of these
    entries, on running statistics with frozen affine parameters. Step 0 (and t > 0 without ``--freeze``) is not
    covered: there SSUL trains everything in two groups, backbone ``SSUL_BACKBONE_LR0`` and classifier
    ``SSUL_CLASSIFIER_LR0`` (absolute learning rates, ``--lr`` unused).
    """
    if step < 1:
        raise ValueError(f"trainable_heads describes SSUL's frozen steps t >= 1, got step {step}")
    groups = [(head.head[-1], SSUL_NEW_LR_FACTOR)]
    if unknown:
        groups += [(head.head[0], SSUL_UNKNOWN_LR_FACTOR), (head.head[1], bg_lr_factor)]
    return groups


def ssul_pseudo_labels(old_logits_up, labels, thresh=SSUL_PSEUDO_THRESH, fg_idx=SSUL_FG_IDX_UNKNOWN,
                       loss_type="bce_loss"):
    """SSUL's pseudo-labels (SSUL main.py::main).

    ``old_logits_up``: (B, C_old, H, W) previous-model logits at label resolution (C_old includes the unknown
    channel with ``--unknown``); ``labels``: (B, H, W) in the training label space (shifted with unknown)::

        P' = σ(O')  (softmax for non-BCE losses),  ŷ = argmax_c P'_c,  s = max_c P'_c
        y_ps = ŷ  where y ≤ fg_idx and ŷ > fg_idx and s ≥ thresh,  else y

    255 is never relabelled (255 > fg_idx); with unknown both unknown (0) and background (1) pixels can be.
    """
    scores, predicted = losses.activation(loss_type)(old_logits_up.float()).max(dim=1)
    relabel = (labels <= fg_idx) & (predicted > fg_idx) & (scores >= thresh)
    return torch.where(relabel, predicted.to(labels.dtype), labels)


def ssul_predict(logits, size, unknown=True, loss_type="bce_loss"):
    """SSUL's prediction (SSUL main.py): labels (B, H, W) from logits (B, C, h, w) at feature resolution.

    Logits are upsampled to ``size`` (bilinear, align_corners False) first, as SSUL's model did, then::

        P = σ(O)  (softmax for non-BCE losses)
        with unknown:  P_1 ← P_1 + P_0, drop channel 0     (so class k is channel k again)
        ŷ = argmax_c P_c
    """
    probs = losses.activation(loss_type)(losses.upsample(logits.float(), size))
    if unknown:
        probs = torch.cat([probs[:, 1:2] + probs[:, 0:1], probs[:, 2:]], dim=1)
    return probs.argmax(dim=1)


def ssul_loss(logits, labels, old_logits=None, thresh=SSUL_PSEUDO_THRESH, fg_idx=SSUL_FG_IDX_UNKNOWN,
              loss_type="bce_loss"):
    """SSUL's training loss (SSUL main.py::main): the criterion on upsampled logits, over all channels.

    ``logits``: (B, C, h, w) student logits at feature resolution; ``labels``: (B, H, W); ``old_logits``: the
    previous model's logits at feature resolution (``--pseudo`` at t ≥ 1) or ``None``. Returns ``(terms,
    targets)`` with ``terms = {"total", "std"}`` (no distillation, no auxiliary term)::

        total = std = criterion(up(O), y_ps)     y_ps = ssul_pseudo_labels(up(O'), y)  (or y without old_logits)
    """
    size = labels.shape[-2:]
    targets = labels
    if old_logits is not None:
        with torch.no_grad():
            targets = ssul_pseudo_labels(losses.upsample(old_logits.float(), size), labels, thresh, fg_idx,
                                         loss_type)
    std = losses.CRITERIA[loss_type](losses.upsample(logits.float(), size), targets)
    return {"total": std, "std": std}, targets


def training_labels(labels, saliency=None, is_memory=None, unshifted_memory=False):
    """SSUL's training targets of a batch with ``--unknown`` (SSUL datasets/voc.py::__getitem__, main.py::main),
    before pseudo-labels.

    ``labels``: (B, H, W) ciss label positions (memory samples through the "memory" label split: current and
    previous classes kept); ``saliency``: (B, H, W) or None (ADE); ``is_memory``: (B,) bool, the samples that
    came from SSUL-M's memory, or None::

        y' = unknown_labels(y, saliency)     for every sample (current and memory alike)
        y' = y                               for memory samples when ``unshifted_memory``

    ``unshifted_memory`` reproduces SSUL's off-by-one (SSUL datasets/voc.py::__getitem__): SSUL shifted only
    its ``train`` split, so a memory pixel of class k was supervised on channel k (class k − 1) and memory
    background on the unknown channel. By default memory samples get the same shift and unknown rule as the
    current ones (their saliency map included), which is what the unknown label means (docs/differences.md).
    """
    shifted = unknown_labels(labels, saliency)
    if unshifted_memory and is_memory is not None:
        # quirk (SSUL datasets/voc.py::__getitem__, --memory_labels_unshifted): memory labels stay unshifted,
        # as SSUL's memory split
        shifted = torch.where(is_memory.view(-1, *([1] * (labels.dim() - 1))), labels, shifted)
    return shifted


def memory_candidates(batches, teacher=None, unknown=True, loss_type="bce_loss"):
    """SSUL-M's candidate records (SSUL utils/memory.py::memory_sampling_balanced): ``[[image id, old classes
    present], …]`` in batch order.

    ``batches``: :class:`methods.base.Batch` objects over step t−1's training list (val transform: resize and
    centre crop), labels in ciss positions through step t−1's training split (its classes kept, the rest 0);
    ``teacher``: the step t−1 model (eval mode) at t > 1, None at t = 1. Per image: with ``unknown`` the labels
    are shifted (:func:`unknown_labels`, saliency included); at t > 1 the teacher pseudo-labels them with the
    hard-coded threshold 0.7 (:func:`ssul_pseudo_labels`, fg_idx as in training); the record's classes are
    :func:`methods.memory.image_classes` of the result, in unshifted positions (background, unknown and 255
    removed), through :func:`methods.memory.collect_candidates`. Runs without gradients, in fp32, as SSUL's.
    """
    fg_idx = fg_index(unknown)
    # quirk (SSUL utils/memory.py::memory_sampling_balanced): this pass uses the softmax only for ce_loss (the
    # sigmoid for focal_loss), whereas training uses the sigmoid for bce_loss only
    activation_type = "ce_loss" if loss_type == "ce_loss" else "bce_loss"

    def relabel(batch):
        labels = unknown_labels(batch.labels, batch.extras.get(SALIENCY)) if unknown else batch.labels
        if teacher is None:
            return labels
        logits = teacher(batch.images)[0]
        return ssul_pseudo_labels(losses.upsample(logits.float(), labels.shape[-2:]), labels,
                                  memory.SSUL_MEMORY_PSEUDO_THRESH, fg_idx, activation_type)

    with torch.no_grad():
        return memory.collect_candidates(batches, relabel, shifted=unknown)


# ======================================================================================================
# The method
# ======================================================================================================

@dataclass
class SSULHyper:
    loss_type: str = hyper("bce_loss", "classification loss; also picks sigmoid (bce) or softmax for pseudo-labels"
                           " and prediction", choices=losses.CRITERIA)
    pseudo: bool = hyper(True, "at t>0: pseudo-label unknown/background pixels with the previous model")
    pseudo_thresh: float = hyper(SSUL_PSEUDO_THRESH, "pseudo-label confidence threshold", low=0.0, high=1.0)
    unknown: bool = hyper(True, "unknown class: labels shifted by one, salient (VOC) or all (ADE) background"
                                " pixels of the training split labelled unknown")
    freeze: bool = hyper(True, "at t>0: train only the new head (and the unknown and background heads)")
    w_transfer: bool = hyper(True, "at t>0 with the unknown class: the new head starts as a copy of the unknown"
                                   " head")
    bn_freeze: bool = hyper(True, "at t>0: every BatchNorm on running statistics with frozen affine parameters")
    mem_size: int = hyper(0, "SSUL-M: images in the class-balanced exemplar memory (0: SSUL)", low=0)
    memory_labels_unshifted: bool = hyper(False, "SSUL's off-by-one: memory labels not shifted for the unknown"
                                                 " class (reference behaviour)")
    backbone_lr0: float = hyper(SSUL_BACKBONE_LR0, "step 0 (and t>0 without freezing): backbone learning rate",
                                positive=True)
    classifier_lr0: float = hyper(SSUL_CLASSIFIER_LR0, "step 0 (and t>0 without freezing): classifier learning"
                                                       " rate", positive=True)
    bg_lr_factor: float = hyper(SSUL_BG_LR_FACTOR, "t>0 with freezing and the unknown class: background head"
                                                   " learning rate = --lr x this", low=0.0)


class SSUL(Method):
    """SSUL (``--mem_size 0``) and SSUL-M (``--mem_size N``), SSUL main.py::main."""
    name = "ssul"
    Hyper = SSULHyper
    model_family = "deeplabv3"
    compatible_families = ("deeplabv3",)
    upsample_probabilities = False  # SSUL upsamples logits (inside its model, SSUL network/utils.py), then the sigmoid

    def __init__(self, hyper=None, dataset="voc"):
        super().__init__(hyper, dataset)
        self.memory = None  # this step's memory (SSUL-M), a methods.memory.Memory
        self.memory_step = None
        self.previous_memory = None  # step t-1's memory: the head of step t's candidate list
        self._previous = None  # the step t-1 model when the memory pass needs it and no teacher exists

    # ---- model ----------------------------------------------------------------------------------------
    def network_options(self):
        return {"unknown": self.hp.unknown}

    def fg_idx(self):
        return fg_index(self.hp.unknown)

    def needs_teacher(self, ctx):
        return ctx.step > 0 and self.hp.pseudo

    def bn_frozen(self, ctx):
        return ctx.step > 0 and self.hp.bn_freeze

    def prepare_student(self, model, previous, ctx):
        """``--w_transfer`` (with ``--unknown``): the new head copies the unknown head (SSUL main.py::main)."""
        if self.hp.unknown and self.hp.w_transfer:
            transfer_unknown_head(model.classifier, ctx.step)
        # SSUL-M at t > 1 pseudo-labels its candidates with the previous model even without --pseudo
        self._previous = previous if self.hp.mem_size > 0 and ctx.step > 1 and not self.needs_teacher(ctx) else None

    def _frozen_step(self, ctx):
        return ctx.step > 0 and self.hp.freeze

    def configure(self, model, ctx):
        """With ``--freeze`` at t > 0 only the new head (and, with the unknown class, the unknown and the
        background heads) keeps gradients (SSUL main.py::main); ``--bn_freeze`` then freezes every BN's affine
        parameters, those of these heads included."""
        if self._frozen_step(ctx):
            model.requires_grad_(False)
            for module, _ in trainable_heads(model.classifier, ctx.step, self.hp.unknown):
                module.requires_grad_(True)
        super().configure(model, ctx)

    def param_groups(self, model, ctx, lr):
        """t > 0 with ``--freeze``: [new head at lr, unknown head at lr, background head at lr·1e−4] (SSUL's
        order); otherwise backbone 0.001 and classifier 0.01 (``--lr`` unused, SSUL main.py::main)."""
        if self._frozen_step(ctx):
            return [{"params": module_params(module), "lr": lr * factor} for module, factor
                    in trainable_heads(model.classifier, ctx.step, self.hp.unknown, self.hp.bg_lr_factor)]
        return [{"params": module_params(model.backbone), "lr": self.hp.backbone_lr0},
                {"params": module_params(model.classifier), "lr": self.hp.classifier_lr0}]

    # ---- data -----------------------------------------------------------------------------------------
    def extra_maps(self, ctx, data_root):
        """VOC with ``--unknown``: the saliency maps ``{data_root}/saliency_map/{id}.png`` (SSUL
        datasets/voc.py::__getitem__); a missing folder stops the run before training."""
        if not (self.hp.unknown and ctx.dataset == "voc"):
            return {}
        folder = os.path.join(data_root, SALIENCY_DIR)
        if not os.path.isdir(folder):
            raise UserError(f"SSUL's unknown label on VOC needs saliency maps in {folder}/ (one 8-bit PNG per"
                            f" image, {SALIENCY_DIR}/<image id>.png, >0 = salient): download the saliency maps"
                            f" SSUL's README links and unpack them there, or run with --no_unknown")
        return {SALIENCY: functools.partial(saliency_path, data_root)}

    def memory_ids(self):
        return list(self.memory.ids) if self.memory is not None else []

    # ---- before the step: SSUL-M's memory -------------------------------------------------------------
    def before_step(self, model, teacher, data, ctx):
        """SSUL-M at t > 0 (SSUL utils/memory.py::memory_sampling_balanced): candidates from step t−1's
        training list (see :func:`memory_candidates`; the previous memory's records first at t > 1), then
        :meth:`methods.memory.Memory.select` with the step's seed; rank 0's result on every process."""
        self.memory, self.memory_step = None, None
        previous, self._previous = self._previous, None
        if self.hp.mem_size <= 0 or ctx.step == 0:
            return
        scorer = None
        if ctx.step > 1:
            scorer = teacher if teacher is not None else freeze(previous).to(data.device)
        head = list(self.previous_memory.candidates) if ctx.step > 1 and self.previous_memory is not None else []
        batches = data.batches(data.previous_samples(), split="train", step=ctx.step - 1, transform="eval")
        records = head + memory_candidates(batches, scorer, self.hp.unknown, self.hp.loss_type)
        chosen = memory.Memory.select(records, range(1, ctx.num_old), self.hp.mem_size, data.seed)
        chosen = memory.Memory.from_state(data.broadcast(chosen.state_dict()))
        if len(chosen.ids) < self.hp.mem_size:
            log.warning("SSUL-M: only %d of %d memory images found among %d candidates (no other candidate holds an"
                        " old class)", len(chosen.ids), self.hp.mem_size, len(records))
        log.info("SSUL-M memory of step %d: %d images from %d candidates", ctx.step, len(chosen.ids), len(records))
        self.memory, self.memory_step = chosen, ctx.step

    # ---- per batch ------------------------------------------------------------------------------------
    def targets(self, batch):
        """The batch's training labels before pseudo-labelling (:func:`training_labels` with ``--unknown``)."""
        if not self.hp.unknown:
            return batch.labels
        return training_labels(batch.labels, batch.extras.get(SALIENCY), batch.memory,
                               self.hp.memory_labels_unshifted)

    def loss(self, outputs, teacher_outputs, batch, ctx):
        """:func:`ssul_loss` on the shifted labels, pseudo-labelled by the teacher at t > 0 with ``--pseudo``."""
        old_logits = teacher_outputs[0] if teacher_outputs is not None else None
        terms, _ = ssul_loss(outputs[0], self.targets(batch), old_logits, self.hp.pseudo_thresh, self.fg_idx(),
                             self.hp.loss_type)
        return terms

    def end_of_step(self, model, ctx):
        self._previous = None

    # ---- validation and checkpoint selection ----------------------------------------------------------
    def validation_due(self, iteration, iterations_per_epoch, total_iterations, val_interval):
        """Every ``max(100, T // 100)`` iterations (SSUL main.py::main); ``--val_interval N``: every N epochs."""
        if val_interval is None:
            return iteration % validation_interval(total_iterations) == 0
        return super().validation_due(iteration, iterations_per_epoch, total_iterations, val_interval)

    def selects_best(self, ctx, select_best):
        """Every step's result is its best-validated weights (SSUL main.py::main) unless ``--select_last``."""
        return True if select_best is None else bool(select_best)

    # ---- prediction -----------------------------------------------------------------------------------
    def predict(self, logits, size):
        return ssul_predict(logits, size, self.hp.unknown, self.hp.loss_type)

    # ---- state ----------------------------------------------------------------------------------------
    def step_files(self):
        """``memory.json`` (SSUL-M): the step's ``memory_list`` and ``memory_candidates`` (SSUL
        utils/memory.py::memory_sampling_balanced)."""
        if self.memory is None:
            return {}
        return {"memory.json": {"step": self.memory_step, **self.memory.state_dict()}}

    def state_dict(self):
        if self.memory is None:
            return {}
        return {"memory": self.memory.state_dict(), "memory_step": self.memory_step}

    def load_state_dict(self, state):
        self.memory = memory.Memory.from_state(state["memory"]) if state.get("memory") else None
        self.memory_step = state.get("memory_step")

    def load_previous_state(self, state, ctx):
        self.previous_memory = memory.Memory.from_state(state["memory"]) if state.get("memory") else None
        self.memory, self.memory_step = None, None
