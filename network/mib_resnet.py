"""MiB / PLOP / RCIL's body: the InPlace-ABN ResNet (``mod1..mod5``) built from standard layers, and its ImageNet
weights (MiB models/resnet.py::ResNet, modules/residual.py::ResidualBlock, segmentation_module.py::make_model).

:class:`MiBResNet` is MiB's ResNet re-expressed with torch layers and :class:`network.abn.ABN` (InPlace-ABN's
numerics); its state dict uses the reference key names (``mod2.block1.convs.conv1.weight``, ...), so the
ImageNet file ``resnet101_iabn_sync.pth.tar`` loads by stripping its ``module.`` prefix
(:func:`load_iabn_pretrained`). The head, the classifiers and the assembled model are in ``network/mib.py``.
"""
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

from network.abn import ABN, IDENTITY, LEAKY_RELU, LEAKY_RELU_SLOPE, apply_activation
from network.backbone import check_backbone_args
from utils.checkpoint import load_checkpoint_file, strip_module_prefix
from utils.errors import UserError

log = logging.getLogger("ciss")

#: Blocks per module (mod2..mod5) and whether they are bottlenecks (MiB models/resnet.py::_NETS).
STRUCTURES = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
}
#: Dilation of mod2..mod5 per output stride (MiB models/resnet.py::ResNet). A module of dilation 1 other than
#: mod2 starts with a stride-2 block; a dilated module has stride 1 and the dilation in **all** its blocks.
MODULE_DILATIONS = {16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}
MODULES = ("mod2", "mod3", "mod4", "mod5")
STEM_CHANNELS = 64
#: Channels of mod2's blocks, doubled in every later module: bottleneck (1x1, 3x3, 1x1) and basic (3x3, 3x3).
BOTTLENECK_CHANNELS = (64, 64, 256)
BASIC_CHANNELS = (64, 64)

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

LISTED_KEYS = 5


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
# ImageNet weights
# --------------------------------------------------------------------------------------------------

def listed_keys(keys):
    keys = sorted(keys)
    shown = ", ".join(keys[:LISTED_KEYS])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > LISTED_KEYS else shown


def check_fit(module, state, source, expected_what):
    """Raise one :class:`UserError` line unless ``state`` has exactly ``module``'s keys and shapes
    (``num_batches_tracked`` may be absent)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    misshaped = [f"{k} {list(state[k].shape)} (expected {list(own[k].shape)})"
                 for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = [f"{label}: {listed_keys(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
    if problems:
        raise UserError(f"{source} does not fit {expected_what}; {'; '.join(problems)}")


def tensor_state(obj, source, container):
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
    state = tensor_state(load_checkpoint_file(path), f"pretrained file {path}", "state_dict")
    return {k: v for k, v in state.items() if not k.startswith(IMAGENET_CLASSIFIER_PREFIX)}


def load_iabn_pretrained(body, state_dict, source):
    """Load an InPlace-ABN ResNet state dict (from :func:`read_iabn_pretrained`) strictly into ``body``.

    ``num_batches_tracked`` may be absent. Raises :class:`UserError` naming ``source`` and the first
    missing, unexpected or mis-shaped keys.
    """
    check_fit(body, state_dict, f"pretrained weights {source}",
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
