"""Atrous Spatial Pyramid Pooling (BARM network/_deeplab.py::ASPP).

Key layout (BARM's state dict, utils/ckpt.py::save_ckpt): ``convs.0`` = 1x1 branch, ``convs.1..3`` = 3x3
atrous branches, ``convs.4`` = image pooling branch (index 0 is the pooling), ``project`` = 1x1 fusion +
Dropout(0.1).
"""
import torch
from torch import nn
from torch.nn import functional as F

#: ASPP atrous rates per output stride (BARM network/modeling.py::_segm_resnet).
ATROUS_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}

ASPP_CHANNELS = 256


def conv_bn_relu(in_channels, out_channels, kernel_size, dilation=1):
    """Sequential(conv without bias, BN, ReLU) keeping the spatial size (padding = dilation for 3x3)."""
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ASPPPooling(nn.Sequential):
    """Image pooling branch: global average pool, 1x1 conv, BN, ReLU, bilinear upsample (align_corners=False)."""

    def __init__(self, in_channels, out_channels):
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        size = x.shape[-2:]
        return F.interpolate(super().forward(x), size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """ASPP with five 256-channel branches, concatenated and projected to 256 channels (BARM network/_deeplab.py::ASPP).

    Args:
        in_channels: channels of the backbone output (2048 for ResNet-50/101, 512 for ResNet-18).
        atrous_rates: the three rates of the 3x3 branches, e.g. ``ATROUS_RATES[16]``.
    """

    def __init__(self, in_channels, atrous_rates):
        super().__init__()
        branches = [conv_bn_relu(in_channels, ASPP_CHANNELS, 1)]
        branches += [conv_bn_relu(in_channels, ASPP_CHANNELS, 3, dilation=rate) for rate in atrous_rates]
        branches.append(ASPPPooling(in_channels, ASPP_CHANNELS))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(branches) * ASPP_CHANNELS, ASPP_CHANNELS, 1, bias=False),
            nn.BatchNorm2d(ASPP_CHANNELS),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
        )

    def forward(self, x):
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))
