"""DKD's network: torchvision ResNet + ASPP with ``last_conv`` + sigmoid classifiers (DKD models/model.py).

DKD (cvlab-yonsei/DKD ``models/model.py``) has no background channel: ``cls[0]`` is a one-channel
*auxiliary* classifier and ``cls[1..]`` hold one 1x1 classifier per step, each with one channel per real
class of that step. ciss's ``classes_per_step`` counts step 0 *with* the background (VOC 15-1 at step 1:
``[16, 1]``), so ``cls[1]`` has ``classes_per_step[0] − 1`` channels and ``cls[k + 1]`` has
``classes_per_step[k]`` channels for k ≥ 1. The logits are ``cat(cls[0], cls[1], ...)``, so the aux channel
takes the background's place and channel p is the class at position p of the concatenated class order
(0 = background ↔ aux): the model has ``num_outputs == num_classes == sum(classes_per_step)`` channels.

Key layout under :class:`network.deeplab.DeepLabV3` (``backbone.*`` are torchvision's, as in DKD)::

    classifier.aspp.convs.{0..4}.*      ASPP branches (BARM/torchvision layout, network/aspp.py)
    classifier.aspp.project.{0,1}.*     1x1 fusion conv + BN (then ReLU, Dropout(0.1))
    classifier.last_conv.{0,1}.*        3x3 conv 256→256 without bias + BN (then ReLU): output x_pl
    classifier.cls.{0..t+1}.{weight,bias}

DKD's own checkpoints name these ``aspp.*``, ``aspp.last_conv.*`` and ``cls.*`` (its ``last_conv`` lives
inside its ASPP module); :func:`convert_reference_state_dict` maps them.
"""
import torch
from torch import nn

from network.aspp import ASPP_CHANNELS, ATROUS_RATES, conv_bn_relu
from network.backbone import ResNetBackbone, check_backbone_args
from network.deeplab import DeepLabV3
from network.heads import _IncrementalHeadBase, check_class_count, init_classifier_weights
from network.pretrained import load_pretrained_backbone
from utils.errors import UserError

#: Output channels of the auxiliary classifier ``cls[0]`` (DKD models/model.py::DeepLabV3).
AUX_CHANNELS = 1


class DKDHead(_IncrementalHeadBase):
    """DKD's head (DKD models/model.py, models/modules/aspp.py): ASPP (with its Dropout(0.1) after the
    projection), ``last_conv`` (3x3 conv 256→256 without bias, BN, ReLU) giving x_pl, and the classifiers
    ``cls``.

    Args:
        in_channels: backbone output channels (2048 for ResNet-50/101).
        classes_per_step: class counts per step, step 0 including the background (at least 2: the
            background and one real class).
        atrous_rates: the three ASPP rates, e.g. ``ATROUS_RATES[16]``.
        return_parts: also return the positive / negative logit parts (attribute of the same name, may be
            switched off for the teacher at step 0 or at test time to save a little work).

    ``forward(x)`` returns ``(logits, features)``, all at feature resolution:

    * ``logits`` (B, num_classes, h, w) = cat(cls[0](sg(x_pl)), cls[1](x_pl), ...) — the auxiliary
      classifier reads ``x_pl.detach()`` so no gradient of its loss reaches the features;
    * ``features["pre_logits"]`` = x_pl (B, 256, h, w);
    * when :attr:`return_parts`: ``features["pos_logits"]`` / ``features["neg_logits"]``
      (B, num_classes − 1, h, w), the non-aux logits without bias split by the sign of the weights:
      Pos_c = Σ_k x_pl,k · max(W_c,k, 0), Neg_c = Σ_k x_pl,k · min(W_c,k, 0), so that
      logits[:, 1:] = Pos + Neg + b.

    Initialisation (DKD models/modules/aspp.py, models/model.py): every conv of ASPP / last_conv / cls gets
    ``kaiming_normal_`` (fan_in), BN weight 1 and bias 0; classifier biases keep PyTorch's default
    U(−1/16, 1/16). Random draws follow DKD's construction order: ASPP and last_conv, their init, the
    classifiers, their init.
    """

    def __init__(self, in_channels, classes_per_step, atrous_rates, return_parts=True):
        super().__init__(in_channels, classes_per_step, atrous_rates)
        if self.classes_per_step[0] < 2:
            raise UserError(
                "DKD needs at least one base class besides the background at step 0, got "
                f"classes_per_step[0] = {self.classes_per_step[0]}"
            )
        self.return_parts = bool(return_parts)
        self.last_conv = conv_bn_relu(ASPP_CHANNELS, ASPP_CHANNELS, 3)
        init_classifier_weights(self.aspp)
        init_classifier_weights(self.last_conv)
        self.cls = nn.ModuleList(
            [nn.Conv2d(ASPP_CHANNELS, AUX_CHANNELS, 1)]
            + [nn.Conv2d(ASPP_CHANNELS, n, 1) for n in self.classifier_channels]
        )
        init_classifier_weights(self.cls)

    @property
    def classifier_channels(self):
        """Output channels of ``cls[1:]``: the real classes of each step (step 0 without background)."""
        return [self.classes_per_step[0] - 1] + self.classes_per_step[1:]

    def add_step(self, n_new):
        """Append a 1x1 classifier with ``n_new`` channels (random init; see :func:`init_novel_classifier`)."""
        check_class_count(n_new, "number of new classes")
        cls = nn.Conv2d(ASPP_CHANNELS, n_new, 1)
        self._adopt(cls)
        self.cls.append(cls)
        self.classes_per_step.append(int(n_new))

    def _parts(self, x_pl):
        """(Pos, Neg) of every non-aux classifier, without bias, at feature resolution (DKD models/model.py)."""
        weight = torch.cat([cls.weight[:, :, 0, 0] for cls in self.cls[1:]], dim=0)  # (num_classes − 1, 256)
        zero = torch.zeros_like(weight)
        # DKD's where(w > 0, w, 0) / where(w < 0, w, 0): a zero weight belongs to neither part (no gradient)
        positive, negative = torch.where(weight > 0, weight, zero), torch.where(weight < 0, weight, zero)
        x = x_pl.permute(0, 2, 3, 1)
        # W[:, :, 0, 0].t() instead of DKD's 4-D ``w.T`` (deprecated; DKD models/model.py), same product
        pos = torch.matmul(x, positive.t()).permute(0, 3, 1, 2)
        neg = torch.matmul(x, negative.t()).permute(0, 3, 1, 2)
        return pos, neg

    def forward(self, x):
        x_pl = self.last_conv(self.aspp(x))
        logits = torch.cat([self.cls[0](x_pl.detach())] + [cls(x_pl) for cls in self.cls[1:]], dim=1)
        features = {"pre_logits": x_pl}
        if self.return_parts:
            features["pos_logits"], features["neg_logits"] = self._parts(x_pl)
        return logits, features


def _dkd_head(module):
    """The :class:`DKDHead` of ``module`` (a DKDHead or a model whose ``classifier`` is one)."""
    head = getattr(module, "classifier", module)
    if not isinstance(head, DKDHead):
        raise TypeError(f"expected a DKDHead or a model with a DKDHead classifier, got {type(module).__name__}")
    return head


@torch.no_grad()
def init_novel_classifier(head):
    """DKD's initialisation of a new step (DKD train_voc.py::init_novel_classifier): every row of the
    newest classifier ``cls[-1]`` gets the auxiliary classifier's weight (1, 256, 1, 1) and bias.

    ``head`` is a :class:`DKDHead` or a model whose ``classifier`` is one. Call it after loading the step
    t−1 weights and before building the optimizer. Raises ValueError at step 0 (no new classifier).
    """
    head = _dkd_head(head)
    if len(head.classes_per_step) < 2:
        raise ValueError("init_novel_classifier needs a head with at least one incremental step")
    aux, new = head.cls[0], head.cls[-1]
    new.weight.copy_(aux.weight.expand_as(new.weight))
    new.bias.copy_(aux.bias.expand_as(new.bias))


def build_dkd_model(classes_per_step, backbone="resnet101", output_stride=16, pretrained=None, **head_kwargs):
    """DKD's DeepLabV3 (DKD models/model.py::DeepLabV3): :class:`ResNetBackbone` (torchvision ResNet, dilation by
    ``replace_stride_with_dilation``, BN momentum 0.01) + :class:`DKDHead`, in :class:`DeepLabV3`.

    Args:
        classes_per_step: class counts per step, step 0 including the background (VOC 15-1 at step 1:
            ``[16, 1]``).
        backbone: ``"resnet18"``, ``"resnet50"`` or ``"resnet101"``.
        output_stride: 16 (ASPP rates 6/12/18) or 8 (12/24/36).
        pretrained: None, ``"imagenet"`` (torchvision's IMAGENET1K_V1 weights, as DKD
            models/modules/resent_official.py::ResNet._load_pretrained_model) or a local file,
            loaded into the backbone by :func:`network.pretrained.load_pretrained_backbone`.
        **head_kwargs: passed to :class:`DKDHead` (``return_parts``).

    The signature is a model-family builder's (an entry of ``network.FAMILIES``). Raises UserError on bad
    arguments or unusable weights.
    """
    check_backbone_args(backbone, output_stride)
    net = ResNetBackbone(backbone, output_stride)
    if pretrained is not None:
        load_pretrained_backbone(net, pretrained)
    head = DKDHead(net.out_channels, classes_per_step, ATROUS_RATES[output_stride], **head_kwargs)
    return DeepLabV3(net, head)


#: DKD checkpoint key prefixes -> ciss key prefixes (first match wins; ``aspp.last_conv`` before ``aspp``).
REFERENCE_KEY_PREFIXES = (
    ("aspp.last_conv.", "classifier.last_conv."),
    ("aspp.", "classifier.aspp."),
    ("cls.", "classifier.cls."),
    ("backbone.", "backbone."),
)


def convert_reference_state_dict(state_dict):
    """Rename the keys of a DKD model state dict (``module.`` prefix optional) to the ciss layout above.

    Raises UserError naming the first key that belongs to no known part.
    """
    converted = {}
    for key, value in state_dict.items():
        name = key[len("module."):] if key.startswith("module.") else key
        for old, new in REFERENCE_KEY_PREFIXES:
            if name.startswith(old):
                converted[new + name[len(old):]] = value
                break
        else:
            raise UserError(
                f"unexpected key {key!r} in a DKD state dict: expected keys under backbone., aspp. or cls."
            )
    return converted


def reference_checkpoint_state(checkpoint):
    """The ciss model state of a checkpoint written by DKD's code (``BaseTrainer._save_checkpoint``: a dict with
    ``state_dict``, ``optimizer``, ``lr_scheduler``, ...), or of a bare DKD state dict: the ``state_dict`` entry
    with its keys converted by :func:`convert_reference_state_dict`. Raises UserError on anything else."""
    if not isinstance(checkpoint, dict):
        raise UserError(f"a DKD checkpoint is a dict with 'state_dict', got {type(checkpoint).__name__}")
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict):
        raise UserError("the 'state_dict' of a DKD checkpoint is not a dict of tensors")
    return convert_reference_state_dict(state)
