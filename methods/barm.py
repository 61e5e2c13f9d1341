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
* Loss at t > 0 with ``--pseudo``: :func:`methods.losses.barm_loss` (PB-BCE on pseudo-labels + 5·L_tri +
  4·L_fd + 1·L_gkd + 1·L_ce); without ``--pseudo`` (or at step 0) the plain criterion on the labels —
  ``--pseudo`` gates everything, as in the reference (BARM trainer/trainer.py::Trainer.train_episode).
* Prediction: sigmoid (softmax for CE), then bilinear upsampling of the probabilities, then argmax
  (BARM trainer/trainer.py::Trainer.validate).
"""
from dataclasses import dataclass

import torch

from methods import losses
from methods.base import Method, hyper, module_params

# Learning rates hard-coded in BARM (BARM trainer/trainer.py::Trainer.init_optimizer)
BARM_BACKBONE_LR0 = 0.001
BARM_CLASSIFIER_LR0 = 0.01
BARM_ASPP_LR = 1e-3
BARM_OLD_LR = 1e-4


@dataclass
class BarmHyper:
    loss_type: str = hyper("bce_loss", "classification loss; also picks sigmoid (bce) or softmax for pseudo-labels"
                           " and prediction", choices=losses.CRITERIA)
    pseudo: bool = hyper(False, "at t>0: pseudo-labels from the previous model and BARM's auxiliary losses (all or"
                                " nothing, as in BARM)")
    pseudo_thresh: float = hyper(losses.BARM_PSEUDO_THRESH, "pseudo-label confidence threshold", low=0.0, high=1.0)
    bn_freeze: bool = hyper(False, "at t>0: every BatchNorm on running statistics with frozen affine parameters"
                                   " (ignored at step 0, as in BARM)")
    w_tri: float = hyper(losses.BARM_W_TRI, "weight of the background-adaptation triplet-like term L_tri (BARM's"
                                            " co_bg)", low=0.0)
    w_fd: float = hyper(losses.BARM_W_FD, "weight of the background feature distillation L_fd (BARM's co_tn)",
                        low=0.0)
    w_gkd: float = hyper(losses.BARM_W_GKD, "weight of the group knowledge distillation L_gkd (BARM's co_p)", low=0.0)
    w_bga_ce: float = hyper(losses.BARM_W_BGA_CE, "weight of the background-adaptation CE L_ce (BARM's co_oc)",
                            low=0.0)
    backbone_lr0: float = hyper(BARM_BACKBONE_LR0, "step 0: backbone learning rate", positive=True)
    classifier_lr0: float = hyper(BARM_CLASSIFIER_LR0, "step 0: classifier learning rate", positive=True)
    aspp_lr: float = hyper(BARM_ASPP_LR, "t>0: ASPP learning rate", low=0.0)
    old_lr: float = hyper(BARM_OLD_LR, "t>0: learning rate of the old heads, old ears, head_pre and backbone",
                          low=0.0)


class BARM(Method):
    name = "barm"
    Hyper = BarmHyper
    model_family = "deeplabv3bga"
    compatible_families = ("deeplabv3bga",)

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

    def loss(self, outputs, teacher_outputs, batch, ctx):
        logits, features = outputs
        labels = batch.labels
        if not self.needs_teacher(ctx):
            std = self.criterion(logits, labels)
            return {"total": std, "std": std}
        terms, _ = losses.barm_loss(
            logits, features, teacher_outputs[0], teacher_outputs[1], labels, ctx.num_new,
            pseudo_thresh=self.hp.pseudo_thresh, loss_type=self.hp.loss_type, w_tri=self.hp.w_tri,
            w_fd=self.hp.w_fd, w_gkd=self.hp.w_gkd, w_bga_ce=self.hp.w_bga_ce)
        return terms
