"""MiB / PLOP / RCIL DeepLab-v3 on an InPlace-ABN ResNet, built from standard layers (MiB
segmentation_module.py::make_model).

The network of MiB (``segmentation_module.py::IncrementalSegmentationModule``) re-expressed with torch
layers and :class:`network.abn.ABN` (InPlace-ABN's numerics): ``body`` (ResNet, modules ``mod1..mod5``),
``head`` (:class:`DeeplabV3Head`, MiB's ``DeeplabV3``) and ``cls`` (one 1x1 classifier per step). Its
state dict uses the reference key names (``body.mod2.block1.convs.conv1.weight``, ``head.map_bn.weight``,
``cls.0.bias``, ...), so released MiB/PLOP step checkpoints (``model_state`` with a ``module.`` prefix)
and the ImageNet file ``resnet101_iabn_sync.pth.tar`` load by stripping the prefix (:func:`load_mib_checkpoint`,
:func:`load_iabn_pretrained`).

``forward(x)`` returns ``(logits, features)``: logits at feature resolution (stride 16 or 8; the method
upsamples) and ``body`` (mod5 output), ``pre_logits`` (x_pl, the head output), ``sem_logits_small``
(= logits) and, when :attr:`MiBDeepLab.return_attentions` is set, ``attentions`` (PLOP
models/resnet.py::ResNet.forward): the pre-activation residual sums of the last block of mod2..mod5, then x_pl.
"""
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from network.abn import ABN, IDENTITY, IDENTITY_SLOPE, LEAKY_RELU, LEAKY_RELU_SLOPE, apply_activation
from network.backbone import check_backbone_args
from network.heads import check_class_count, check_classes_per_step
from utils.checkpoint import load_checkpoint_file, strip_module_prefix
from utils.errors import UserError

log = logging.getLogger("ciss")

#: Norm-layer activation per ``norm_act`` name: the leaky-ReLU slope of every ABN (MiB
#: segmentation_module.py::make_model; RCIL modules/residual.py).
NORM_ACT_SLOPES = {"leaky_relu": LEAKY_RELU_SLOPE, "identity": IDENTITY_SLOPE}

#: Blocks per module (mod2..mod5) and whether they are bottlenecks (MiB models/resnet.py::_NETS).
STRUCTURES = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
}

#: Dilation of mod2..mod5 per output stride (MiB models/resnet.py::ResNet). A module of dilation 1 other than
#: mod2 starts with a stride-2 block; a dilated module has stride 1 and the dilation in **all** its blocks.
MODULE_DILATIONS = {16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}

#: ASPP dilations of the head per output stride; OS8 uses (12, 24, 32), not 36 (MiB modules/deeplab.py).
HEAD_DILATIONS = {16: (6, 12, 18), 8: (12, 24, 32)}

MODULES = ("mod2", "mod3", "mod4", "mod5")
STEM_CHANNELS = 64
#: Channels of mod2's blocks, doubled in every later module: bottleneck (1x1, 3x3, 1x1) and basic (3x3, 3x3).
BOTTLENECK_CHANNELS = (64, 64, 256)
BASIC_CHANNELS = (64, 64)
#: Hidden and output channels of the head (``head_channels = 256`` in MiB segmentation_module.py::make_model).
HEAD_CHANNELS = 256
#: Eval-time pooling window of the head's image-pooling branch (``--pooling 32``, MiB modules/deeplab.py).
POOLING_SIZE = 32

#: Where PLOP mirrors the ImageNet InPlace-ABN ResNet-101 (PLOP's v1.0 release); nothing is downloaded.
IABN_IMAGENET_URL = (
    "https://github.com/arthurdouillard/CVPR2021_PLOP/releases/download/v1.0/resnet101_iabn_sync.pth.tar"
)
#: File name of the ImageNet weights (MiB's ``pretrained/{backbone}_{norm_act}.pth.tar``,
#: MiB segmentation_module.py::make_model).
IABN_IMAGENET_FILE = "{arch}_iabn_sync.pth.tar"
#: Prefix of the ImageNet classifier in the pretrained file, dropped before loading
#: (MiB segmentation_module.py::make_model).
IMAGENET_CLASSIFIER_PREFIX = "classifier."

_LISTED_KEYS = 5


# --------------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------------

class ResidualBlock(nn.Module):
    """MiB's ``ResidualBlock`` (MiB modules/residual.py::ResidualBlock): ``convs`` + optional
    ``proj_conv``/``proj_bn`` shortcut.

    Bottleneck (``channels`` of length 3): conv1 1x1 -> bn1 -> conv2 3x3 (stride, dilation, padding =
    dilation) -> bn2 -> conv3 1x1 -> bn3 (no activation). Basic (length 2): conv1 3x3 (stride,
    dilation) -> bn1 -> conv2 3x3 (dilation) -> bn2 (no activation). bn1/bn2 of a bottleneck and bn1 of
    a basic block are norm + LeakyReLU(``slope``). Shortcut: 1x1 conv with the block's stride + norm
    (no activation) when the stride is not 1 or the channels change, else the input. All convs are
    bias-free. Output: LeakyReLU_slope(convs(x) + shortcut(x)) (the slope of the norm layers, as MiB
    takes the block activation from ``bn1``).

    Attributes ``in_channels, channels, stride, dilation, slope`` let a block factory
    (:meth:`MiBResNet.swap_blocks`) build a replacement with the same geometry.
    """

    def __init__(self, in_channels, channels, stride=1, dilation=1, slope=LEAKY_RELU_SLOPE):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) not in (2, 3):
            raise ValueError(f"channels must have 2 (basic) or 3 (bottleneck) values, got {channels}")
        self.in_channels, self.channels = int(in_channels), channels
        self.stride, self.dilation, self.slope = int(stride), int(dilation), float(slope)
        if len(channels) == 3:
            layers = [
                ("conv1", nn.Conv2d(in_channels, channels[0], 1, bias=False)),
                ("bn1", ABN(channels[0], LEAKY_RELU, slope)),
                ("conv2", nn.Conv2d(channels[0], channels[1], 3, stride=stride, padding=dilation, dilation=dilation,
                                    bias=False)),
                ("bn2", ABN(channels[1], LEAKY_RELU, slope)),
                ("conv3", nn.Conv2d(channels[1], channels[2], 1, bias=False)),
                ("bn3", ABN(channels[2], IDENTITY)),
            ]
        else:
            layers = [
                ("conv1", nn.Conv2d(in_channels, channels[0], 3, stride=stride, padding=dilation, dilation=dilation,
                                    bias=False)),
                ("bn1", ABN(channels[0], LEAKY_RELU, slope)),
                ("conv2", nn.Conv2d(channels[0], channels[1], 3, padding=dilation, dilation=dilation, bias=False)),
                ("bn2", ABN(channels[1], IDENTITY)),
            ]
        self.convs = nn.Sequential(OrderedDict(layers))
        if stride != 1 or in_channels != channels[-1]:
            self.proj_conv = nn.Conv2d(in_channels, channels[-1], 1, stride=stride, bias=False)
            self.proj_bn = ABN(channels[-1], IDENTITY)

    def _residual_sum(self, x):
        shortcut = self.proj_bn(self.proj_conv(x)) if hasattr(self, "proj_conv") else x
        return self.convs(x) + shortcut

    def forward(self, x):
        return apply_activation(self._residual_sum(x), LEAKY_RELU, self.slope, inplace=True)

    def forward_preact(self, x):
        """``(output, pre)``: pre = convs(x) + shortcut(x) before the final activation, output =
        LeakyReLU(pre) computed out of place (PLOP's ``last=True`` block, PLOP
        modules/residual.py::ResidualBlock)."""
        pre = self._residual_sum(x)
        return apply_activation(pre, LEAKY_RELU, self.slope, inplace=False), pre


class MiBResNet(nn.Module):
    """MiB's ``ResNet`` body (MiB models/resnet.py::ResNet) with InPlace-ABN numerics.

    ``mod1`` = conv1 (7x7, stride 2, padding 3, 3 -> 64) -> bn1 (norm + LeakyReLU) -> pool1 (3x3 max
    pool, stride 2, padding 1); ``mod2..mod5`` = ``block1..blockN`` (:class:`ResidualBlock`), channels
    doubling per module. Output stride 16: dilations (1, 1, 1, 2), stride-2 first blocks in mod3 and
    mod4; output stride 8: (1, 1, 2, 4), stride 2 in mod3 only. A dilated module uses its dilation in
    every block, the first included.

    ``forward(x)`` returns a dict: ``out`` (mod5 output), ``stages`` (outputs of mod2..mod5) and
    ``preacts`` (when :attr:`return_preact` is set: the pre-activation sum of the last block of
    mod2..mod5, via the block's ``forward_preact``; else an empty list).

    Args:
        arch: ``"resnet18"``, ``"resnet50"`` or ``"resnet101"``.
        output_stride: 16 or 8.
        slope: leaky-ReLU slope of the norm layers and blocks (0.01; 1.0 for RCIL).
    """

    def __init__(self, arch="resnet101", output_stride=16, slope=LEAKY_RELU_SLOPE):
        super().__init__()
        check_backbone_args(arch, output_stride)
        structure, bottleneck = STRUCTURES[arch]
        self.arch, self.output_stride, self.slope = arch, output_stride, float(slope)
        self.return_preact = False
        self.mod1 = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, STEM_CHANNELS, 7, stride=2, padding=3, bias=False)),
            ("bn1", ABN(STEM_CHANNELS, LEAKY_RELU, slope)),
            ("pool1", nn.MaxPool2d(3, stride=2, padding=1)),
        ]))
        in_channels = STEM_CHANNELS
        channels = BOTTLENECK_CHANNELS if bottleneck else BASIC_CHANNELS
        for mod_index, (n_blocks, dilation) in enumerate(zip(structure, MODULE_DILATIONS[output_stride]), start=2):
            blocks = []
            for block_index in range(1, n_blocks + 1):
                stride = 2 if dilation == 1 and block_index == 1 and mod_index > 2 else 1
                blocks.append((f"block{block_index}",
                               ResidualBlock(in_channels, channels, stride=stride, dilation=dilation, slope=slope)))
                in_channels = channels[-1]
            self.add_module(f"mod{mod_index}", nn.Sequential(OrderedDict(blocks)))
            channels = tuple(2 * c for c in channels)
        self.out_channels = in_channels

    def swap_blocks(self, factory):
        """Replace every block by ``factory(mod_index, block_index, old_block)`` (e.g. RCIL's dual-branch block).

        ``mod_index`` is 2..5 and ``block_index`` 1..N, as in the key names ``mod{mod_index}.block{block_index}``;
        ``old_block`` carries its geometry (``in_channels, channels, stride, dilation, slope``). A block
        used as the last of a module while :attr:`return_preact` is set needs ``forward_preact(x) ->
        (out, tap)``.
        """
        for mod_index, name in enumerate(MODULES, start=2):
            module = getattr(self, name)
            for block_name, old_block in list(module.named_children()):
                block_index = int(block_name[len("block"):])
                setattr(module, block_name, factory(mod_index, block_index, old_block))

    def forward(self, x):
        x = self.mod1(x)
        stages, preacts = [], []
        for name in MODULES:
            module = getattr(self, name)
            if self.return_preact:
                *blocks, last = module.children()
                for block in blocks:
                    x = block(x)
                if not hasattr(last, "forward_preact"):
                    raise TypeError(f"{type(last).__name__} (last block of {name}) has no forward_preact(x) -> "
                                    "(out, tap): needed when return_preact is set")
                x, pre = last.forward_preact(x)
                preacts.append(pre)
            else:
                x = module(x)
            stages.append(x)
        return {"out": x, "stages": stages, "preacts": preacts}


# --------------------------------------------------------------------------------------------------
# Head
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------

def _listed(keys):
    keys = sorted(keys)
    shown = ", ".join(keys[:_LISTED_KEYS])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > _LISTED_KEYS else shown


def _check_fit(module, state, source, expected_what):
    """Raise one :class:`UserError` line unless ``state`` has exactly ``module``'s keys and shapes
    (``num_batches_tracked`` may be absent)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    misshaped = [f"{k} {list(state[k].shape)} (expected {list(own[k].shape)})"
                 for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = [f"{label}: {_listed(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
    if problems:
        raise UserError(f"{source} does not fit {expected_what}; {'; '.join(problems)}")


def _tensor_state(obj, source, container):
    """``obj[container]`` (or ``obj`` itself when it has no such entry) as a state dict without ``module.``."""
    if not isinstance(obj, Mapping):
        raise UserError(f"{source} holds a {type(obj).__name__}: expected a dict with '{container}'")
    state = obj.get(container, obj)
    if not isinstance(state, Mapping):
        raise UserError(f"{source}: '{container}' is a {type(state).__name__}, expected a dict of tensors")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserError(f"{source} is not a state dict: entry {not_tensors[0]!r} is a "
                        f"{type(state[not_tensors[0]]).__name__}, expected tensors only")
    # Deviation from PLOP, which strips 7 characters from every key (docs/differences.md): the prefix is stripped
    # only where present, so a file MiB's README had the user strip already is read correctly too.
    return strip_module_prefix(state)


def iabn_imagenet_path(arch):
    """Where ``pretrained="imagenet"`` looks for the InPlace-ABN ImageNet file of ``arch``:
    ``$TORCH_HOME/hub/checkpoints/{arch}_iabn_sync.pth.tar`` (torch.hub's cache)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", IABN_IMAGENET_FILE.format(arch=arch))


def read_iabn_pretrained(path):
    """Read ``resnet101_iabn_sync.pth.tar`` (InPlace-ABN README) and return the body state dict.

    The file is a dict with ``state_dict`` (keys with or without ``module.``, names as in MiB
    models/resnet.py::ResNet: ``mod1.conv1.weight``, ``mod2.block1.convs.bn1.running_var``,
    ``...proj_conv.weight``); the ImageNet classifier ``classifier.fc.*`` is dropped.
    """
    state = _tensor_state(load_checkpoint_file(path), f"pretrained file {path}", "state_dict")
    return {k: v for k, v in state.items() if not k.startswith(IMAGENET_CLASSIFIER_PREFIX)}


def load_iabn_pretrained(body, state_dict, source):
    """Load an InPlace-ABN ResNet state dict (from :func:`read_iabn_pretrained`) strictly into ``body``.

    ``num_batches_tracked`` may be absent. Raises :class:`UserError` naming ``source`` and the first
    missing, unexpected or mis-shaped keys.
    """
    _check_fit(body, state_dict, f"pretrained weights {source}",
               f"the InPlace-ABN {body.arch} body (expected {IABN_IMAGENET_FILE.format(arch=body.arch)}, "
               "the InPlace-ABN ImageNet file of MiB, PLOP and RCIL)")
    body.load_state_dict(state_dict, strict=True)


def load_pretrained_body(body, pretrained):
    """Load ``pretrained`` into ``body``: ``"imagenet"`` (the file in :func:`iabn_imagenet_path`) or a path.

    Nothing is downloaded: a missing file is a :class:`UserError` saying where to get it (InPlace-ABN
    README, PLOP's v1.0 release).
    """
    if pretrained == "imagenet":
        path = iabn_imagenet_path(body.arch)
        if not os.path.isfile(path):
            where = (f"download {IABN_IMAGENET_URL} (PLOP's mirror of mapillary's InPlace-ABN-sync ResNet-101)"
                     if body.arch == "resnet101" else
                     f"no public {body.arch} InPlace-ABN file is known (the ResNet-101 one is {IABN_IMAGENET_URL})")
            raise UserError(
                f"ImageNet weights for the MiB {body.arch} body are needed: {path} does not exist; {where} and "
                "put it there or pass it with --pretrained PATH, or train from random weights with --no_pretrained")
    else:
        path = str(pretrained)
        if not os.path.isfile(path):
            raise UserError(
                f"pretrained file {path} does not exist: expected {IABN_IMAGENET_FILE.format(arch=body.arch)} "
                f"(ResNet-101: {IABN_IMAGENET_URL})")
    load_iabn_pretrained(body, read_iabn_pretrained(path), path)
    log.info("loaded ImageNet InPlace-ABN weights into the %s body from %s", body.arch, path)


def read_mib_checkpoint(path):
    """The model state of a released MiB/PLOP step checkpoint (``{"model_state": ...}``, keys
    ``module.body.*``, ``module.head.*``, ``module.cls.*``), without the ``module.`` prefix."""
    return _tensor_state(load_checkpoint_file(path), f"checkpoint {path}", "model_state")


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
        state = _tensor_state(checkpoint, source, "model_state")
    _check_fit(model, state, source,
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
