"""What a served model computes: its named outputs and the input geometry it accepts.

Every task reads the outputs it needs by name (Classification and Tagging read `logits`, Features reads
`embedding` or a feature map, DELF a feature map), so one exported graph serves all of them. The
signature is derived from the architecture's declared layers and the head width, never hand-written per
served model, so the ONNX export, the Triton config and the start-up output check all agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LOGITS = "logits"
# The pooled penultimate features (what the classifier head reads).
EMBEDDING = "embedding"
# DELF's attention scores: a one-channel map beside the feature map it weighs (vision.models.delf).
ATTENTION = "attention"


@dataclass(frozen=True)
class FeatureLayer:
    """A dense feature map the architecture exposes under `name`."""

    name: str
    channels: int
    # Input pixels per feature-map cell. Every registry architecture pads so that a side of n pixels gives
    # ceil(n / stride) cells, which `Signature.output_shape` relies on (checked at start-up).
    stride: int
    # Receptive field of one cell, the same along both axes: cell i sees input pixels [stride·i − padding,
    # stride·i − padding + receptive_field − 1] (tensorflow/models research/delf's receptive boxes). Derived
    # from the graph by vision.models.receptive, which a test holds these declarations to; 0 = unknown.
    receptive_field: int = 0
    padding: int = 0

    def centre(self, index: float) -> float:
        """Input-pixel coordinate of the centre of cell `index`'s receptive box (a DELF keypoint's location;
        `index` may be a numpy array)."""
        return self.stride * index - self.padding + (self.receptive_field - 1) / 2


@dataclass(frozen=True)
class InputGeometry:
    """Input sizes a model takes."""

    # Side of the square crop that crop views (centre, ten-crop) feed.
    crop_size: int = 224
    # True when the graph is fully convolutional up to global pooling, so any height x width is accepted
    # (full-resolution features, DELF pyramids); exported with dynamic height and width.
    variable: bool = True
    # Largest side a variable-size view may have, bounding memory per forward pass.
    max_side: int = 1024


@dataclass(frozen=True)
class Signature:
    # Head width; 0 for a pure feature extractor (no `logits` output).
    num_classes: int
    embedding_dim: int
    layers: tuple[FeatureLayer, ...] = ()
    geometry: InputGeometry = InputGeometry()

    @property
    def outputs(self) -> tuple[str, ...]:
        """Output names in graph order: logits (if any), embedding, then the feature maps."""
        head = (LOGITS,) if self.num_classes else ()
        return (*head, EMBEDDING, *(layer.name for layer in self.layers))

    def layer(self, name: str) -> FeatureLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def is_map(self, name: str) -> bool:
        return any(layer.name == name for layer in self.layers)

    def output_shape(self, name: str, height: int, width: int) -> tuple[int, ...]:
        """Shape of output `name` for one image of height x width (batch axis excluded)."""
        if name == LOGITS and self.num_classes:
            return (self.num_classes,)
        if name == EMBEDDING:
            return (self.embedding_dim,)
        layer = self.layer(name)
        return (layer.channels, math.ceil(height / layer.stride), math.ceil(width / layer.stride))

    def check(self, name: str, shape: tuple[int, ...], height: int, width: int) -> str | None:
        """Why a (batch-1) output of `shape` does not fit this signature, or None when it does."""
        if name not in self.outputs:
            return f"undeclared output {name!r}"
        want = (1, *self.output_shape(name, height, width))
        if tuple(shape) != want:
            hint = " (labels and head width disagree?)" if name == LOGITS else ""
            return f"output {name!r} has shape {tuple(shape)} for one {height}x{width} image, expected {want}{hint}"
        return None
