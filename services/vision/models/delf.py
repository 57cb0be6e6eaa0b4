"""DELF: attentive deep local features (Noh et al., "Large-Scale Image Retrieval with Attentive Deep Local
Features", ICCV 2017), the module and its training steps.

The module is the one the paper describes and tensorflow/models research/delf implements
(`training/model/delf_model.py`, checked 2026-11 with the search tool):

- **backbone**: ResNet-50 up to conv4_x — torchvision's `conv1` … `layer3`: 1024 channels, stride 16,
  receptive field 267 px, padding 133 (derived by `vision.models.receptive`; the TF-slim ResNet of the
  reference has 291 / 145 because its stride sits in another conv of the block);
- **attention head** on the *unnormalised* features: 1×1 conv 1024→512, BatchNorm, ReLU, 1×1 conv 512→1,
  softplus (the reference's `AttentionModel`: `attn_conv1`, `bn_conv1`, `attn_conv2`, `softplus`);
- **attention pooling**: the mean over cells of the L2-normalised features weighted by their scores (the
  reference's `feat`), the `embedding` output; the training-time classifier reads it.

Input preset `delf`: (x − 128) / 128 per channel, RGB (the reference's `NormalizePixelValues`).

Training is two-staged, as in the paper (`stage1_step`, `stage2_step`; the loop, datasets and checkpoints
are in `training/delf.py`):

1. fine-tune the backbone with cross-entropy on landmark classes, through a linear classifier on the
   average-pooled layer3 features (`DescriptorClassifier`, discarded after the stage);
2. freeze the backbone and train the attention head with cross-entropy through the module's
   `classifier`, a linear layer on the attention-pooled features.

A checkpoint of stage 2 holds the whole module; served with its class names (`labels=FILE`) it also
classifies landmarks, served with `labels=none` (the architecture's default) it is a pure DELF extractor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_CHANNELS = 1024
ATTENTION_HIDDEN = 512


class ResNetTrunk(nn.Module):
    """torchvision ResNet up to `layer3`, with torchvision's parameter names (conv1, bn1, layer1 … layer3),
    so the matching part of a torchvision ResNet-50 state dict loads into it as is."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


class AttentionHead(nn.Module):
    """Scores each feature-map cell: softplus(conv2(relu(bn(conv1(features))))), one channel, ≥ 0."""

    def __init__(self, channels: int = FEATURE_CHANNELS, hidden: int = ATTENTION_HIDDEN) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.bn = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, 1, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.conv2(F.relu(self.bn(self.conv1(features)))))


def attention_pool(features: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) features and (N, 1, H, W) scores → (N, C): mean of score × L2-normalised feature."""
    return (F.normalize(features, dim=1) * scores).mean(dim=(2, 3))


class Delf(nn.Module):
    """ResNet-50 trunk + attention head (+ a classifier on the attention-pooled features when
    `num_classes` > 0). `forward` returns the logits, or the pooled embedding without a classifier."""

    def __init__(self, *, num_classes: int = 0) -> None:
        super().__init__()
        import torchvision.models as tvm

        # weights=None: nothing is downloaded; weights come from a local file via create_model.
        self.backbone = ResNetTrunk(tvm.resnet50(weights=None))
        self.attention = AttentionHead()
        self.classifier = nn.Linear(FEATURE_CHANNELS, num_classes) if num_classes else None

    def local_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer3 feature map and its attention scores."""
        features = self.backbone(x)
        return features, self.attention(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedding = attention_pool(*self.local_features(x))
        return self.classifier(embedding) if self.classifier is not None else embedding


def load_backbone(model: Delf, state: dict[str, torch.Tensor]) -> int:
    """Initialise the backbone from a torchvision ResNet-50 (or DELF) state dict: the keys of conv1 …
    layer3 are taken, layer4 and fc are ignored. Returns how many tensors were loaded; raises ValueError
    when the state dict does not cover the whole trunk."""
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    target = model.backbone.state_dict()
    missing = sorted(set(target) - set(state))
    if missing:
        raise ValueError(f"state dict lacks {len(missing)} backbone tensors, e.g. {missing[:3]}")
    model.backbone.load_state_dict({k: state[k] for k in target}, strict=True)
    return len(target)


# --------------------------------------------------------------------------------------
# Training steps (the paper's two stages); the loop is training/delf.py
# --------------------------------------------------------------------------------------


class DescriptorClassifier(nn.Module):
    """Stage 1's head: a linear classifier on the average-pooled layer3 features."""

    def __init__(self, num_classes: int, channels: int = FEATURE_CHANNELS) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features.mean(dim=(2, 3)))


def stage1_parameters(model: Delf, head: DescriptorClassifier) -> list[nn.Parameter]:
    return [*model.backbone.parameters(), *head.parameters()]


def stage2_parameters(model: Delf) -> list[nn.Parameter]:
    if model.classifier is None:
        raise ValueError("stage 2 trains the attention through the classifier: build Delf(num_classes=N)")
    return [*model.attention.parameters(), *model.classifier.parameters()]


@dataclass(frozen=True)
class StepResult:
    loss: float
    # Training-batch predictions that were right (from the step's own forward pass).
    correct: int
    seen: int


def _finish(loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer) -> StepResult:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    correct = int((logits.detach().argmax(dim=1) == labels).sum())
    return StepResult(float(loss.detach()), correct, len(labels))


def stage1_step(
    model: Delf, head: DescriptorClassifier, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer
) -> StepResult:
    """One step of descriptor fine-tuning: cross-entropy through the pooled backbone features."""
    model.backbone.train()
    head.train()
    logits = head(model.backbone(images))
    return _finish(F.cross_entropy(logits, labels), logits, labels, optimizer)


def stage2_step(
    model: Delf,
    images: torch.Tensor | None,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    features: torch.Tensor | None = None,
) -> StepResult:
    """One step of attention training: the backbone is frozen (eval mode, no gradient, as the reference's
    stop_gradient on block3); cross-entropy through the classifier on attention-pooled features. A caller
    that does not augment may pass the trunk's `features` of the batch instead of recomputing them."""
    if model.classifier is None:
        raise ValueError("stage 2 needs Delf(num_classes=N)")
    if features is None:
        if images is None:
            raise ValueError("give images or their features")
        features = frozen_features(model, images)
    model.attention.train()
    logits = model.classifier(attention_pool(features, model.attention(features)))
    return _finish(F.cross_entropy(logits, labels), logits, labels, optimizer)


def frozen_features(model: Delf, images: torch.Tensor) -> torch.Tensor:
    """The trunk's layer3 features as stage 2 sees them (eval mode, no gradient)."""
    model.backbone.eval()
    with torch.no_grad():
        return model.backbone(images)
