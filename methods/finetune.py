"""FT: fine-tuning under MiB's protocol, the lower bound (MiB argparser.py, train.py::Trainer.train).

Every step trains all parameters of MiB's network with the softmax cross-entropy over all K_t channels,
averaged over all pixels (ignored ones counted, :func:`methods.losses.ce_all_pixels`), one parameter group
at ``--lr``, no teacher. The new classifier keeps PyTorch's default initialisation. Data, labels (MiB's:
VOC void → background at training), prediction (argmax of upsampled logits) and evaluation are the MiB
family's (:class:`methods.mib.MiBFamily`).
"""
from dataclasses import dataclass

from methods import losses
from methods.mib_family import MiBFamily, protocol_hyper


@dataclass
class FineTuneHyper:
    protocol: str = protocol_hyper()  # FT has no loss weight: CE only (MiB argparser.py)


class FineTune(MiBFamily):
    name = "ft"
    Hyper = FineTuneHyper

    def needs_teacher(self, ctx):
        return False

    def loss(self, outputs, teacher_outputs, batch, ctx):
        ce = losses.ce_all_pixels(self.upsampled(outputs[0], batch.labels), batch.labels)
        return {"total": ce, "ce": ce}
