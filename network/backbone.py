"""Dilated torchvision ResNet backbone with stage taps (BARM network/backbone/resnet.py).

The backbone is torchvision's ResNet-18/50/101 (``weights=None``) with its strides replaced by
dilation, exactly as BARM's copy of it: ``replace_stride_with_dilation`` = [False, False, True] at
output stride 16 and [False, True, True] at output stride 8. The module keeps only the children of
BARM's ``IntermediateLayerGetter`` (``conv1, bn1, relu, maxpool, layer1..layer4``), so its
``state_dict`` keys are torchvision's without ``fc.*`` and ImageNet weights load unchanged.
"""
import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock, Bottleneck

from utils.errors import UserError

#: Backbone architectures and their torchvision constructors.
ARCHITECTURES = {"resnet18": models.resnet18, "resnet50": models.resnet50, "resnet101": models.resnet101}

#: ``replace_stride_with_dilation`` per output stride (BARM network/modeling.py::_segm_resnet).
DILATION_BY_OUTPUT_STRIDE = {16: [False, False, True], 8: [False, True, True]}

#: BatchNorm momentum of every backbone BN (BARM's ``set_bn_momentum(model.backbone, 0.01)``,
#: BARM trainer/trainer.py::Trainer.init_models).
BACKBONE_BN_MOMENTUM = 0.01

STAGES = ("layer1", "layer2", "layer3", "layer4")


def check_backbone_args(arch, output_stride):
    """Raise :class:`UserError` unless ``arch`` and ``output_stride`` are supported."""
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown backbone {arch!r}: expected one of {', '.join(ARCHITECTURES)}")
    if output_stride not in DILATION_BY_OUTPUT_STRIDE:
        valid = ", ".join(str(s) for s in sorted(DILATION_BY_OUTPUT_STRIDE))
        raise UserError(f"unsupported output stride {output_stride!r}: expected one of {valid}")


def _dilate_basic_blocks(net, replace_stride_with_dilation):
    """Dilate the stages of a BasicBlock ResNet in place, following torchvision's Bottleneck rule.

    torchvision's ``BasicBlock`` refuses dilation > 1, so ResNet-18 is built undilated and converted:
    in a dilated stage the first block keeps the previous dilation and loses its stride (in its
    strided 3x3 conv, ``conv1``, and in its 1x1 downsample); later blocks use the new dilation.
    Both 3x3 convs of a block use the block's dilation, with padding = dilation, so the spatial
    size is kept. Parameters and the state dict are unchanged.
    """
    dilation = 1
    for layer, dilate in zip((net.layer2, net.layer3, net.layer4), replace_stride_with_dilation):
        previous_dilation = dilation
        if not dilate:
            continue
        dilation *= 2
        first = layer[0]
        first.stride = 1
        first.conv1.stride = (1, 1)
        first.downsample[0].stride = (1, 1)
        for index, block in enumerate(layer):
            block_dilation = previous_dilation if index == 0 else dilation
            for conv in (block.conv1, block.conv2):
                conv.dilation = (block_dilation, block_dilation)
                conv.padding = (block_dilation, block_dilation)


def _residual_preact(block, x):
    """Run a torchvision block, returning ``(output, residual sum before the final ReLU)``.

    Same operations and order as the block's own ``forward``; only the last ReLU is applied out of
    place so that the pre-activation sum stays intact.
    """
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn1(block.conv1(x)))
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    elif isinstance(block, BasicBlock):
        out = block.relu(block.bn1(block.conv1(x)))
        out = block.bn2(block.conv2(out))
    else:
        raise TypeError(f"{type(block).__name__} has no forward_preact and is not a torchvision ResNet block")
    identity = x if block.downsample is None else block.downsample(x)
    pre = out + identity
    return torch.relu(pre), pre


class ResNetBackbone(nn.Module):
    """torchvision ResNet trunk at output stride 8 or 16 (BARM network/backbone/resnet.py).

    Children: ``conv1, bn1, relu, maxpool, layer1..layer4`` (no ``avgpool``/``fc``). Every BatchNorm
    has momentum 0.01. ``forward(x)`` returns a dict with ``out`` (layer4 output) and the
    post-activation stage outputs ``layer1``..``layer4``; when :attr:`return_preact` is True it also
    returns ``layer1_pre``..``layer4_pre``, the residual sum of the last block of each stage before
    its final ReLU (for PLOP-style distillation).

    Args:
        arch: ``"resnet18"``, ``"resnet50"`` or ``"resnet101"``.
        output_stride: 16 or 8.
    """

    def __init__(self, arch="resnet101", output_stride=16):
        super().__init__()
        check_backbone_args(arch, output_stride)
        dilation = DILATION_BY_OUTPUT_STRIDE[output_stride]
        # The whole torchvision model is built (fc included) so that random draws follow BARM
        # (network/modeling.py::_segm_resnet).
        if arch == "resnet18":
            net = ARCHITECTURES[arch](weights=None)
            _dilate_basic_blocks(net, dilation)
        else:
            net = ARCHITECTURES[arch](weights=None, replace_stride_with_dilation=dilation)
        self.arch = arch
        self.output_stride = output_stride
        self.out_channels = net.fc.in_features
        self.return_preact = False
        self.conv1 = net.conv1
        self.bn1 = net.bn1
        self.relu = net.relu
        self.maxpool = net.maxpool
        self.layer1 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        self.layer4 = net.layer4
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = BACKBONE_BN_MOMENTUM

    def swap_blocks(self, factory):
        """Replace every block of layer1..layer4 by ``factory(stage_idx, block_idx, old_block)``.

        ``stage_idx`` is 1..4 (``layer{stage_idx}``), ``block_idx`` counts from 0 within the stage.
        The new block's own settings (BN momentum included) are kept as the factory made them. A
        block may define ``forward_preact(x) -> (out, pre)``, used when :attr:`return_preact` is set.
        """
        for stage_idx, name in enumerate(STAGES, start=1):
            layer = getattr(self, name)
            for block_idx, old_block in enumerate(list(layer)):
                layer[block_idx] = factory(stage_idx, block_idx, old_block)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        taps = {}
        for name in STAGES:
            layer = getattr(self, name)
            if self.return_preact:
                *blocks, last = layer
                for block in blocks:
                    x = block(x)
                if hasattr(last, "forward_preact"):
                    x, pre = last.forward_preact(x)
                else:
                    x, pre = _residual_preact(last, x)
                taps[f"{name}_pre"] = pre
            else:
                x = layer(x)
            taps[name] = x
        return {"out": x, **taps}
