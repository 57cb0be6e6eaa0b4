"""The one interface every inference engine implements (torch, ONNX Runtime, Triton).

A backend takes a preprocessed float32 batch (N, C, H, W) and the names of the outputs the caller wants,
and returns those outputs, each (N, ...). Classification reads "logits"; Features and DELF read other
named outputs of the same model (the pooled embedding, a conv feature map): one loaded graph serves every
task, and a caller pays only for copying out what it asked for.
"""

from __future__ import annotations

import abc
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np

from vision.models.signature import LOGITS

Outputs = dict[str, np.ndarray]

# time.monotonic() by which the current RPC's caller gives up (None: no deadline). Set once per RPC by the
# transport layer; remote backends bound their waits and retries by it.
request_deadline: ContextVar[float | None] = ContextVar("request_deadline", default=None)


@dataclass(frozen=True)
class BatchingConfig:
    """Cross-request batching of an in-process backend."""

    # Largest forward pass; bigger requests are split.
    max_batch_size: int = 16
    # How long a non-full batch may wait for more requests. 0 = dispatch as soon as the engine is free,
    # which still batches under load because requests pile up while the previous pass runs.
    max_wait_ms: float = 0.0
    # Images allowed to wait; beyond this requests fail fast with RESOURCE_EXHAUSTED.
    max_queue_images: int = 1024


class InferenceBackend(abc.ABC):
    """One loaded model on one engine."""

    #: Engine name reported to clients and in metrics ("torch", "onnxruntime", "triton").
    kind: str = ""

    @abc.abstractmethod
    async def infer(self, batch: np.ndarray, outputs: tuple[str, ...] = (LOGITS,)) -> Outputs:
        """Forward `batch` (float32, N×C×H×W) and return `outputs` by name; safe to call concurrently,
        batching is the backend's job."""

    @abc.abstractmethod
    def is_ready(self) -> bool:
        """True when `infer` is expected to succeed now (model loaded, remote server reachable)."""

    async def start(self) -> None:
        """Acquire resources that need the event loop (batcher task, remote connections)."""

    async def close(self) -> None:
        """Release resources; pending requests fail with UNAVAILABLE."""
