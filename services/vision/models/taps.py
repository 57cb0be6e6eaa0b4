"""Forward passes that return every named output of a signature, in `Signature.outputs` order: what the
ONNX export carries and what the torch backend runs. One class per architecture family."""

from __future__ import annotations

import torch
from torch import nn

from vision.models.signature import EMBEDDING, LOGITS, Signature


class ResNetOutputs(nn.Module):
    """torchvision ResNet/ResNeXt forward, returning logits, the pooled embedding and layer3/layer4."""

    def __init__(self, net: nn.Module, signature: Signature) -> None:
        super().__init__()
        self.net = net
        self.names = signature.outputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        layer3 = net.layer3(net.layer2(net.layer1(x)))
        layer4 = net.layer4(layer3)
        embedding = torch.flatten(net.avgpool(layer4), 1)
        found = {"layer3": layer3, "layer4": layer4, EMBEDDING: embedding}
        if LOGITS in self.names:
            found[LOGITS] = net.fc(embedding)
        return tuple(found[name] for name in self.names)


class EfficientNetOutputs(nn.Module):
    """timm EfficientNet forward, returning logits, the pooled embedding and the declared stage outputs."""

    def __init__(self, net: nn.Module, signature: Signature) -> None:
        super().__init__()
        self.net = net
        self.names = signature.outputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        net = self.net
        found: dict[str, torch.Tensor] = {}
        x = net.bn1(net.conv_stem(x))
        for index, block in enumerate(net.blocks):
            x = block(x)
            found[f"blocks.{index}"] = x
        found["conv_head"] = head = net.bn2(net.conv_head(x))
        found[EMBEDDING] = embedding = net.forward_head(head, pre_logits=True)
        if LOGITS in self.names:
            found[LOGITS] = net.classifier(embedding)
        return tuple(found[name] for name in self.names)
