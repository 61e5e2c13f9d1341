"""LwF and LwF-MC under MiB's protocol (MiB utils/loss.py::KnowledgeDistillationLoss, train.py::Trainer).

* **LwF** (``--method lwf``): step 0 plain CE; at t > 0 CE + ``loss_kd`` · KD, where KD renormalises the
  student's first K_old channels with a log-softmax over those channels and compares them with the
  teacher's softmax, averaged over classes and all pixels (:func:`kd_old_channels`).
* **LwF-MC** (``--method lwf-mc``, iCaRL-style): the classification loss is the multi-label BCE over all
  K_t channels at **every** step, step 0 included (:func:`bce_all_pixels`); at t > 0 plus
  ``icarl_importance`` · K_old · BCE(z_old-channels, σ(z^old)) (:func:`icarl_distillation`).
  Prediction stays the argmax of the upsampled logits.

Both keep PyTorch's default initialisation of the new classifier and use the teacher's upsampled logits on
every pixel.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods import losses
from methods.base import hyper
from methods.mib_family import MiBFamily, kd_alpha_hyper, protocol_hyper

# Loss weights at t > 0 (MiB argparser.py: --loss_kd 100 for LWF, --icarl_importance 10 for LWF-MC)
LWF_W_KD = 100.0  # LwF: CE + 100·KD
LWFMC_W_ICARL = 10.0  # LwF-MC: BCE + 10·icarl_distillation, itself already ×K_old


def kd_old_channels(logits, old_logits, alpha=losses.KD_ALPHA):
    """LwF's / ILT's distillation (MiB utils/loss.py::KnowledgeDistillationLoss).

    The first K_old = ``old_logits.shape[1]`` student channels are renormalised by a log-softmax over
    those channels only (log p̃), q = softmax(alpha·z^old)::

        L = − mean_Ω (1/K_old) Σ_{c<K_old} q_c log p̃_c

    The 1/K_old class mean is why LwF's weight is 100. Shapes: logits (B, K_t, H, W), old_logits
    (B, K_old, H, W)."""
    logits = logits.float()
    n_old = old_logits.shape[1]
    losses.check_old_channels(n_old, logits.shape[1], "kd_old_channels")
    log_p = torch.log_softmax(logits[:, :n_old], dim=1)
    q = torch.softmax(old_logits.float() * alpha, dim=1)
    return -(q * log_p).mean(dim=1).mean()


def bce_all_pixels(logits, labels, ignore_index=losses.IGNORE_INDEX):
    """LwF-MC's classification loss (MiB utils/loss.py::BCEWithLogitsLossWithIgnoreIndex with reduction
    'none' then .mean()), used at every step including step 0.

    One-hot target over all K_t channels (background channel 0 a normal class)::

        ℓ(p) = Σ_{c<K_t} BCEwl(z_c(p), [y(p) = c]),  ℓ(p) = 0 where y(p) = 255;   L = mean_Ω ℓ

    Unlike BARM's :func:`bce_with_ignore` the mean is over ALL pixels. Shapes: logits (B, K_t, H, W),
    labels (B, H, W)."""
    return (losses.one_hot_bce_per_pixel(logits, labels, ignore_index) * (labels != ignore_index)).mean()


def icarl_distillation(logits, old_logits):
    """LwF-MC's distillation before its weight (MiB train.py)::

        L = K_old · mean_{b, c<K_old, h, w} BCEwl(z_c, σ(z^old_c))

    (a BCE mean over B·K_old·H·W turned into a class sum by the factor K_old). The caller multiplies by
    ``LWFMC_W_ICARL`` (10). Shapes: logits (B, K_t, H, W), old_logits (B, K_old, H, W)."""
    n_old = old_logits.shape[1]
    losses.check_old_channels(n_old, logits.shape[1], "icarl_distillation")
    loss = F.binary_cross_entropy_with_logits(logits.float()[:, :n_old], torch.sigmoid(old_logits.float()))
    return n_old * loss


@dataclass
class LwFHyper:
    loss_kd: float = hyper(LWF_W_KD, "t>0: weight of the distillation on the old channels", low=0.0)
    alpha: float = kd_alpha_hyper()
    protocol: str = protocol_hyper()


class LwF(MiBFamily):
    """LwF (MiB utils/loss.py::KnowledgeDistillationLoss): CE + ``loss_kd`` · KD on the old channels."""

    name = "lwf"
    Hyper = LwFHyper

    def loss(self, outputs, teacher_outputs, batch, ctx):
        logits = self.upsampled(outputs[0], batch.labels)
        ce = losses.ce_all_pixels(logits, batch.labels)
        if ctx.step == 0:
            return {"total": ce, "ce": ce}
        kd = kd_old_channels(logits, self.upsampled(teacher_outputs[0], batch.labels), alpha=self.hp.alpha)
        return {"total": ce + self.hp.loss_kd * kd, "ce": ce, "kd": kd}


@dataclass
class LwFMCHyper:
    icarl_importance: float = hyper(LWFMC_W_ICARL, "t>0: weight of the BCE distillation (itself K_old times"
                                                          " a class mean)", low=0.0)
    protocol: str = protocol_hyper()


class LwFMC(MiBFamily):
    """LwF-MC (MiB utils/loss.py::BCEWithLogitsLossWithIgnoreIndex, train.py): BCE over all channels at every
    step + ``icarl_importance`` · K_old · BCE-distillation at t > 0."""

    name = "lwf-mc"
    Hyper = LwFMCHyper

    def step0_protocol(self):
        """LwF-MC trains step 0 with its BCE, not the family's CE."""
        family, _, labels = super().step0_protocol()
        return family, "bce", labels

    def loss(self, outputs, teacher_outputs, batch, ctx):
        logits = self.upsampled(outputs[0], batch.labels)
        bce = bce_all_pixels(logits, batch.labels)
        if ctx.step == 0:
            return {"total": bce, "bce": bce}
        icarl = icarl_distillation(logits, self.upsampled(teacher_outputs[0], batch.labels))
        return {"total": bce + self.hp.icarl_importance * icarl, "bce": bce, "icarl": icarl}
