"""LwF and LwF-MC under MiB's protocol (MiB utils/loss.py::KnowledgeDistillationLoss, train.py::Trainer).

* **LwF** (``--method lwf``): step 0 plain CE; at t > 0 CE + ``loss_kd`` · KD, where KD renormalises the
  student's first K_old channels with a log-softmax over those channels and compares them with the
  teacher's softmax, averaged over classes and all pixels (:func:`methods.losses.kd_old_channels`).
* **LwF-MC** (``--method lwf-mc``, iCaRL-style): the classification loss is the multi-label BCE over all
  K_t channels at **every** step, step 0 included (:func:`methods.losses.bce_all_pixels`); at t > 0 plus
  ``icarl_importance`` · K_old · BCE(z_old-channels, σ(z^old)) (:func:`methods.losses.icarl_distillation`).
  Prediction stays the argmax of the upsampled logits.

Both keep PyTorch's default initialisation of the new classifier and use the teacher's upsampled logits on
every pixel.
"""
from dataclasses import dataclass

from methods import losses
from methods.base import hyper
from methods.mib import MiBFamily, protocol_field


@dataclass
class LwFHyper:
    loss_kd: float = hyper(losses.LWF_W_KD, "t>0: weight of the distillation on the old channels", low=0.0)
    alpha: float = hyper(losses.KD_ALPHA, "teacher logits are multiplied by it before the softmax (MiB's --alpha)",
                         positive=True)
    protocol: str = protocol_field()


class LwF(MiBFamily):
    """LwF (MiB utils/loss.py::KnowledgeDistillationLoss): CE + ``loss_kd`` · KD on the old channels."""

    name = "lwf"
    Hyper = LwFHyper

    def loss(self, outputs, teacher_outputs, batch, ctx):
        logits = self.upsampled(outputs[0], batch.labels)
        ce = losses.ce_all_pixels(logits, batch.labels)
        if ctx.step == 0:
            return {"total": ce, "ce": ce}
        kd = losses.kd_old_channels(logits, self.upsampled(teacher_outputs[0], batch.labels), alpha=self.hp.alpha)
        return {"total": ce + self.hp.loss_kd * kd, "ce": ce, "kd": kd}


@dataclass
class LwFMCHyper:
    icarl_importance: float = hyper(losses.LWFMC_W_ICARL, "t>0: weight of the BCE distillation (itself K_old times"
                                                          " a class mean)", low=0.0)
    protocol: str = protocol_field()


class LwFMC(MiBFamily):
    """LwF-MC (MiB utils/loss.py::BCEWithLogitsLossWithIgnoreIndex, train.py): BCE over all channels at every
    step + ``icarl_importance`` · K_old · BCE-distillation at t > 0."""

    name = "lwf-mc"
    Hyper = LwFMCHyper

    def loss(self, outputs, teacher_outputs, batch, ctx):
        logits = self.upsampled(outputs[0], batch.labels)
        bce = losses.bce_all_pixels(logits, batch.labels)
        if ctx.step == 0:
            return {"total": bce, "bce": bce}
        icarl = losses.icarl_distillation(logits, self.upsampled(teacher_outputs[0], batch.labels))
        return {"total": bce + self.hp.icarl_importance * icarl, "bce": bce, "icarl": icarl}
