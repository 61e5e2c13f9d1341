"""MiB / PLOP / RCIL DeepLab-v3 on an InPlace-ABN ResNet, built from standard layers (MiB
segmentation_module.py::make_model).

The network of MiB (``segmentation_module.py::IncrementalSegmentationModule``) re-expressed with torch
layers and :class:`network.abn.ABN` (InPlace-ABN's numerics): ``body`` (ResNet, modules ``mod1..mod5``),
``head`` (:class:`DeeplabV3Head`, MiB's ``DeeplabV3``) and ``cls`` (one 1x1 classifier per step). Its
state dict uses the reference key names (``body.mod2.block1.convs.conv1.weight``, ``head.map_bn.weight``,
``cls.0.bias``, ...), so released MiB/PLOP step checkpoints (``model_state`` with a ``module.`` prefix)
load by stripping the prefix (:func:`load_mib_checkpoint`); the body and its ImageNet weights are in
``network/mib_resnet.py``.

``forward(x)`` returns ``(logits, features)``: logits at feature resolution (stride 16 or 8; the method
upsamples) and ``body`` (mod5 output), ``pre_logits`` (x_pl, the head output), ``sem_logits_small``
(= logits) and, when :attr:`MiBDeepLab.return_attentions` is set, ``attentions`` (PLOP
models/resnet.py::ResNet.forward): the pre-activation residual sums of the last block of mod2..mod5, then x_pl.
"""
import logging
import os

import torch
from torch import nn
from torch.nn import functional as F

from network.abn import ABN, IDENTITY_SLOPE, LEAKY_RELU, LEAKY_RELU_SLOPE
from network.backbone import check_backbone_args
from network.heads import check_class_count, check_classes_per_step
from network.mib_resnet import MiBResNet, check_fit, load_pretrained_body, tensor_state
from utils.checkpoint import load_checkpoint_file
from utils.errors import UserError

log = logging.getLogger("ciss")

#: Norm-layer activation per ``norm_act`` name: the leaky-ReLU slope of every ABN (MiB
#: segmentation_module.py::make_model; RCIL modules/residual.py).
NORM_ACT_SLOPES = {"leaky_relu": LEAKY_RELU_SLOPE, "identity": IDENTITY_SLOPE}
#: ASPP dilations of the head per output stride; OS8 uses (12, 24, 32), not 36 (MiB modules/deeplab.py).
HEAD_DILATIONS = {16: (6, 12, 18), 8: (12, 24, 32)}
#: Hidden and output channels of the head (``head_channels = 256`` in MiB segmentation_module.py::make_model).
HEAD_CHANNELS = 256
#: Eval-time pooling window of the head's image-pooling branch (``--pooling 32``, MiB modules/deeplab.py).
POOLING_SIZE = 32


def image_pooling(x, pooling_size=POOLING_SIZE, training=False):
    """Input of the head's image-pooling branch (MiB modules/deeplab.py::DeeplabV3._global_pooling).

    Training (or ``pooling_size=None``): the spatial mean, (B, C, 1, 1). Eval: average pooling with
    kernel (k_h, k_w) = (min(pooling_size, h), min(pooling_size, w)), stride 1, then replicate padding
    back to (h, w): left/top (k - 1) // 2, right/bottom (k - 1) // 2 for odd k and (k - 1) // 2 + 1 for
    even k; output (B, C, h, w). For h, w <= pooling_size this is the spatial mean at every pixel.
    """
    if training or pooling_size is None:
        return x.mean(dim=(2, 3), keepdim=True)
    size = pooling_size if isinstance(pooling_size, (tuple, list)) else (pooling_size, pooling_size)
    k_h, k_w = min(int(size[0]), x.shape[2]), min(int(size[1]), x.shape[3])

    def before_after(k):
        return (k - 1) // 2, (k - 1) // 2 + (0 if k % 2 == 1 else 1)

    pooled = F.avg_pool2d(x, (k_h, k_w), stride=1)
    return F.pad(pooled, (*before_after(k_w), *before_after(k_h)), mode="replicate")


class DeeplabV3Head(nn.Module):
    """MiB's ``DeeplabV3`` head (MiB modules/deeplab.py::DeeplabV3).

    out = red_conv(map_bn(cat(map_convs[i](x)))), with ``map_convs`` = 1x1 and three 3x3 convs of
    dilation = padding = ``HEAD_DILATIONS[output_stride]``, 256 channels each; pool =
    pool_red_conv(global_pooling_bn(global_pooling_conv(image_pooling(x)))) broadcast to (h, w) in
    training; x_pl = red_bn(out + pool). Norm layers are norm + LeakyReLU(``slope``). Every conv is
    bias-free and ``xavier_normal_`` with gain ``calculate_gain('leaky_relu', slope)`` (1.41414 for
    0.01, 1.0 for RCIL's 1.0); norm layers keep gamma 1, beta 0.

    ``forward(x)``: (B, in_channels, h, w) -> x_pl (B, 256, h, w).
    """

    def __init__(self, in_channels, output_stride=16, slope=LEAKY_RELU_SLOPE, hidden_channels=HEAD_CHANNELS,
                 out_channels=HEAD_CHANNELS, pooling_size=POOLING_SIZE):
        super().__init__()
        self.pooling_size = pooling_size
        self.map_convs = nn.ModuleList([nn.Conv2d(in_channels, hidden_channels, 1, bias=False)] + [
            nn.Conv2d(in_channels, hidden_channels, 3, padding=d, dilation=d, bias=False)
            for d in HEAD_DILATIONS[output_stride]
        ])
        self.map_bn = ABN(hidden_channels * len(self.map_convs), LEAKY_RELU, slope)
        self.global_pooling_conv = nn.Conv2d(in_channels, hidden_channels, 1, bias=False)
        self.global_pooling_bn = ABN(hidden_channels, LEAKY_RELU, slope)
        self.red_conv = nn.Conv2d(hidden_channels * len(self.map_convs), out_channels, 1, bias=False)
        self.pool_red_conv = nn.Conv2d(hidden_channels, out_channels, 1, bias=False)
        self.red_bn = ABN(out_channels, LEAKY_RELU, slope)
        self.reset_parameters(slope)

    def reset_parameters(self, slope):
        """MiB's ``reset_parameters`` (MiB modules/deeplab.py::DeeplabV3): xavier-normal convs (leaky-ReLU gain),
        zero conv biases."""
        gain = nn.init.calculate_gain("leaky_relu", slope)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_normal_(module.weight, gain)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x):
        out = self.red_conv(self.map_bn(torch.cat([conv(x) for conv in self.map_convs], dim=1)))
        pool = image_pooling(x, self.pooling_size, self.training)
        pool = self.pool_red_conv(self.global_pooling_bn(self.global_pooling_conv(pool)))
        return self.red_bn(out + pool)  # a (B, C, 1, 1) pool broadcasts like MiB's repeat


class MiBDeepLab(nn.Module):
    """MiB's ``IncrementalSegmentationModule`` (MiB segmentation_module.py::IncrementalSegmentationModule):
    ``body``, ``head``, ``cls``.

    ``cls[s]`` = Conv2d(256, n_s, 1, bias=True) with PyTorch's default initialisation; logits z^s =
    cat_s cls[s](x_pl), (B, sum n_s, h, w) at feature resolution. ``forward(x)`` returns ``(z^s,
    features)``, see the module docstring. ``arch`` names the backbone.
    """

    def __init__(self, body, head, classes_per_step, norm_act="leaky_relu"):
        super().__init__()
        self.body = body
        self.head = head
        self.classes_per_step = check_classes_per_step(classes_per_step)
        self.cls = nn.ModuleList([nn.Conv2d(HEAD_CHANNELS, n, 1) for n in self.classes_per_step])
        self.norm_act = norm_act

    @property
    def arch(self):
        """The backbone architecture, e.g. ``"resnet101"``."""
        return self.body.arch

    @property
    def output_stride(self):
        """16 or 8."""
        return self.body.output_stride

    @property
    def return_attentions(self):
        """Whether ``forward`` adds PLOP's ``attentions`` (sets the body's ``return_preact``)."""
        return self.body.return_preact

    @return_attentions.setter
    def return_attentions(self, value):
        self.body.return_preact = bool(value)

    @property
    def num_classes(self):
        """Number of classes seen so far (steps 0..t, background included)."""
        return sum(self.classes_per_step)

    @property
    def num_outputs(self):
        """Number of logit channels (= :attr:`num_classes`)."""
        return self.num_classes

    def add_step(self, n_new):
        """Append ``cls[t+1]`` = Conv2d(256, n_new, 1) (default init) on the model's device, dtype, memory
        format and mode (cf. ``network.heads._IncrementalHeadBase._adopt``)."""
        check_class_count(n_new, "number of new classes")
        conv = nn.Conv2d(HEAD_CHANNELS, int(n_new), 1)
        reference = self.head.map_convs[1].weight  # a 3x3 weight tells the memory format apart
        conv.to(device=reference.device, dtype=reference.dtype)
        if reference.is_contiguous(memory_format=torch.channels_last) and not reference.is_contiguous():
            conv.to(memory_format=torch.channels_last)
        conv.train(self.training)
        self.cls.append(conv)
        self.classes_per_step.append(int(n_new))

    def forward(self, x):
        taps = self.body(x)
        x_b = taps["out"]
        x_pl = self.head(x_b)
        logits = torch.cat([conv(x_pl) for conv in self.cls], dim=1)
        features = {"body": x_b, "pre_logits": x_pl, "sem_logits_small": logits}
        if self.body.return_preact:
            features["attentions"] = list(taps["preacts"]) + [x_pl]  # PLOP appends x_pl (PLOP segmentation_module.py)
        return logits, features


def read_mib_checkpoint(path):
    """The model state of a released MiB/PLOP step checkpoint (``{"model_state": ...}``, keys
    ``module.body.*``, ``module.head.*``, ``module.cls.*``), without the ``module.`` prefix."""
    return tensor_state(load_checkpoint_file(path), f"checkpoint {path}", "model_state")


def load_mib_checkpoint(model, checkpoint, source=None):
    """Load a MiB/PLOP step checkpoint into ``model`` strictly (teacher / test load, as MiB run.py::main).

    Args:
        model: a :class:`MiBDeepLab` built for the checkpoint's classes per step.
        checkpoint: a file path, or an already loaded dict (``model_state`` or a bare state dict;
            ``module.`` prefixes allowed).
        source: the name used in error messages (default: the path).

    Raises:
        UserError: one line naming the first missing / unexpected / mis-shaped keys.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        source = source or f"checkpoint {checkpoint}"
        state = read_mib_checkpoint(checkpoint)
    else:
        source = source or "checkpoint"
        state = tensor_state(checkpoint, source, "model_state")
    check_fit(model, state, source,
               f"the MiB {model.arch} model for classes per step {model.classes_per_step}")
    model.load_state_dict(state, strict=True)


def build_mib_model(classes_per_step, backbone="resnet101", output_stride=16, pretrained=None,
                    norm_act="leaky_relu", pooling_size=POOLING_SIZE):
    """Build MiB/PLOP's DeepLab-v3 (MiB segmentation_module.py::make_model) for the classes of steps 0..t.

    Construction order (random draws) follows MiB's ``make_model``: body (PyTorch default conv init),
    its ImageNet weights, head (xavier), then ``cls``.

    Args:
        classes_per_step: class counts per step, step 0 including the background (VOC 15-1 at step 1: [16, 1]).
        backbone: ``"resnet18"``, ``"resnet50"`` or ``"resnet101"``.
        output_stride: 16 (body dilations 1,1,1,2; head 6,12,18) or 8 (1,1,2,4; head 12,24,32).
        pretrained: None, ``"imagenet"`` (``$TORCH_HOME/hub/checkpoints/{backbone}_iabn_sync.pth.tar``) or
            the path of an InPlace-ABN ImageNet file (InPlace-ABN README).
        norm_act: ``"leaky_relu"`` (MiB/PLOP, slope 0.01) or ``"identity"`` (RCIL: slope 1.0,
            RCIL modules/residual.py).
        pooling_size: eval window of the head's image pooling (32; None = global mean).

    Raises:
        UserError: unknown backbone, output stride or norm_act, bad class counts, unusable weights.
    """
    check_backbone_args(backbone, output_stride)
    classes_per_step = check_classes_per_step(classes_per_step)
    if norm_act not in NORM_ACT_SLOPES:
        raise UserError(f"unknown norm_act {norm_act!r} for the MiB network: expected one of "
                        f"{', '.join(NORM_ACT_SLOPES)}")
    slope = NORM_ACT_SLOPES[norm_act]
    body = MiBResNet(backbone, output_stride, slope)
    if pretrained is not None:
        load_pretrained_body(body, pretrained)
    head = DeeplabV3Head(body.out_channels, output_stride, slope, pooling_size=pooling_size)
    return MiBDeepLab(body, head, classes_per_step, norm_act)
