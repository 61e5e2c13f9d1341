"""MiB: modeling the background (MiB utils/loss.py::UnbiasedCrossEntropy, UnbiasedKnowledgeDistillationLoss,
segmentation_module.py::init_new_classifier), on the MiB family's protocol (:class:`methods.mib_family.MiBFamily`).

Step 0: plain CE over all pixels. At t > 0 the unbiased CE (background = background or any old class) +
``loss_kd`` · the unbiased KD (the student's background absorbs the new classes; teacher logits upsampled, all
pixels); the new classifier starts from the background's weights and bias (b ← b_bg − log(N+1)).

At a step that adds no class (Cityscapes domains) there is no background shift to model: the loss is CE +
``loss_kd`` · KD over all channels (LwF's :func:`methods.lwf.kd_old_channels`) and no classifier is initialised,
as PLOP ran "MiB" there (PLOP scripts/cityscapesDomain/mib_cityscapesDomain_1-1.sh: ``--method FT --loss_kd 10``,
KnowledgeDistillationLoss of utils/loss.py).
"""
from dataclasses import dataclass

from methods import losses
from methods.base import hyper
from methods.lwf import kd_old_channels
from methods.mib_family import INIT_FULL, MiBFamily, kd_alpha_hyper, protocol_hyper
from utils.tasks import is_domain_incremental

MIB_W_KD = 10.0  # MiB: UNCE + 10·UNKD (MiB argparser.py: --loss_kd 10 for --method MiB)


@dataclass
class MiBHyper:
    loss_kd: float = hyper(MIB_W_KD, "t>0: weight of the unbiased knowledge distillation", low=0.0)
    alpha: float = kd_alpha_hyper()
    init_balanced: bool = hyper(True, "t>0: background initialisation of the new classifier (weights and biases,"
                                      " b <- b_bg - log(N+1))")
    protocol: str = protocol_hyper()


class MiB(MiBFamily):
    """MiB (MiB utils/loss.py::UnbiasedCrossEntropy, UnbiasedKnowledgeDistillationLoss): step 0 plain CE over
    all pixels; at t > 0 the unbiased CE + ``loss_kd`` · unbiased KD (teacher logits upsampled, all pixels), new
    classifier initialised from the background."""

    name = "mib"
    Hyper = MiBHyper

    @classmethod
    def default_hyper(cls, dataset):
        """No background initialisation on a domain-incremental dataset (PLOP's Cityscapes script sets none)."""
        return cls.Hyper(init_balanced=not is_domain_incremental(dataset))

    def background_init(self, ctx):
        return INIT_FULL if self.hp.init_balanced else None

    def loss(self, outputs, teacher_outputs, batch, ctx):
        logits = self.upsampled(outputs[0], batch.labels)
        if ctx.step == 0:
            ce = losses.ce_all_pixels(logits, batch.labels)
            return {"total": ce, "ce": ce}
        old_logits = self.upsampled(teacher_outputs[0], batch.labels)
        if not ctx.adds_classes:  # a domain step: plain CE + KD (PLOP mib_cityscapesDomain_1-1.sh)
            ce = losses.ce_all_pixels(logits, batch.labels)
            kd = kd_old_channels(logits, old_logits, alpha=self.hp.alpha)
            return {"total": ce + self.hp.loss_kd * kd, "ce": ce, "kd": kd}
        unce = losses.unbiased_ce(logits, batch.labels, ctx.num_old)
        unkd = losses.unbiased_kd(logits, old_logits, alpha=self.hp.alpha)
        return {"total": unce + self.hp.loss_kd * unkd, "unce": unce, "unkd": unkd}
