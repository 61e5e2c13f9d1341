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

The numerics are plain functions of tensors in ``methods/ssul_losses.py``; :class:`SSUL` assembles them
as a method of the trainer.
"""
import functools
import logging
import os
from dataclasses import dataclass

from datasets import SALIENCY_DIR, saliency_path
from methods import losses, memory
from methods.barm import barm_lut
from methods.base import Deviation, MemoryUse, Method, Published, hyper, module_params
from methods.ssul_losses import (SALIENCY, SSUL_BG_LR_FACTOR, SSUL_PSEUDO_THRESH, fg_index, memory_candidates,
                                 ssul_loss, ssul_predict, trainable_heads, training_labels, transfer_unknown_head)
from network import build_model
from utils.errors import UserError

log = logging.getLogger("ciss")

# learning rates (SSUL main.py::main)
SSUL_BACKBONE_LR0 = 0.001  # step 0, and t > 0 without --freeze: backbone (hard-coded in SSUL)
SSUL_CLASSIFIER_LR0 = 0.01  # step 0, and t > 0 without --freeze: classifier (hard-coded in SSUL)

# validation cadence (SSUL main.py::main): every max(100, total_itrs // 100) iterations
SSUL_VAL_INTERVAL_MIN = 100
SSUL_VAL_INTERVAL_DIVISOR = 100


#: SSUL's published runs (SSUL README: VOC batch 32, lr 0.01, poly, 50 epochs; ADE batch 24, lr 0.05, warm_poly,
#: 100 epochs; --gpu_id 0,1: one process, DataParallel over 2 GPUs; --crop_val, --amp, seed 1). SSUL-M adds a
#: memory of 100 (VOC) or 300 (ADE) images (``methods.memory.SSUL_MEMORY_VOC``, ``SSUL_MEMORY_ADE``).
SSUL_PUBLISHED = {
    "voc": Published("SSUL README, VOC (batch 32, lr 0.01, poly, 50 epochs, DataParallel on 2 GPUs)",
                     train_epoch=(50, 50), global_batch=(32, 32), lr=(0.01, 0.01), gpus=(2, 2), crop_size=513,
                     random_seed=1, amp=True, bn_chunks=(2, 2)),
    "ade": Published("SSUL README, ADE (batch 24, lr 0.05, warm_poly, 100 epochs, DataParallel on 2 GPUs)",
                     train_epoch=(100, 100), global_batch=(24, 24), lr=(0.05, 0.05), gpus=(2, 2), crop_size=513,
                     lr_policy="warm_poly", random_seed=1, amp=True, bn_chunks=(2, 2)),
}


def validation_interval(total_iterations):
    """SSUL's validation cadence (SSUL main.py::main): ``max(100, total_iterations // 100)`` iterations."""
    return max(SSUL_VAL_INTERVAL_MIN, int(total_iterations) // SSUL_VAL_INTERVAL_DIVISOR)


def total_iterations(epochs, n_images, batch_size):
    """SSUL's ``total_itrs = epochs × ⌊N / batch⌋`` (SSUL main.py::main; the train loader drops the last
    batch)."""
    return int(epochs) * (int(n_images) // int(batch_size))


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
    memory_labels_unshifted: bool = hyper(True, "SSUL's off-by-one: SSUL-M's memory labels are not shifted for the"
                                                " unknown class (SSUL datasets/voc.py::__init__; --clean: shifted)")
    backbone_lr0: float = hyper(SSUL_BACKBONE_LR0, "step 0 (and t>0 without freezing): backbone learning rate",
                                positive=True)
    classifier_lr0: float = hyper(SSUL_CLASSIFIER_LR0, "step 0 (and t>0 without freezing): classifier learning"
                                                       " rate", positive=True)
    bg_lr_factor: float = hyper(SSUL_BG_LR_FACTOR, "t>0 with freezing and the unknown class: background head"
                                                   " learning rate = --lr x this", low=0.0)


class SSUL(Method):
    """SSUL (``--mem_size 0``) and SSUL-M (``--mem_size N``), SSUL main.py::main."""
    name = "ssul"
    domain_refusal = ("it models background and unknown classes, and cityscapes_domain has neither: its 19 classes are"
                      " labelled at every step and no step adds a class")
    Hyper = SSULHyper
    model_families = ("deeplabv3",)
    deviations = (Deviation("memory_labels_unshifted", False,
                            "SSUL-M's memory labels are not shifted for the unknown label (SSUL datasets/voc.py::"
                            "__init__ shifts the train split only): memory class k is learnt as class k - 1, memory"
                            " background as unknown",
                            "an off-by-one in the released code: the memory teaches wrong classes"),)

    def __init__(self, hyper=None, dataset="voc"):
        super().__init__(hyper, dataset)
        self.selected = None  # this step's memory (SSUL-M), a methods.memory.Memory
        self.memory_step = None
        self.previous_memory = None  # step t-1's memory: the head of step t's candidate list
        self._previous = None  # the step t-1 model when the memory pass needs it and no teacher exists

    def published(self):
        return SSUL_PUBLISHED.get(self.dataset)

    # ---- model ----------------------------------------------------------------------------------------
    def build_network(self, spec, classes_per_step, pretrained=None, layout_step=None):
        """SSUL's head, with the unknown channel under ``--unknown`` (SSUL network/_deeplab.py::DeepLabHead)."""
        return build_model(spec.name, classes_per_step, backbone=spec.backbone, output_stride=spec.output_stride,
                           pretrained=pretrained, unknown=self.hp.unknown)

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

    def label_policy(self, steps, step, split):
        """SSUL's label table (:func:`methods.barm.barm_lut`, which BARM kept from SSUL)."""
        return barm_lut(steps, step, split)

    def memory(self, ctx):
        """SSUL-M: the step's memory replaces half of every batch, its labels through the "memory" split
        (current and previous classes kept; SSUL datasets/voc.py::__init__)."""
        return MemoryUse(tuple(self.selected.ids)) if self.selected is not None else None

    # ---- before the step: SSUL-M's memory -------------------------------------------------------------
    def before_step(self, model, teacher, data, ctx):
        """SSUL-M at t > 0 (SSUL utils/memory.py::memory_sampling_balanced): candidates from step t−1's
        training list (see :func:`memory_candidates`; the previous memory's records first at t > 1), then
        :meth:`methods.memory.Memory.select` with the step's seed; rank 0's result on every process."""
        self.selected, self.memory_step = None, None
        previous, self._previous = self._previous, None
        if self.hp.mem_size <= 0 or ctx.step == 0:
            return
        scorer = None
        if ctx.step > 1:
            scorer = teacher if teacher is not None else previous.eval().requires_grad_(False).to(data.device)
        head = list(self.previous_memory.candidates) if ctx.step > 1 and self.previous_memory is not None else []
        batches = data.batches(data.previous_samples(), split="train", step=ctx.step - 1, transform="eval")
        records = head + memory_candidates(batches, scorer, self.hp.unknown, self.hp.loss_type)
        chosen = memory.Memory.select(records, range(1, ctx.num_old), self.hp.mem_size, data.seed)
        chosen = memory.Memory.from_state(data.broadcast(chosen.state_dict()))
        if len(chosen.ids) < self.hp.mem_size:
            log.warning("SSUL-M: only %d of %d memory images found among %d candidates (no other candidate holds an"
                        " old class)", len(chosen.ids), self.hp.mem_size, len(records))
        log.info("SSUL-M memory of step %d: %d images from %d candidates", ctx.step, len(chosen.ids), len(records))
        self.selected, self.memory_step = chosen, ctx.step

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
        if self.selected is None:
            return {}
        return {"memory.json": {"step": self.memory_step, **self.selected.state_dict()}}

    def state_dict(self):
        if self.selected is None:
            return {}
        return {"memory": self.selected.state_dict(), "memory_step": self.memory_step}

    def load_state_dict(self, state):
        self.selected = memory.Memory.from_state(state["memory"]) if state.get("memory") else None
        self.memory_step = state.get("memory_step")

    def load_previous_state(self, state, ctx):
        self.previous_memory = memory.Memory.from_state(state["memory"]) if state.get("memory") else None
        self.selected, self.memory_step = None, None
