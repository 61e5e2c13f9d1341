"""Segmentation networks for class-incremental segmentation (BARM network/modeling.py, SSUL network/_deeplab.py).

``build_model(name, classes_per_step, ...)`` builds a model of a registered *family* whose state dict uses
that family's reference key layout. A model name is a family, optionally suffixed with a backbone, e.g.
``deeplabv3bga_resnet101``. Families:

* ``deeplabv3bga``: BARM's background-adaptation head on the dilated torchvision ResNet;
* ``deeplabv3``: SSUL's per-step heads (``unknown=True`` adds SSUL's unknown channel);
* ``deeplabv3inc``: a plain incremental head (``head_pre`` + one 1x1 classifier per step);
* ``mib``: MiB/PLOP's DeepLab-v3 (``mod1..mod5`` ResNet, InPlace-ABN computed with standard layers, MiB
  segmentation_module.py::make_model; :mod:`network.mib`);
* ``rcil``: RCIL's dual-branch MiB network (:mod:`network.rcil`);
* ``dkd``: DKD's head (torchvision ASPP with ``last_conv``, auxiliary classifier, no background channel,
  DKD models/model.py::DeepLabV3; :mod:`network.dkd`).

A family is a builder ``(classes_per_step, backbone, output_stride, pretrained, **options) -> nn.Module``
registered in :data:`FAMILIES`, the one table of families (a new family is a new entry there; its name holds
no ``_``, which separates the backbone). Every model it builds returns ``(logits, features)`` with logits at
feature resolution, and has ``classes_per_step``, ``num_classes``, ``num_outputs`` and ``add_step(n_new)``.
"""
from network.aspp import ATROUS_RATES
from network.backbone import ARCHITECTURES, ResNetBackbone, check_backbone_args
from network.deeplab import DeepLabV3
from network.dkd import build_dkd_model
from network.heads import BackgroundAdaptationHead, IncrementalHead, SSULHead, check_classes_per_step
from network.mib import build_mib_model
from network.rcil import build_rcil_model
from network.pretrained import load_pretrained_backbone
from utils.errors import UserError

DEFAULT_BACKBONE = "resnet101"

__all__ = [
    "BackgroundAdaptationHead", "DeepLabV3", "IncrementalHead", "ResNetBackbone", "SSULHead",
    "build_model", "layout_of", "list_models", "split_model_name",
]


def _torchvision_deeplab(head_cls):
    """Builder of a DeepLabV3 made of the dilated torchvision ResNet and ``head_cls``."""

    def build(classes_per_step, backbone, output_stride, pretrained, **head_kwargs):
        net = ResNetBackbone(backbone, output_stride)
        if pretrained is not None:
            load_pretrained_backbone(net, pretrained)
        classifier = head_cls(net.out_channels, classes_per_step, ATROUS_RATES[output_stride], **head_kwargs)
        return DeepLabV3(net, classifier)

    build.__doc__ = f"DeepLabV3 with the dilated torchvision ResNet and :class:`{head_cls.__name__}`."
    return build


#: Model families: name -> builder(classes_per_step, backbone, output_stride, pretrained, **options).
FAMILIES = {
    "deeplabv3bga": _torchvision_deeplab(BackgroundAdaptationHead),
    "deeplabv3": _torchvision_deeplab(SSULHead),
    "deeplabv3inc": _torchvision_deeplab(IncrementalHead),
    "mib": build_mib_model,
    "dkd": build_dkd_model,
    "rcil": build_rcil_model,
}


#: The key that tells each layout apart, most specific first: ``(key prefix, layout)``, where a layout names the
#: families that write it and the repositories whose checkpoints have it (after ``module.`` is stripped and DKD's
#: keys are renamed by ``network.dkd.convert_reference_state_dict``).
LAYOUT_KEYS = (
    ("head.map_bn_new.", "rcil (RCIL's dual-branch network)"),
    ("head.map_bn.", "mib (MiB's and PLOP's network)"),
    ("classifier.last_conv.", "dkd (DKD's network)"),
    ("classifier.head.0.0.", "deeplabv3 (SSUL's network)"),
    ("classifier.head_pre.", "deeplabv3bga or deeplabv3inc (BARM's and KProBA's network)"),
)


def layout_of(state):
    """The layout a model state dict's keys have (an entry of :data:`LAYOUT_KEYS`), or None for none of them."""
    for prefix, layout in LAYOUT_KEYS:
        if any(key.startswith(prefix) for key in state):
            return layout
    return None


def list_models():
    """All accepted model names: each family alone and suffixed with each backbone."""
    return list(FAMILIES) + [f"{family}_{arch}" for family in FAMILIES for arch in ARCHITECTURES]


def split_model_name(name, backbone=None):
    """``(family, backbone)`` of a model name; ``backbone`` overrides the name's suffix (default resnet101)."""
    family, _, suffix = name.partition("_")
    if family not in FAMILIES or (suffix and suffix not in ARCHITECTURES):
        raise UserError(f"unknown model {name!r}: expected one of {', '.join(list_models())}")
    return family, backbone or suffix or DEFAULT_BACKBONE


def build_model(name, classes_per_step, backbone=None, output_stride=16, pretrained=None, **options):
    """Build a model for the classes of steps 0..t.

    Args:
        name: a name from :func:`list_models`; the backbone suffix may be left out.
        classes_per_step: class counts per step, step 0 including the background (VOC 15-1 at
            step 2: ``[16, 1, 1]``).
        backbone: ``"resnet18"``, ``"resnet50"`` or ``"resnet101"``; overrides the name's suffix.
            Default: the suffix, else resnet101.
        output_stride: 16 (ASPP rates 6/12/18) or 8 (12/24/36).
        pretrained: None (random backbone), ``"imagenet"`` (the family's ImageNet weights, e.g. BARM
            network/backbone/resnet.py::model_urls) or the path of a local weights file (see
            :mod:`network.pretrained`).
        **options: passed to the family's builder, e.g. ``unknown=True`` for the SSUL head.

    Raises:
        UserError: unknown name, backbone or output stride, bad class counts, or unusable weights.
    """
    family, arch = split_model_name(name, backbone)
    check_backbone_args(arch, output_stride)
    classes_per_step = check_classes_per_step(classes_per_step)
    return FAMILIES[family](classes_per_step, arch, output_stride, pretrained, **options)
