"""ILT under MiB's protocol (MiB utils/loss.py::KnowledgeDistillationLoss, train.py::Trainer).

Step 0: plain CE over all pixels. At t > 0::

    L = CE + loss_kd · KD(old channels) + loss_de · MSE(body, body^old)

with KD as LwF's (:func:`methods.lwf.kd_old_channels`, teacher logits upsampled, all pixels) and the
feature term the mean squared error between the student's and the teacher's ``body`` (mod5 output, after
its final LeakyReLU; :func:`feature_mse`). The new classifier keeps PyTorch's default
initialisation.
"""
from dataclasses import dataclass

import torch.nn.functional as F

from methods.base import hyper
from methods.lwf import LwF, LwFHyper

# Loss weights at t > 0 (MiB argparser.py: --loss_kd 100 --loss_de 100 for ILT)
ILT_W_KD = 100.0  # ILT: CE + 100·KD + 100·MSE(mod5)
ILT_W_DE = 100.0


def feature_mse(features, old_features):
    """ILT's feature distillation (MiB train.py::Trainer): ``nn.MSELoss()`` between the student's and the
    teacher's ``body`` (mod5 output, (B, 2048, h, w)), a mean over all elements."""
    return F.mse_loss(features.float(), old_features.float())


@dataclass
class ILTHyper(LwFHyper):
    loss_kd: float = hyper(ILT_W_KD, "t>0: weight of the distillation on the old channels", low=0.0)
    loss_de: float = hyper(ILT_W_DE, "t>0: weight of the MSE between the student's and the teacher's"
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
        de = feature_mse(outputs[1]["body"], teacher_outputs[1]["body"])
        return {**terms, "total": terms["total"] + self.hp.loss_de * de, "de": de}
