"""DeepLabV3 assembly: backbone + incremental classifier head (BARM network/modeling.py::_segm_resnet, SSUL
network/utils.py).

State dict keys are ``backbone.*`` and ``classifier.*`` as in BARM/SSUL checkpoints, without a
``module.`` prefix. As in BARM (and unlike SSUL), the model does not upsample its logits.
"""
from torch import nn


class DeepLabV3(nn.Module):
    """``backbone`` (a :class:`network.backbone.ResNetBackbone`) followed by ``classifier`` (a head).

    ``forward(x)`` returns ``(logits, features)``: logits at feature resolution and the classifier's
    features plus ``back_out`` (layer4 output) and the backbone's stage taps ``layer1``..``layer4``
    (and ``layer1_pre``..``layer4_pre`` when ``backbone.return_preact`` is set).
    """

    def __init__(self, backbone, classifier):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier

    @property
    def classes_per_step(self):
        """Class counts per step, step 0 including the background."""
        return self.classifier.classes_per_step

    @property
    def num_classes(self):
        """Number of classes seen so far (background included)."""
        return self.classifier.num_classes

    def add_step(self, n_new):
        """Grow the classifier in place by one step with ``n_new`` classes."""
        self.classifier.add_step(n_new)

    def forward(self, x):
        taps = self.backbone(x)
        back_out = taps.pop("out")
        logits, features = self.classifier(back_out)
        return logits, {**features, "back_out": back_out, **taps}
