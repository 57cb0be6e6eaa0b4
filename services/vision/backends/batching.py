"""Cross-request dynamic batching for in-process backends.

Requests from many RPCs are queued; one worker thread runs forward passes one after another. While a pass
runs, new requests accumulate, so under load batches grow by themselves and at low load a lone request is
dispatched at once (no added latency). `max_wait_ms` > 0 additionally holds a non-full batch open a little.
Only inputs of one shape can share a forward pass, so a batch is formed from the oldest request and the
queued requests of the same shape behind it; requests of other shapes keep their place and head later
batches (a queue of mixed crops and full-resolution images still runs batched). A batch asks the engine
for the union of the outputs its requests want, and each request gets back only its own.
A failed batch is re-run request by request, so one bad request cannot fail its neighbours (the
Triton python_backend rule: a failure belongs to the request that caused it).

What a batch runs and how its answer goes back (`plan_batches`, `BatchPlan`, `run_plan`) and how a large
request is cut to the batch size (`chunks`, `joined`) are shared with the Ray runner's `@serve.batch`
path (vision.runners.ray.batching), so both make the same decisions.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from vision.backends.base import LOGITS, BatchingConfig, Outputs
from vision.core import tracing
from vision.core.errors import ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

# (inputs, output names) -> those outputs, each with one row per input row.
RunBatch = Callable[[np.ndarray, tuple[str, ...]], Outputs]


class BatchRequest(Protocol):
    """What a batch is made of: one caller's inputs (N, ...), the outputs it wants, and when it was queued."""

    inputs: np.ndarray
    outputs: tuple[str, ...]
    enqueued: float


@dataclass
class _Pending:
    inputs: np.ndarray
    outputs: tuple[str, ...]
    future: asyncio.Future[Outputs]
    enqueued: float
    # Still counted in the queue depth (a withdrawn request stops counting at once, not when popped).
    counted: bool = True
    # The caller's trace context (vision.core.tracing.capture), None when it is not traced.
    trace: object = None


@dataclass(frozen=True)
class BatchStats:
    """Reported once per forward pass, for metrics."""

    size: int
    queue_seconds: float
    run_seconds: float


# A request's answer, or the error that belongs to it.
Result = Outputs | Exception


def union(names: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    """The output names a batch asks for: every name any request wants, once, in first-asked order."""
    return tuple(dict.fromkeys(name for group in names for name in group))


def check_rows(outputs: Outputs, rows: int, wanted: tuple[str, ...]) -> None:
    """A model must answer every input row; a short answer would silently hand one caller another's rows."""
    missing = [name for name in wanted if name not in outputs]
    if missing:
        raise RuntimeError(f"model did not return the outputs {missing}")
    for name in wanted:
        value = outputs[name]
        if len(value) != rows:
            raise RuntimeError(f"model output {name!r} has {len(value)} rows for {rows} inputs")


@dataclass(frozen=True)
class BatchPlan:
    """One forward pass: queued requests of one input shape, run together on the union of their outputs.
    `positions` are the requests' places in the queue they were planned from, so each answer goes back to
    its caller."""

    requests: tuple[BatchRequest, ...]
    positions: tuple[int, ...]
    outputs: tuple[str, ...]

    @classmethod
    def of(cls, requests: Sequence[BatchRequest], positions: Sequence[int]) -> BatchPlan:
        return cls(tuple(requests), tuple(positions), union(r.outputs for r in requests))

    def inputs(self) -> np.ndarray:
        """The pass's input: the requests' rows, in order (a lone request's without a copy)."""
        if len(self.requests) == 1:
            return self.requests[0].inputs
        return np.concatenate([r.inputs for r in self.requests])

    def split(self, outputs: Outputs) -> list[Outputs]:
        """Each request's rows of the pass's `outputs`, only the outputs it asked for; RuntimeError when the
        model did not answer every row."""
        check_rows(outputs, sum(len(r.inputs) for r in self.requests), self.outputs)
        parts = []
        offset = 0
        for request in self.requests:
            n = len(request.inputs)
            parts.append({k: outputs[k][offset : offset + n] for k in request.outputs})
            offset += n
        return parts

    def singles(self) -> list[BatchPlan]:
        """The fallback when the merged pass fails: each request as a pass of its own."""
        return [BatchPlan.of((r,), (p,)) for r, p in zip(self.requests, self.positions, strict=True)]


def plan_batches(requests: Sequence[BatchRequest]) -> list[BatchPlan]:
    """The forward passes for `requests`: one per input shape (only one shape can share a pass), in the
    order each shape first appears, the requests in queue order within each."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for position, request in enumerate(requests):
        groups.setdefault(request.inputs.shape[1:], []).append(position)
    return [BatchPlan.of([requests[p] for p in positions], positions) for positions in groups.values()]


async def run_plan(
    plan: BatchPlan,
    forward: RunBatch,
    executor: concurrent.futures.Executor,
    deliver: Callable[[int, Result], None],
    *,
    withdrawn: Callable[[int], bool] | None = None,
) -> BatchStats | None:
    """Run `plan` as one forward pass on `executor` and `deliver` each request's answer by position; the
    pass's stats, or None when it failed. A failed pass of several requests is re-run request by request
    (skipping the `withdrawn`), so the error reaches only the requests that cause it; each is delivered as
    soon as its own pass ends."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    inputs = plan.inputs()
    try:
        outputs = await loop.run_in_executor(executor, forward, inputs, plan.outputs)
        parts = plan.split(outputs)
    except Exception as exc:
        if len(plan.requests) == 1:
            deliver(plan.positions[0], exc)
        else:
            for single in plan.singles():
                if withdrawn is None or not withdrawn(single.positions[0]):
                    await run_plan(single, forward, executor, deliver)
        return None
    finished = time.perf_counter()
    for position, part in zip(plan.positions, parts, strict=True):
        deliver(position, part)
    return BatchStats(len(inputs), started - min(r.enqueued for r in plan.requests), finished - started)


def chunks(inputs: np.ndarray, size: int) -> list[np.ndarray]:
    """`inputs` cut into pieces of at most `size` rows, in order (views, no copies): how a request larger
    than the batch is run."""
    return [inputs[i : i + size] for i in range(0, len(inputs), size)]


def joined(parts: Sequence[Outputs]) -> Outputs:
    """The answers to consecutive `chunks` as one answer (a single chunk's as it is)."""
    if len(parts) == 1:
        return parts[0]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


class DynamicBatcher:
    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int,
        max_wait_ms: float = 0.0,
        max_queue_images: int = 1024,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
        name: str = "model",
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._run_batch = run_batch
        self._max_batch = max_batch_size
        self._max_wait = max_wait_ms / 1000.0
        self._max_queue = max_queue_images
        self._on_batch = on_batch
        self._on_queue_depth = on_queue_depth
        self._name = name
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_images = 0
        self._wakeup = asyncio.Event()
        # One thread: forward passes use all intra-op threads; two at once would only contend. An engine that
        # must always run on one particular thread (torch, see torch_backend) passes its own executor.
        self._owns_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"infer-{name}"
        )
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # The batch the worker is running now, so close() can fail it instead of leaving callers waiting.
        self._running: list[_Pending] = []

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve(), name="dynamic-batcher")

    async def close(self) -> None:
        self._closed = True
        running = list(self._running)  # cancelling the worker clears it
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for pending in [*self._queue, *running]:
            _resolve(pending.future, exc=Unavailable("model is shutting down"))
        self._queue.clear()
        self._running = []
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    async def submit(self, inputs: np.ndarray, outputs: tuple[str, ...]) -> Outputs:
        """Run `inputs` (N, ...) through the model, batched with other callers' requests of the same shape,
        and return `outputs`; N may exceed the max batch size (it is split)."""
        if self._closed:
            raise Unavailable("model is shutting down")
        self.start()
        n = len(inputs)
        if self._queued_images + n > self._max_queue:
            raise ResourceExhausted(
                f"inference queue is full ({self._queued_images} images waiting, limit {self._max_queue}); "
                "retry with backoff"
            )
        if not self.alive():
            raise Unavailable("the inference worker has stopped; see the server log")
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        trace = tracing.capture()
        pendings = [
            _Pending(chunk, outputs, loop.create_future(), now, trace=trace) for chunk in chunks(inputs, self._max_batch)
        ]
        # Admitted whole (the queue limit counts every image now), but queued one chunk at a time: the next
        # chunk joins the queue behind whatever arrived meanwhile, so a 1-image request waits for at most one
        # chunk of a 64-image request instead of all four (measured: a Classify's max latency with 64-image
        # Tags in flight).
        self._queued_images += n
        results = []
        try:
            for pending in pendings:
                if self._closed:
                    raise Unavailable("model is shutting down")
                self._queue.append(pending)
                self._report_depth()
                self._wakeup.set()
                results.append(await pending.future)
        except BaseException:
            # Cancelled (deadline, client gone) or failed: withdraw our remaining chunks now, so they
            # neither run nor count against the queue limit.
            for pending in pendings:
                pending.future.cancel()
                self._uncount(pending)
            self._report_depth()
            raise
        return joined(results)

    def alive(self) -> bool:
        """False once the worker task has ended (it only ends on close, or on a bug it logged)."""
        return self._task is None or not self._task.done()

    def _uncount(self, pending: _Pending) -> None:
        if pending.counted:
            pending.counted = False
            self._queued_images -= len(pending.inputs)

    def _report_depth(self) -> None:
        if self._on_queue_depth is not None:
            self._on_queue_depth(self._queued_images)

    def _pop_live(self) -> _Pending | None:
        while self._queue:
            pending = self._queue.popleft()
            self._uncount(pending)
            if not pending.future.done():
                return pending
        return None

    async def _next_batch(self) -> list[_Pending]:
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        first = self._pop_live()
        if first is None:
            return []
        batch = [first]
        size = len(first.inputs)
        deadline = time.perf_counter() + self._max_wait
        while True:
            # Cleared before scanning, so a request queued after the scan still wakes the wait below.
            self._wakeup.clear()
            size = self._take_same_shape(batch, size)
            remaining = deadline - time.perf_counter()
            if size >= self._max_batch or remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        self._report_depth()
        return batch

    def _take_same_shape(self, batch: list[_Pending], size: int) -> int:
        """Move queued requests shaped like `batch[0]` into `batch` while they fit, oldest first; the first
        one that does not fit stops the scan and heads the next batch of its shape."""
        shape = batch[0].inputs.shape[1:]
        kept: collections.deque[_Pending] = collections.deque()
        while self._queue:
            pending = self._queue.popleft()
            if pending.future.done():
                self._uncount(pending)
                continue
            if pending.inputs.shape[1:] != shape:
                kept.append(pending)
                continue
            if size + len(pending.inputs) > self._max_batch:
                kept.append(pending)
                kept.extend(self._queue)
                self._queue.clear()
                break
            self._uncount(pending)
            batch.append(pending)
            size += len(pending.inputs)
        self._queue = kept
        return size

    async def _serve(self) -> None:
        while True:
            batch = await self._next_batch()
            self._running = [p for p in batch if not p.future.done()]
            if not self._running:
                continue
            try:
                await self._run(self._running)
            except Exception as exc:  # a bug here must fail this batch, never kill the worker
                log.exception("dynamic batcher failed a batch")
                for pending in self._running:
                    _resolve(pending.future, exc=exc)
            finally:
                self._running = []

    async def _run(self, batch: list[_Pending]) -> None:
        def deliver(position: int, result: Result) -> None:
            future = batch[position].future
            if isinstance(result, Exception):
                _resolve(future, exc=result)
            else:
                _resolve(future, result)

        # One plan: the batch was formed of one input shape (_take_same_shape).
        plan = BatchPlan.of(batch, range(len(batch)))
        traced = [p for p in batch if p.trace is not None]
        if traced:
            started_ns, started = tracing.now_ns(), time.perf_counter()
        stats = await run_plan(
            plan, self._run_batch, self._executor, deliver, withdrawn=lambda position: batch[position].future.done()
        )
        if stats is not None and self._on_batch is not None:
            self._on_batch(stats)
        if traced:
            self._trace(batch, traced, started_ns, started, tracing.now_ns())

    def _trace(self, batch: list[_Pending], traced: list[_Pending], started_ns: int, started: float, end_ns: int) -> None:
        """One `batch` span (under the first traced request, linked to every traced request) and, for each traced
        request, its `queue` wait and its `inference`, linked to the batch it ran in."""
        rows = sum(len(p.inputs) for p in batch)
        pass_span = tracing.record(
            "batch", traced[0].trace, started_ns, end_ns,
            {"vision.batch.size": rows, "vision.batch.requests": len(batch), "vision.model": self._name},
            links=[p.trace for p in traced[1:]],
        )
        for pending in traced:
            queued_ns = started_ns - int((started - pending.enqueued) * 1e9)
            tracing.record("queue", pending.trace, queued_ns, started_ns, {"vision.model": self._name})
            tracing.record(
                "inference", pending.trace, started_ns, end_ns,
                {"vision.model": self._name, "vision.rows": len(pending.inputs), "vision.batch.size": rows},
                links=[pass_span],
            )


def _resolve(future: asyncio.Future[Outputs], result: Outputs | None = None, exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        assert result is not None
        future.set_result(result)


class LocalBatchedBackend:
    """Mixin for in-process engines: the subclass implements `forward`; queueing, batching and the
    InferenceBackend lifecycle come from here, identical for every local engine."""

    def _init_batching(
        self,
        forward: RunBatch,
        *,
        batching: BatchingConfig,
        on_batch: Callable[[BatchStats], None] | None,
        on_queue_depth: Callable[[int], None] | None,
        name: str,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self._batcher = DynamicBatcher(
            forward,
            max_batch_size=batching.max_batch_size,
            max_wait_ms=batching.max_wait_ms,
            max_queue_images=batching.max_queue_images,
            on_batch=on_batch,
            on_queue_depth=on_queue_depth,
            name=name,
            executor=executor,
        )

    async def start(self) -> None:
        self._batcher.start()

    async def infer(self, batch: np.ndarray, outputs: tuple[str, ...] = (LOGITS,)) -> Outputs:
        return await self._batcher.submit(batch, outputs)

    def is_ready(self) -> bool:
        return self._batcher.alive()

    async def close(self) -> None:
        await self._batcher.close()
