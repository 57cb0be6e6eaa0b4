"""The contract between the data plane and the tasks: what a request carries (`TaskCall` of `EncodedImage`s),
what a task declares (`Task`: views, outputs, postprocessing) and what it gets back (`ViewOutputs`).

Transport-neutral: no protobuf, no gRPC, no model repository; servicers build a `TaskCall`, the data plane
runs it, each task module implements `Task`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

from vision.backends import Outputs
from vision.media.views import ViewSpec
from vision.models.card import ModelCard

P = TypeVar("P", contravariant=True)
# A request's parameters once validated and resolved against the model (e.g. Features' Recipe).
Q = TypeVar("Q")
R = TypeVar("R")


@dataclass(frozen=True)
class EncodedImage:
    """Transport-neutral view of a request image (the servicer converts from protobuf)."""

    id: str
    content: bytes


class ViewOutputs:
    """Model outputs of every view of every image of a request, views in image-major order, and each image's
    size. An image may have no views (one its ViewSpec accepts under the decode minimum, `min_side`)."""

    def __init__(
        self, views_per_image: list[int], groups: list[tuple[list[int], Outputs]], sizes: list[tuple[int, int]]
    ) -> None:
        self.views_per_image = views_per_image
        # (positions of the views in request order, their outputs stacked in that order) per input shape.
        self._groups = groups
        # (width, height) of each image as decoded, EXIF orientation applied: the image its views were cut
        # from. The original's size unless the ViewSpec lets JPEGs decode downsampled (`min_decode_side`).
        self.sizes = sizes

    def stacked(self, name: str) -> np.ndarray:
        """Output `name` of all views, (n_views, ...), in request order. Needs one shape across views and
        at least one view."""
        if len(self._groups) == 1:
            return self._groups[0][1][name]  # crop views: one forward group already in request order
        rows = self.per_view(name)
        return np.stack(rows)

    def per_view(self, name: str) -> list[np.ndarray]:
        """Output `name` of each view, without the batch axis, in request order (shapes may differ)."""
        rows: list[np.ndarray | None] = [None] * sum(self.views_per_image)
        for positions, outputs in self._groups:
            values = outputs[name]
            for row, position in enumerate(positions):
                rows[position] = values[row]
        return rows  # type: ignore[return-value]

    def per_image(self, name: str) -> list[list[np.ndarray]]:
        """Output `name` of each image's views."""
        rows = self.per_view(name)
        result, start = [], 0
        for count in self.views_per_image:
            result.append(rows[start : start + count])
            start += count
        return result


class Task(Protocol[P, Q, R]):
    """A task's model-facing half (vision.tasks.*): what to feed, what to read, how to turn it into results.

    `validate` checks a request's parameters against the model once and returns them resolved; the other
    three take that resolved form. `postprocess` runs in a worker thread: pure numpy over a whole request."""

    #: The capability a model must have (ModelCard.tasks) to be used for this task.
    name: str

    def validate(self, card: ModelCard, params: P) -> Q: ...

    def views(self, card: ModelCard, prepared: Q) -> ViewSpec: ...

    def outputs(self, card: ModelCard, prepared: Q) -> tuple[str, ...]: ...

    def postprocess(self, card: ModelCard, outputs: ViewOutputs, prepared: Q) -> R: ...


@dataclass(frozen=True)
class TaskCall(Generic[P]):
    model_name: str
    model_version: str
    images: Sequence[EncodedImage]
    params: P
