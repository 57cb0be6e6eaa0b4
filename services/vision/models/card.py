"""The record of one set of served weights, as clients see it: name, version, labels, preprocessing,
signature, lineage, metrics (torchvision's `Weights.meta` and timm's pretrained config play this role).

What a task builds for the weights at load (the tagger, the whitenings, the DELF head) rides in
`artifacts`, keyed by task name, and each task reads its own through its accessor (`tagger_of`,
`whitenings_of`, `delf_of`): the card knows that a model can tag, not what tagging is.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vision.media.imaging import Preset
from vision.models.signature import Signature

TAGGING = "tagging"
FEATURES = "features"
DELF = "delf"


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    architecture: str
    # What the head computes: "classification" (softmax), "multilabel" (sigmoid) or "features" (no head).
    task: str
    labels: tuple[str, ...]
    preset: Preset
    backend: str
    signature: Signature
    weights_sha256: str = ""
    # Seeded random initialisation, served on purpose (`weights=random`): answers carry no meaning.
    random_weights: bool = False
    # Quality of these weights as published with them, e.g. (("imagenet_top1", 75.1),).
    metrics: tuple[tuple[str, float], ...] = ()
    # Task name -> what that task built for these weights: TAGGING -> its Tagger, FEATURES -> whitenings by
    # name, DELF -> its DelfModel. A TAGGING or DELF entry makes the model serve that task.
    artifacts: Mapping[str, Any] = field(default_factory=dict)
    # What the served graph computes in: "fp32", "fp16", or "int8" for a quantized ONNX file.
    precision: str = "fp32"

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @functools.cached_property  # asked twice per model on every request's lookup; the card never changes
    def tasks(self) -> frozenset[str]:
        """What the model can serve: its head's task, "features" (every model has a pooled embedding), and
        "tagging" / "delf" when it has a tagger / a DELF head."""
        return frozenset({self.task, FEATURES} | {t for t in (TAGGING, DELF) if self.artifacts.get(t) is not None})
