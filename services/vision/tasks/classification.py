"""Classification: logits → the k most probable labels per image (softmax over the model's labels).

Also the numerically stable softmax/sigmoid and top-k that the other tasks use. Pure numpy, no gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from vision.core.errors import InvalidArgument
from vision.media.views import CENTER, ViewSpec
from vision.models.card import ModelCard
from vision.models.signature import LOGITS

if TYPE_CHECKING:
    from vision.tasks.contract import ViewOutputs

DEFAULT_TOP_K = 5


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=-1, keepdims=True)
    return shifted


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * logits) + 1.0)


def top_k_of(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k highest entries per row, highest first (ties: lower index first)."""
    k = min(k, scores.shape[-1])
    part = np.argpartition(-scores, k - 1, axis=-1)[..., :k]
    part_scores = np.take_along_axis(scores, part, axis=-1)
    order = np.lexsort((part, -part_scores), axis=-1)
    idx = np.take_along_axis(part, order, axis=-1)
    return idx, np.take_along_axis(scores, idx, axis=-1)


@dataclass(frozen=True)
class TopK:
    """Per image (rows): label indices and their probabilities, most probable first."""

    indices: np.ndarray
    scores: np.ndarray


class Classification:
    name = "classification"

    def validate(self, card: ModelCard, top_k: int) -> int:
        if not 1 <= top_k <= card.num_labels:
            raise InvalidArgument(f"top_k must be between 1 and {card.num_labels} for model {card.name!r}, got {top_k}")
        return top_k

    def views(self, card: ModelCard, top_k: int) -> ViewSpec:
        return CENTER

    def outputs(self, card: ModelCard, top_k: int) -> tuple[str, ...]:
        return (LOGITS,)

    def postprocess(self, card: ModelCard, outputs: "ViewOutputs", top_k: int) -> TopK:
        indices, scores = top_k_of(softmax(outputs.stacked(LOGITS).astype(np.float32, copy=False)), top_k)
        return TopK(indices, scores)


CLASSIFICATION = Classification()
