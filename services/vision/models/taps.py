"""Forward passes that return every named output of a signature, in `Signature.outputs` order: what the
ONNX export carries and what the torch backend runs. One class per architecture family."""

from __future__ import annotations

import torch
from torch import nn

from vision.models.signature import ATTENTION, EMBEDDING, LOGITS, Signature


class _Taps(nn.Module):
    def __init__(self, net: nn.Module, signature: Signature) -> None:
        super().__init__()
        self.net = net
        self.names = signature.outputs

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every feature map the family exposes, by name, and the pooled `embedding`."""
        raise NotImplementedError

    def head(self, embedding: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        found = self.features(x)
        if LOGITS in self.names:  # a pure feature extractor has no head to run
            found[LOGITS] = self.head(found[EMBEDDING])
        return tuple(found[name] for name in self.names)


class ResNetOutputs(_Taps):
    """torchvision ResNet/ResNeXt: layer3 (stride 16), layer4 (stride 32), the pooled embedding, fc."""

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        layer3 = net.layer3(net.layer2(net.layer1(x)))
        layer4 = net.layer4(layer3)
        return {"layer3": layer3, "layer4": layer4, EMBEDDING: torch.flatten(net.avgpool(layer4), 1)}

    def head(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net.fc(embedding)


class EfficientNetOutputs(_Taps):
    """timm EfficientNet: every block's output as `blocks.<i>`, the head conv, the pooled embedding."""

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        net = self.net
        found: dict[str, torch.Tensor] = {}
        x = net.bn1(net.conv_stem(x))
        for index, block in enumerate(net.blocks):
            x = block(x)
            found[f"blocks.{index}"] = x
        found["conv_head"] = head = net.bn2(net.conv_head(x))
        found[EMBEDDING] = net.forward_head(head, pre_logits=True)
        return found

    def head(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net.classifier(embedding)


class DelfOutputs(_Taps):
    """DELF (vision.models.delf): the layer3 map, its attention scores, their attention-pooled embedding,
    and the classifier on that embedding."""

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        from vision.models.delf import attention_pool

        layer3, scores = self.net.local_features(x)
        return {"layer3": layer3, ATTENTION: scores, EMBEDDING: attention_pool(layer3, scores)}

    def head(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net.classifier(embedding)
