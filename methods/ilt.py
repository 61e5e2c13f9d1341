"""ILT under MiB's protocol (MiB utils/loss.py::KnowledgeDistillationLoss, train.py::Trainer).

Step 0: plain CE over all pixels. At t > 0::

    L = CE + loss_kd · KD(old channels) + loss_de · MSE(body, body^old)

with KD as LwF's (:func:`methods.losses.kd_old_channels`, teacher logits upsampled, all pixels) and the
feature term the mean squared error between the student's and the teacher's ``body`` (mod5 output, after
its final LeakyReLU; :func:`methods.losses.feature_mse`). The new classifier keeps PyTorch's default
initialisation.
"""
from dataclasses import dataclass

from methods import losses
from methods.base import hyper
from methods.lwf import LwF, LwFHyper


@dataclass
class ILTHyper(LwFHyper):
    loss_kd: float = hyper(losses.ILT_W_KD, "t>0: weight of the distillation on the old channels", low=0.0)
    loss_de: float = hyper(losses.ILT_W_DE, "t>0: weight of the MSE between the student's and the teacher's"
                                            " mod5 features", low=0.0)


class ILT(LwF):
    """ILT (MiB utils/loss.py::KnowledgeDistillationLoss, train.py::Trainer): LwF's CE + ``loss_kd`` · KD,
    plus ``loss_de`` · MSE(mod5)."""

    name = "ilt"
    Hyper = ILTHyper

    def loss(self, outputs, teacher_outputs, batch, ctx):
        terms = super().loss(outputs, teacher_outputs, batch, ctx)
        if ctx.step == 0:
            return terms
        de = losses.feature_mse(outputs[1]["body"], teacher_outputs[1]["body"])
        return {**terms, "total": terms["total"] + self.hp.loss_de * de, "de": de}
