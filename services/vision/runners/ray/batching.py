"""Cross-request batching under Ray: an engine's forward pass behind `@serve.batch`.

The in-process runner batches in `vision.backends.batching.DynamicBatcher`; under Ray the same job is done
by Ray Serve's batcher, with `--max-batch-size` (counted in images, through `batch_size_fn`) and
`--max-wait-ms` (its `batch_wait_timeout_s`). What our batcher does beyond that comes from the same plan
(vision.backends.batching: `plan_batches`, `run_plan`, `chunks`): requests of different input shapes are
run as separate forward passes, a request larger than the batch is split, a batch asks for the union of the
outputs its requests want, a failed batch is re-run request by request (one bad request cannot fail its
neighbours), and the batch-size, queue and inference metrics are recorded under the same names.

`EngineBatcher` runs in whichever replica holds the engine: the ingress (fused topology) or the inference
deployment (split). `BatchedEngineBackend` and `RemoteEngineBackend` are the two `InferenceBackend`s the
ingress's data plane sees.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from vision.backends.base import LOGITS, InferenceBackend, Outputs
from vision.backends.batching import Result, RunBatch, chunks, joined, plan_batches, run_plan
from vision.core import metrics


@dataclass
class BatchItem:
    inputs: np.ndarray
    outputs: tuple[str, ...]
    enqueued: float


def _images(items: list[BatchItem]) -> int:
    return sum(len(item.inputs) for item in items)


class EngineBatcher:
    """One model's forward pass behind `@serve.batch`; `infer` may be called concurrently."""

    def __init__(
        self,
        forward: RunBatch,
        executor: concurrent.futures.Executor,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        model: str,
        version: str,
    ) -> None:
        self._forward = forward
        self._executor = executor
        self.max_batch_size = max_batch_size
        self._batched = serve.batch(
            max_batch_size=max_batch_size, batch_wait_timeout_s=max_wait_ms / 1000.0, batch_size_fn=_images
        )(self._run)
        # Set while no forward pass runs. Ray's batcher forms the next batch as soon as the previous one is
        # formed (max_concurrent_batches only caps how many run), so with a 0 wait every request became its
        # own pass (97 images in 94 passes at 16 clients here). Holding new items while a pass runs and
        # handing them over together when it ends gives @serve.batch the whole backlog at once: the
        # in-process batcher's rule (a lone request goes at once, under load batches fill up).
        self._engine_free = asyncio.Event()
        self._engine_free.set()
        labels = {"model": model, "version": version}
        self._batch_size = metrics.BATCH_SIZE.labels(**labels)
        self._queue = metrics.STAGE_LATENCY.labels(stage="queue", **labels)
        self._inference = metrics.STAGE_LATENCY.labels(stage="inference", **labels)

    def configure(self, max_batch_size: int, max_wait_ms: float) -> None:
        """New batching settings without a restart (the deployment's `user_config`)."""
        self.max_batch_size = max_batch_size
        self._batched.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]
        self._batched.set_batch_wait_timeout_s(max_wait_ms / 1000.0)  # type: ignore[attr-defined]

    async def infer(self, inputs: np.ndarray, outputs: tuple[str, ...] = (LOGITS,)) -> Outputs:
        """`inputs` (N, ...) through the model, batched with other callers' inputs of the same shape; N may
        exceed the max batch size (it is split into chunks queued one after another)."""
        results = []
        for chunk in chunks(inputs, self.max_batch_size):
            enqueued = time.perf_counter()
            await self._engine_free.wait()
            result = await self._batched(BatchItem(chunk, outputs, enqueued))
            if isinstance(result, BaseException):
                raise result
            results.append(result)
        return joined(results)

    async def _run(self, items: list[BatchItem]) -> list[Result]:
        """@serve.batch's handler: one forward pass per input shape, results in item order; a failure
        belongs to the items that cause it."""
        self._engine_free.clear()
        try:
            return await self._run_plans(items)
        finally:
            self._engine_free.set()

    async def _run_plans(self, items: list[BatchItem]) -> list[Result]:
        results: list[Result | None] = [None] * len(items)

        def deliver(position: int, result: Result) -> None:
            results[position] = result

        for plan in plan_batches(items):
            stats = await run_plan(plan, self._forward, self._executor, deliver)
            if stats is not None:
                self._batch_size.observe(stats.size)
                self._queue.observe(stats.queue_seconds)
                self._inference.observe(stats.run_seconds)
        return results  # type: ignore[return-value]  # run_plan delivers to every position


class BatchedEngineBackend(InferenceBackend):
    """Fused topology: the engine in this replica, batched by `@serve.batch`."""

    def __init__(self, kind: str, batcher: EngineBatcher, close: Callable[[], Any] | None = None) -> None:
        self.kind = kind
        self.batcher = batcher
        self._close = close
        self._closed = False

    async def infer(self, batch: np.ndarray, outputs: tuple[str, ...] = (LOGITS,)) -> Outputs:
        return await self.batcher.infer(batch, outputs)

    def is_ready(self) -> bool:
        return not self._closed

    async def close(self) -> None:
        self._closed = True
        if self._close is not None:
            self._close()


class RemoteEngineBackend(InferenceBackend):
    """Split topology: the engine in the model's inference deployment, reached through its handle; requests
    are sent in chunks of at most the batch size so the remote batcher can interleave them."""

    def __init__(self, kind: str, handle: Any, max_batch_size: int) -> None:
        self.kind = kind
        self._handle = handle
        self._step = max_batch_size

    async def infer(self, batch: np.ndarray, outputs: tuple[str, ...] = (LOGITS,)) -> Outputs:
        # One chunk at a time, like the in-process batcher: a small request arriving meanwhile waits for one
        # chunk of a large one, not for all of them.
        return joined([await self._handle.infer.remote(chunk, outputs) for chunk in chunks(batch, self._step)])

    def is_ready(self) -> bool:
        return True
