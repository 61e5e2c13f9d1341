"""FT: fine-tuning, the lower bound (methods spec §4.1).

Every step trains all parameters with the plain criterion on the current step's labels (CE by default, as
MiB; ``--loss_type bce_loss`` for BARM's BCE), one parameter group at ``--lr``, no teacher. The new
classifier keeps its random initialisation. Prediction follows MiB: upsample the logits, then argmax.
``--bn_freeze`` freezes every BN at t > 0, as for BARM.
"""
from dataclasses import dataclass

from methods import losses
from methods.base import Method, hyper


@dataclass
class FineTuneHyper:
    loss_type: str = hyper("ce_loss", "classification loss", choices=losses.CRITERIA)
    bn_freeze: bool = hyper(False, "at t>0: every BatchNorm on running statistics with frozen affine parameters")


class FineTune(Method):
    name = "ft"
    Hyper = FineTuneHyper
    model_family = "deeplabv3inc"
    upsample_probabilities = False

    def needs_teacher(self, ctx):
        return False

    def bn_frozen(self, ctx):
        return ctx.step > 0 and self.hp.bn_freeze

    def loss(self, outputs, teacher_outputs, batch, ctx):
        std = self.criterion(outputs[0], batch.labels)
        return {"total": std, "std": std}
