"""ILT under MiB's protocol (methods spec §4.4).

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
from methods.mib import MiBFamily, protocol_field


@dataclass
class ILTHyper:
    loss_kd: float = hyper(losses.ILT_W_KD, "t>0: weight of the distillation on the old channels", low=0.0)
    loss_de: float = hyper(losses.ILT_W_DE, "t>0: weight of the MSE between the student's and the teacher's"
                                            " mod5 features", low=0.0)
    alpha: float = hyper(losses.KD_ALPHA, "teacher logits are multiplied by it before the softmax (MiB's --alpha)",
                         positive=True)
    protocol: str = protocol_field()


class ILT(MiBFamily):
    """ILT (methods spec §4.4): CE + ``loss_kd`` · KD + ``loss_de`` · MSE(mod5)."""

    name = "ilt"
    Hyper = ILTHyper

    def loss(self, outputs, teacher_outputs, batch, ctx):
        logits = self.upsampled(outputs[0], batch.labels)
        ce = losses.ce_all_pixels(logits, batch.labels)
        if ctx.step == 0:
            return {"total": ce, "ce": ce}
        kd = losses.kd_old_channels(logits, self.upsampled(teacher_outputs[0], batch.labels), alpha=self.hp.alpha)
        de = losses.feature_mse(outputs[1]["body"], teacher_outputs[1]["body"])
        return {"total": ce + self.hp.loss_kd * kd + self.hp.loss_de * de, "ce": ce, "kd": kd, "de": de}
