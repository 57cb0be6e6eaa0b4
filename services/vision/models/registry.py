"""The one registry of model builders, shared by serving and training.

A builder is registered under a name with the defaults its weights imply (preprocessing preset, label
source, head type); `create_model` is the single door in. Modelled on timm's `register_model` /
`create_model` and torchvision's weights records: the preprocessing travels with the model so a service
can never pair a model with the wrong transform.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vision.core.errors import ConfigurationError
from vision.models.signature import FeatureLayer, InputGeometry, Signature

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class ArchitectureDefaults:
    """What an architecture's reference weights assume; a served model may override each field."""

    # Output width of the head for the reference weights.
    num_classes: int = 1000
    # Name of the preprocessing preset (vision.media.imaging.PRESETS) the reference weights were trained with.
    preset: str = "torchvision"
    # Label source: "imagenet" (torchvision's ImageNet-1k names), a path to a label file, or None when the
    # head has no default vocabulary (a served model must then give labels=FILE).
    labels: str | None = "imagenet"
    # "classification" (softmax over labels) or "multilabel" (sigmoid per label).
    task: str = "classification"
    # Returns the path of weights shipped with an installed package, or None when there are none offline.
    bundled_weights: Callable[[], Path] | None = None
    # How a foreign state dict maps onto this module's keys: "strict" or "by_order" (same shapes, other names).
    key_mapping: str = "strict"
    # Width of the pooled penultimate features (the `embedding` output).
    embedding_dim: int = 2048
    # Feature maps the architecture exposes as named outputs, shallow to deep; the last is the default
    # layer of pooled descriptors.
    layers: tuple[FeatureLayer, ...] = ()
    # Quality of the bundled weights as measured by their publisher (like torchvision's Weights.meta).
    metrics: tuple[tuple[str, float], ...] = ()
    geometry: InputGeometry = InputGeometry()


Builder = Callable[..., "nn.Module"]
# Wraps a built module so that its forward returns every output of `signature`, in `signature.outputs` order.
Taps = Callable[["nn.Module", Signature], "nn.Module"]


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    builder: Builder
    defaults: ArchitectureDefaults
    taps: Taps

    def signature(self, num_classes: int) -> Signature:
        d = self.defaults
        return Signature(num_classes=num_classes, embedding_dim=d.embedding_dim, layers=d.layers, geometry=d.geometry)


_REGISTRY: dict[str, RegisteredModel] = {}


def register_model(
    name: str, defaults: ArchitectureDefaults = ArchitectureDefaults(), *, taps: Taps
) -> Callable[[Builder], Builder]:
    """Decorator: register a keyword-only builder `fn(*, num_classes: int) -> nn.Module` under `name`;
    `taps` exposes its named outputs (see `with_outputs`)."""

    def decorate(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(
                f"model {name!r} is already registered by {_REGISTRY[name].builder.__module__}; pick another name"
            )
        _REGISTRY[name] = RegisteredModel(name=name, builder=fn, defaults=defaults, taps=taps)
        return fn

    return decorate


def list_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_architecture(name: str) -> RegisteredModel:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigurationError(
            f"unknown architecture {name!r}; registered: {', '.join(sorted(_REGISTRY))}"
        ) from None


def create_model(
    name: str, *, num_classes: int | None = None, weights: Path | None = None, pretrained: bool = True
) -> "nn.Module":
    """Build `name` in eval mode. `weights`: a state dict or registry checkpoint; None means the bundled
    weights when the architecture has some and `pretrained` is set, otherwise random initialisation."""
    import torch

    from vision.models.weights import load_weights

    entry = get_architecture(name)
    if weights is None and pretrained and entry.defaults.bundled_weights is not None:
        weights = entry.defaults.bundled_weights()
    # Random initialisation is seeded, so `weights=random` is the same model on every start: its ONNX export
    # can be cached, and engines can be compared on it. The caller's global RNG state is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = entry.builder(num_classes=entry.defaults.num_classes if num_classes is None else num_classes)
    if weights is not None:
        load_weights(module, Path(weights), key_mapping=entry.defaults.key_mapping)
    return module.eval()


def with_outputs(name: str, module: "nn.Module", num_classes: int) -> "nn.Module":
    """`module` (built by `name`'s builder) returning the tuple of every output of its signature: what is
    exported to ONNX and run by the torch backend, so every engine computes the same named outputs."""
    entry = get_architecture(name)
    return entry.taps(module, entry.signature(num_classes)).eval()
