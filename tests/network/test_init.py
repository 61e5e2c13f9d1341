"""network/__init__.py: model assembly by name, the state-dict layout of the assembled models (BARM
network/_deeplab.py::DeepLabHeadBgA, SSUL network/_deeplab.py::DeepLabHead on BARM's ResNet-101 keys)."""
import pytest
from torchvision import models

from network import DeepLabV3, build_model, list_models
from utils.errors import UserError


BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var")


def bn_entries(prefix, channels):
    entries = {f"{prefix}.{suffix}": [channels] for suffix in BN_SUFFIXES}
    entries[f"{prefix}.num_batches_tracked"] = []
    return entries


def shapes(module):
    return {key: list(value.shape) for key, value in module.state_dict().items()}


@pytest.fixture(scope="module")
def resnet101_backbone_table():
    """Backbone part of BARM's state dict (BARM network/backbone/resnet.py): torchvision's ResNet-101 keys without
    ``fc``, under ``backbone.``."""
    table = {f"backbone.{k}": list(v.shape) for k, v in models.resnet101(weights=None).state_dict().items()
             if not k.startswith("fc.")}
    # Spot checks of the key table itself.
    assert table["backbone.layer3.22.conv1.weight"] == [256, 1024, 1, 1]
    assert table["backbone.layer4.0.downsample.0.weight"] == [2048, 1024, 1, 1]
    assert table["backbone.layer4.1.conv1.weight"] == [512, 2048, 1, 1]
    assert "backbone.layer3.23.conv1.weight" not in table
    return table


def aspp_table():
    """ASPP part of BARM's state dict (BARM network/_deeplab.py::ASPP), 2048 input channels."""
    table = {"classifier.aspp.convs.0.0.weight": [256, 2048, 1, 1], **bn_entries("classifier.aspp.convs.0.1", 256)}
    for branch in (1, 2, 3):
        table[f"classifier.aspp.convs.{branch}.0.weight"] = [256, 2048, 3, 3]
        table.update(bn_entries(f"classifier.aspp.convs.{branch}.1", 256))
    table["classifier.aspp.convs.4.1.weight"] = [256, 2048, 1, 1]
    table.update(bn_entries("classifier.aspp.convs.4.2", 256))
    table["classifier.aspp.project.0.weight"] = [256, 1280, 1, 1]
    table.update(bn_entries("classifier.aspp.project.1", 256))
    return table


def bga_classifier_table(classes_per_step):
    """BARM head part (BARM network/_deeplab.py::DeepLabHeadBgA): head_pre, one ear per incremental step, 1x1 heads
    (residual channel for k>=1)."""
    table = aspp_table()
    table["classifier.head_pre.0.weight"] = [256, 256, 3, 3]
    table.update(bn_entries("classifier.head_pre.1", 256))
    n_0, *incremental = classes_per_step
    for k, n_k in enumerate(incremental, start=1):
        table[f"classifier.ear.{k - 1}.0.weight"] = [256, 256, 3, 3]
        table.update(bn_entries(f"classifier.ear.{k - 1}.1", 256))
        table[f"classifier.head.{k}.weight"] = [n_k + 1, 256, 1, 1]
        table[f"classifier.head.{k}.bias"] = [n_k + 1]
    table["classifier.head.0.weight"] = [n_0, 256, 1, 1]
    table["classifier.head.0.bias"] = [n_0]
    return table


def ssul_classifier_table(head_channels):
    """SSUL's heads (SSUL network/_deeplab.py::DeepLabHead): per entry a 3x3 conv (.0), BN (.1) and a biased 1x1
    conv (.3)."""
    table = aspp_table()
    for i, channels in enumerate(head_channels):
        table[f"classifier.head.{i}.0.weight"] = [256, 256, 3, 3]
        table.update(bn_entries(f"classifier.head.{i}.1", 256))
        table[f"classifier.head.{i}.3.weight"] = [channels, 256, 1, 1]
        table[f"classifier.head.{i}.3.bias"] = [channels]
    return table


@pytest.mark.slow  # builds ResNet-101 models
@pytest.mark.parametrize("classes_per_step", [
    [16],                           # VOC 15-1, step 0
    [16, 1, 1, 1, 1, 1],            # VOC 15-1, step 5: head.1..5 with 2 outputs, ear.0..4
    [101, 10, 10, 10, 10, 10],      # ADE 100-10, step 5: head.1..5 with 11 outputs
])
def test_bga_resnet101_state_dict_matches_spec(classes_per_step, resnet101_backbone_table):
    model = build_model("deeplabv3bga_resnet101", classes_per_step)
    expected = {**resnet101_backbone_table, **bga_classifier_table(classes_per_step)}
    assert shapes(model) == expected
    assert model.num_classes == sum(classes_per_step)


@pytest.mark.slow  # builds ResNet-101 models
@pytest.mark.parametrize("unknown, head_channels", [(True, [1, 1, 15, 1]), (False, [16, 1])])
def test_ssul_resnet101_state_dict_matches_spec(unknown, head_channels, resnet101_backbone_table):
    model = build_model("deeplabv3_resnet101", [16, 1], unknown=unknown)
    assert shapes(model) == {**resnet101_backbone_table, **ssul_classifier_table(head_channels)}
    assert model.classifier.num_outputs == sum(head_channels)


def test_build_model_names_and_errors():
    names = list_models()
    assert {"deeplabv3bga", "deeplabv3bga_resnet101", "deeplabv3_resnet50", "deeplabv3inc_resnet18"} <= set(names)
    model = build_model("deeplabv3inc_resnet101", [3], backbone="resnet18")
    assert isinstance(model, DeepLabV3) and model.backbone.arch == "resnet18"
    assert build_model("deeplabv3", [3], backbone="resnet18").backbone.output_stride == 16
    with pytest.raises(UserError, match="deeplabv3bga_resnet101"):
        build_model("deeplabv3plus_resnet101", [3])
    with pytest.raises(UserError, match="unknown model"):
        build_model("deeplabv3bga_resnet34", [3])
    with pytest.raises(UserError, match="resnet18, resnet50, resnet101"):
        build_model("deeplabv3bga", [3], backbone="vgg16")
    with pytest.raises(UserError, match="output stride"):
        build_model("deeplabv3bga_resnet18", [3], output_stride=32)
    with pytest.raises(UserError, match="classes_per_step"):
        build_model("deeplabv3bga_resnet18", [])
    with pytest.raises(UserError, match=r"classes_per_step\[1\]"):
        build_model("deeplabv3bga_resnet18", [3, 0])
    with pytest.raises(UserError, match="unknown class"):
        build_model("deeplabv3_resnet18", [1], unknown=True)
