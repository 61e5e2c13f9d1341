"""BARM: background adaptation with residual modelling (BARM network/_deeplab.py::DeepLabHeadBgA,
trainer/trainer.py::Trainer.train_episode).

* Model: ``deeplabv3bga`` (head_pre, one ear and one head with a background-residual channel per step).
* New step: the new ear copies head_pre's conv weight and BN affine parameters but not its running
  statistics, which stay at mean 0 / var 1 (BARM trainer/trainer.py::Trainer.init_ckpt); the new head keeps
  its random init.
* Step 0: two groups, backbone 0.001 and classifier 0.01 (``--lr`` is not used, BARM
  trainer/trainer.py::Trainer.init_optimizer). Step t > 0: seven groups — new head and new ear at ``--lr``,
  ASPP 1e-3, old heads, old ears, head_pre and backbone 1e-4 (BARM trainer/trainer.py::Trainer.init_optimizer).
* ``--bn_freeze`` at t > 0: every BN on running statistics with frozen affine parameters; ASPP dropout
  stays active (BARM trainer/trainer.py::Trainer.init_models). Ignored at step 0, as in the reference.
* Loss at t > 0 with ``--pseudo``: :func:`barm_loss` (PB-BCE on pseudo-labels + 5·L_tri +
  4·L_fd + 1·L_gkd + 1·L_ce); without ``--pseudo`` (or at step 0) the plain criterion on the labels —
  ``--pseudo`` gates everything, as in the reference (BARM trainer/trainer.py::Trainer.train_episode).
* Prediction: sigmoid (softmax for CE), then bilinear upsampling of the probabilities, then argmax
  (BARM trainer/trainer.py::Trainer.validate).
* Labels: :func:`barm_lut` (SSUL's table, which BARM kept; SSUL uses it too). Validation after every epoch
  when an epoch has more than 100 iterations, else every 5th (BARM trainer/trainer.py::Trainer.train); with
  ``--select_best`` step 0's result is its best-validated weights.

This module holds BARM's loss terms as plain functions of tensors (:func:`barm_loss` and its parts), its
label table and the method :class:`BARM`; KProBA (``methods/kproba.py``) is BARM with another pseudo-label
rule.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from datasets.incremental import IGNORE, LUT_SIZE, channel_order
from methods import losses
from methods.base import Method, Published, hyper, module_params
from utils.schedulers import POLY_MIN_LR, WARMUP_FRACTION

# BARM's loss weights (co_bg, co_tn, co_p, co_oc in BARM trainer/trainer.py::Trainer.train_episode)
BARM_W_TRI = 5.0
BARM_W_FD = 4.0
BARM_W_GKD = 1.0
BARM_W_BGA_CE = 1.0
BARM_PSEUDO_THRESH = 0.7
BGA_CE_EPS = 1e-8  # the reference's denominator epsilon of the background-adaptation CE
# TRI_EPS is added here: BARM trainer/trainer.py::Trainer.train_episode divides by the background-pixel
# count without one (docs/differences.md)
TRI_EPS = 1e-8
# BARM's validation cadence (BARM trainer/trainer.py::Trainer.train): after every epoch when an epoch has more
# than this many iterations, else after every 5th epoch.
BARM_VALIDATION_ITERATIONS = 100
BARM_VALIDATION_PERIOD = 5
# Learning rates hard-coded in BARM (BARM trainer/trainer.py::Trainer.init_optimizer)
BARM_BACKBONE_LR0 = 0.001
BARM_CLASSIFIER_LR0 = 0.01
BARM_ASPP_LR = 1e-3
BARM_OLD_LR = 1e-4


def barm_pseudo_labels(prev_logits_up, labels, thresh=BARM_PSEUDO_THRESH, loss_type="bce_loss"):
    """BARM's pseudo-labels (BARM trainer/trainer.py::Trainer.train_episode): on ground-truth background
    pixels only, the teacher's most confident class replaces 0 when it is a foreground class scoring at least
    ``thresh``."""
    scores, predicted = losses.activation(loss_type)(prev_logits_up.float()).max(dim=1)
    relabel = (labels == 0) & (predicted > 0) & (scores >= thresh)
    return torch.where(relabel, predicted.to(labels.dtype), labels)


def bga_ce_loss(residual, fg_mask):
    """Background-adaptation CE (BARM trainer/trainer.py::Trainer.train_episode): BCE(r, 0) averaged over
    current-foreground pixels."""
    residual = residual.float()
    loss = F.binary_cross_entropy_with_logits(residual, torch.zeros_like(residual), reduction="none")
    return (loss * fg_mask).sum() / (fg_mask.sum() + BGA_CE_EPS)


def tri_bg_loss(residual, bg_mask):
    """Background-adaptation triplet-like term (BARM trainer/trainer.py::Trainer.train_episode): mean over
    background pixels of ``max(0, (σ(r) − 1)² − σ(r)²)``, pushing the residual to be non-negative there."""
    prob = torch.sigmoid(residual.float())
    loss = torch.clamp((prob - 1) ** 2 - prob ** 2, min=0)
    return (loss * bg_mask).sum() / (bg_mask.sum() + TRI_EPS)


def feature_distillation(features, prev_features, bg_mask):
    """Background feature distillation (BARM trainer/trainer.py::Trainer.train_episode): Σ_i MSE(M·f_i, M·f'_i),
    each a mean over all elements (masked zeros included)."""
    total = features[0].new_zeros((), dtype=torch.float32)
    for f, g in zip(features, prev_features):
        total = total + F.mse_loss(f.float() * bg_mask, g.float() * bg_mask)
    return total


def group_kd(heads, prev_heads):
    """Group knowledge distillation (BARM trainer/trainer.py::Trainer.train_episode):
    Σ_i Σ_c mean_{b,x,y} BCE(Z_i[:, c], σ(Z'_i[:, c]))."""
    total = heads[0].new_zeros((), dtype=torch.float32)
    for z, z_prev in zip(heads, prev_heads):
        loss = F.binary_cross_entropy_with_logits(z.float(), torch.sigmoid(z_prev.float()), reduction="none")
        total = total + loss.mean(dim=(0, 2, 3)).sum()
    return total


def barm_loss(logits, features, prev_logits, prev_features, labels, num_new, pseudo_thresh=BARM_PSEUDO_THRESH,
              loss_type="bce_loss", w_tri=BARM_W_TRI, w_fd=BARM_W_FD, w_gkd=BARM_W_GKD, w_bga_ce=BARM_W_BGA_CE,
              pseudo_labels=None):
    """BARM's incremental-step loss with ``--pseudo`` (BARM trainer/trainer.py::Trainer.train_episode).

    ``logits``/``features`` and ``prev_logits``/``prev_features`` are the raw outputs of the student and of
    the teacher at feature resolution (features hold ``prev_heads`` and ``ear_feats``); ``labels`` are at
    image resolution; ``num_new`` is the number of classes of the current step. ``pseudo_labels`` (B, H, W):
    the targets of ``std`` when given (KProBA's rule, KProBA trainer/trainer.py::generate_pseudo_labels: then
    ``pseudo_thresh`` is not used), else BARM's :func:`barm_pseudo_labels` from ``prev_logits``; the masks of
    ``tri_bg``, ``fd`` and ``bga_ce`` always come from ``labels`` (BARM trainer/trainer.py::Trainer.train_episode,
    unchanged in KProBA). Returns ``(terms, pseudo_labels)`` where ``terms`` has ``total``, ``std``, ``tri_bg``,
    ``fd``, ``gkd`` and ``bga_ce``::

        total = std + w_tri·tri_bg + w_fd·fd + w_gkd·gkd + w_bga_ce·bga_ce
    """
    size = labels.shape[-2:]
    logits_up = losses.upsample(logits.float(), size)
    if pseudo_labels is not None:
        if tuple(pseudo_labels.shape) != tuple(labels.shape):
            raise ValueError(f"barm_loss: pseudo_labels of shape {tuple(pseudo_labels.shape)}, expected the labels'"
                             f" shape {tuple(labels.shape)}")
        pseudo = pseudo_labels
    else:
        with torch.no_grad():
            pseudo = barm_pseudo_labels(losses.upsample(prev_logits.float(), size), labels, pseudo_thresh, loss_type)
    n_channels = logits.shape[1]
    # PB-BCE: old foreground classes detached; background and new classes keep their gradient
    adapted = torch.cat([logits_up[:, :1], logits_up[:, 1:n_channels - num_new].detach(),
                         logits_up[:, n_channels - num_new:]], dim=1)
    std = losses.CRITERIA[loss_type](adapted, pseudo)

    feature_size = logits.shape[-2:]
    small = F.interpolate(labels[:, None].float(), size=feature_size, mode="nearest")  # nearest, as the reference
    fg_mask = ((small != 0) & (small != losses.IGNORE_INDEX)).float()
    bg_mask = (small == 0).float()
    residual = features["prev_heads"][-1][:, :1]
    old = len(prev_features["prev_heads"])
    terms = {
        "std": std,
        "tri_bg": tri_bg_loss(residual, bg_mask),
        "fd": feature_distillation(features["ear_feats"][:old], prev_features["ear_feats"], bg_mask),
        "gkd": group_kd(features["prev_heads"][:old], prev_features["prev_heads"]),
        "bga_ce": bga_ce_loss(residual, fg_mask),
    }
    terms["total"] = (terms["std"] + w_tri * terms["tri_bg"] + w_fd * terms["fd"] + w_gkd * terms["gkd"]
                      + w_bga_ce * terms["bga_ce"])
    return terms, pseudo


def barm_lut(steps, step, split):
    """BARM/SSUL label mapping (BARM datasets/voc.py::gt_label_mapping, SSUL datasets/voc.py::__init__).

    train / val: raw values that are not classes of the current step become background 0 (old and future
    classes included), void stays 255; then the channel order. test: the channel order only, so classes of
    later steps keep indices >= the current number of channels and the metric ignores them. memory (SSUL-M's
    memory samples, SSUL datasets/voc.py::__init__): the classes of steps 0..step keep their channel, future classes
    become background 0, void stays 255.
    """
    order = channel_order(steps)
    if split == "test":
        return order
    kept = list(steps[step]) if split != "memory" else [c for s in steps[:step + 1] for c in s]
    lut = np.zeros(LUT_SIZE, dtype=np.uint8)
    lut[kept] = order[kept]
    lut[IGNORE] = IGNORE
    return lut


#: BARM's published runs (BARM README, scripts/run_init.sh, run.sh, runade.sh): step 0 on one GPU, the steps t > 0
#: on two GPUs whose gradients are never synchronised (BARM trainer/trainer.py::Trainer.train calls the model's
#: module: see --sync_gradients), --crop_val, poly, --amp, seed 1.
BARM_PUBLISHED = {
    "voc": Published("BARM README and scripts/run_init.sh (step 0: 1 GPU, batch 16, 50 epochs), scripts/run.sh"
                     " (t > 0: 2 GPUs x batch 8, 20 epochs, --lr 0.001)",
                     train_epoch=(50, 20), global_batch=(16, 16), lr=(0.001, 0.001), gpus=(1, 2), crop_size=513,
                     random_seed=1, amp=True, sync_gradients=(True, False)),
    "ade": Published("BARM README, ADE (step 0: 1 GPU, batch 8, 60 epochs; t > 0: 2 GPUs x batch 4, 100 epochs,"
                     " --lr 0.01) and scripts/runade.sh",
                     train_epoch=(60, 100), global_batch=(8, 8), lr=(0.001, 0.01), gpus=(1, 2), crop_size=513,
                     random_seed=1, amp=True, sync_gradients=(True, False)),
}


@dataclass
class BarmHyper:
    loss_type: str = hyper("bce_loss", "classification loss; also picks sigmoid (bce) or softmax for pseudo-labels"
                           " and prediction", choices=losses.CRITERIA)
    pseudo: bool = hyper(True, "at t>0: pseudo-labels from the previous model and BARM's auxiliary losses (all or"
                               " nothing, as in BARM; every BARM script passes --pseudo)")
    pseudo_thresh: float = hyper(BARM_PSEUDO_THRESH, "pseudo-label confidence threshold", low=0.0, high=1.0)
    bn_freeze: bool = hyper(True, "at t>0: every BatchNorm on running statistics with frozen affine parameters"
                                  " (ignored at step 0, as in BARM; every BARM script passes --bn_freeze)")
    w_tri: float = hyper(BARM_W_TRI, "weight of the background-adaptation triplet-like term L_tri (BARM's co_bg)",
                         low=0.0)
    w_fd: float = hyper(BARM_W_FD, "weight of the background feature distillation L_fd (BARM's co_tn)",
                        low=0.0)
    w_gkd: float = hyper(BARM_W_GKD, "weight of the group knowledge distillation L_gkd (BARM's co_p)", low=0.0)
    w_bga_ce: float = hyper(BARM_W_BGA_CE, "weight of the background-adaptation CE L_ce (BARM's co_oc)",
                            low=0.0)
    backbone_lr0: float = hyper(BARM_BACKBONE_LR0, "step 0: backbone learning rate", positive=True)
    classifier_lr0: float = hyper(BARM_CLASSIFIER_LR0, "step 0: classifier learning rate", positive=True)
    aspp_lr: float = hyper(BARM_ASPP_LR, "t>0: ASPP learning rate", low=0.0)
    old_lr: float = hyper(BARM_OLD_LR, "t>0: learning rate of the old heads, old ears, head_pre and backbone",
                          low=0.0)


class BARM(Method):
    name = "barm"
    domain_refusal = ("it pseudo-labels old classes in the background, and cityscapes_domain has no background: its 19"
                      " classes are labelled at every step and no step adds a class")
    Hyper = BarmHyper
    model_families = ("deeplabv3bga",)

    def published(self):
        return BARM_PUBLISHED.get(self.dataset)

    def needs_teacher(self, ctx):
        return ctx.step > 0 and self.hp.pseudo

    def bn_frozen(self, ctx):
        return ctx.step > 0 and self.hp.bn_freeze

    def prepare_student(self, model, previous, ctx):
        classifier = model.classifier
        ear, pre = classifier.ear[-1], classifier.head_pre
        with torch.no_grad():
            ear[0].weight.copy_(pre[0].weight)
            ear[1].weight.copy_(pre[1].weight)
            ear[1].bias.copy_(pre[1].bias)

    def param_groups(self, model, ctx, lr):
        hp, classifier = self.hp, model.classifier
        if ctx.step == 0:
            return [{"params": module_params(model.backbone), "lr": hp.backbone_lr0},
                    {"params": module_params(classifier), "lr": hp.classifier_lr0}]
        return [
            {"params": module_params(classifier.head[-1]), "lr": lr},
            {"params": module_params(classifier.ear[-1]), "lr": lr},
            {"params": module_params(classifier.aspp), "lr": hp.aspp_lr},
            {"params": module_params(*classifier.head[:-1]), "lr": hp.old_lr},
            {"params": module_params(*classifier.ear[:-1]), "lr": hp.old_lr},
            {"params": module_params(classifier.head_pre), "lr": hp.old_lr},
            {"params": module_params(model.backbone), "lr": hp.old_lr},
        ]

    def schedule_options(self, ctx):
        """BARM's schedules: poly with its 1e-6 floor, warm_poly with a 10% warm-up rounded down (BARM
        utils/scheduler.py)."""
        return {"min_lr": POLY_MIN_LR, "warmup": WARMUP_FRACTION, "round_warmup": True}

    def label_policy(self, steps, step, split):
        return barm_lut(steps, step, split)

    def criterion(self, logits, labels):
        """``--loss_type``'s criterion on the logits upsampled to the labels' size."""
        return losses.CRITERIA[self.hp.loss_type](losses.upsample(logits.float(), labels.shape[-2:]), labels)

    def loss(self, outputs, teacher_outputs, batch, ctx):
        logits, features = outputs
        labels = batch.labels
        if not self.needs_teacher(ctx):
            std = self.criterion(logits, labels)
            return {"total": std, "std": std}
        terms, _ = barm_loss(
            logits, features, teacher_outputs[0], teacher_outputs[1], labels, ctx.num_new,
            pseudo_thresh=self.hp.pseudo_thresh, loss_type=self.hp.loss_type, w_tri=self.hp.w_tri,
            w_fd=self.hp.w_fd, w_gkd=self.hp.w_gkd, w_bga_ce=self.hp.w_bga_ce)
        return terms

    def validation_due(self, iteration, iterations_per_epoch, total_iterations, val_interval):
        """BARM's rule (BARM trainer/trainer.py::Trainer.train): after every epoch when an epoch has more than
        100 iterations, else after every 5th; ``--val_interval N``: every N epochs, 0: never."""
        if val_interval is not None:
            return super().validation_due(iteration, iterations_per_epoch, total_iterations, val_interval)
        if iteration % iterations_per_epoch:
            return False
        epoch = iteration // iterations_per_epoch  # epochs completed
        return iterations_per_epoch > BARM_VALIDATION_ITERATIONS or epoch % BARM_VALIDATION_PERIOD == 0

    def selects_best(self, ctx, select_best):
        """At step 0 only, as BARM (trainer/trainer.py::Trainer.init_ckpt starts step 1 from step 0's best-validated
        file, selected on VOC's validation images, which are its test images); ``--select_last`` / ``--clean``:
        the last weights."""
        return ctx.step == 0 and select_best is not False

    def predict(self, logits, size):
        """Sigmoid (softmax for CE), then bilinear upsampling of the probabilities, then argmax (BARM
        trainer/trainer.py::Trainer.validate)."""
        return losses.upsample(losses.activation(self.hp.loss_type)(logits.float()), size).argmax(dim=1)
