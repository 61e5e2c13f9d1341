"""DeepLabV3 models for class-incremental segmentation (spec barm-ssul-kproba §2, §3, §12.1).

``build_model(name, classes_per_step, ...)`` builds a :class:`DeepLabV3` whose state dict uses the
BARM/SSUL key layout. Model names: ``deeplabv3bga`` (BARM head), ``deeplabv3`` (SSUL head),
``deeplabv3inc`` (plain incremental head), each optionally suffixed with a backbone, e.g.
``deeplabv3bga_resnet101``.
"""
from network.aspp import ATROUS_RATES
from network.backbone import ARCHITECTURES, ResNetBackbone, check_backbone_args
from network.deeplab import DeepLabV3
from network.heads import BackgroundAdaptationHead, IncrementalHead, SSULHead, check_classes_per_step
from network.pretrained import load_pretrained_backbone
from utils.errors import UserError

HEADS = {"deeplabv3bga": BackgroundAdaptationHead, "deeplabv3": SSULHead, "deeplabv3inc": IncrementalHead}

DEFAULT_BACKBONE = "resnet101"

__all__ = [
    "BackgroundAdaptationHead", "DeepLabV3", "IncrementalHead", "ResNetBackbone", "SSULHead",
    "build_model", "list_models",
]


def list_models():
    """All accepted model names: each head alone and suffixed with each backbone."""
    return [head for head in HEADS] + [f"{head}_{arch}" for head in HEADS for arch in ARCHITECTURES]


def build_model(name, classes_per_step, backbone=None, output_stride=16, pretrained=None, **head_kwargs):
    """Build a DeepLabV3 model for the classes of steps 0..t.

    Args:
        name: a name from :func:`list_models`; the backbone suffix may be left out.
        classes_per_step: class counts per step, step 0 including the background (VOC 15-1 at
            step 2: ``[16, 1, 1]``).
        backbone: ``"resnet18"``, ``"resnet50"`` or ``"resnet101"``; overrides the name's suffix.
            Default: the suffix, else resnet101.
        output_stride: 16 (ASPP rates 6/12/18) or 8 (12/24/36).
        pretrained: None (random backbone), ``"imagenet"`` (torchvision ImageNet weights, spec §3)
            or the path of a local weights file (see :mod:`network.pretrained`).
        **head_kwargs: passed to the head, e.g. ``unknown=True`` for the SSUL head.

    Raises:
        UserError: unknown name, backbone or output stride, bad class counts, or unusable weights.
    """
    head_name, _, suffix = name.partition("_")
    if head_name not in HEADS or (suffix and suffix not in ARCHITECTURES):
        raise UserError(f"unknown model {name!r}: expected one of {', '.join(list_models())}")
    arch = backbone or suffix or DEFAULT_BACKBONE
    check_backbone_args(arch, output_stride)
    classes_per_step = check_classes_per_step(classes_per_step)
    net = ResNetBackbone(arch, output_stride)
    if pretrained is not None:
        load_pretrained_backbone(net, pretrained)
    classifier = HEADS[head_name](net.out_channels, classes_per_step, ATROUS_RATES[output_stride], **head_kwargs)
    return DeepLabV3(net, classifier)
