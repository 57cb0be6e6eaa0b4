"""Remote inference on NVIDIA Triton Inference Server over gRPC (tritonclient's asyncio client).

Triton does the cross-request batching (its `dynamic_batching`), so this backend sends each request as it
comes. It pins the model version it was configured with, so the version in every response is the one
Triton served. Transient failures (Triton restarting, connection refused) are retried a bounded number of
times within the caller's deadline, then surface as UNAVAILABLE; a monitor task keeps `is_ready()` current
so the health service stops advertising SERVING while Triton or the model is down, and recovers by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import numpy as np

from vision.backends.base import InferenceBackend, Outputs, request_deadline
from vision.backends.batching import BatchStats
from vision.errors import DeadlineExceeded, FailedPrecondition, ResourceExhausted, Unavailable, VisionError

log = logging.getLogger(__name__)

class _AttemptTimedOut(Unavailable):
    """Triton took longer than the per-attempt timeout, before the caller's deadline."""


class _SharedMemoryPool:
    """System shared-memory regions for input tensors, registered with Triton: the service writes the batch
    into a region and sends only its name, instead of serialising the tensor into the gRPC message.
    Registrations live in the Triton process, so they are renewed whenever Triton comes back."""

    def __init__(self, prefix: str, regions: int, region_bytes: int) -> None:
        import tritonclient.utils.shared_memory as shm

        self._shm = shm
        self.region_bytes = region_bytes
        self._names = [f"{prefix}_{i}" for i in range(regions)]
        self._handles = {name: shm.create_shared_memory_region(name, f"/{name}", region_bytes) for name in self._names}
        self._free: asyncio.Queue[str] = asyncio.Queue()
        for name in self._names:
            self._free.put_nowait(name)

    async def register(self, client: object) -> None:
        for name in self._names:
            try:
                await client.unregister_system_shared_memory(name)  # type: ignore[attr-defined]
            except Exception:  # not registered yet: fine
                pass
            await client.register_system_shared_memory(name, f"/{name}", self.region_bytes)  # type: ignore[attr-defined]

    async def acquire(self) -> str:
        return await self._free.get()

    def release(self, name: str) -> None:
        self._free.put_nowait(name)

    def write(self, name: str, array: np.ndarray) -> None:
        self._shm.set_shared_memory_region(self._handles[name], [array])

    def destroy(self) -> None:
        for handle in self._handles.values():
            self._shm.destroy_shared_memory_region(handle)
        self._handles.clear()




class TritonBackend(InferenceBackend):
    kind = "triton"

    def __init__(
        self,
        url: str,
        model_name: str,
        model_version: str,
        *,
        input_name: str = "images",
        output_names: tuple[str, ...] = ("logits",),
        timeout_s: float = 10.0,
        retries: int = 3,
        health_interval_s: float = 1.0,
        on_batch: Callable[[BatchStats], None] | None = None,
        shared_memory_bytes: int = 0,
        shared_memory_regions: int = 16,
    ) -> None:
        self._url = url
        self._model = model_name
        self._version = model_version
        self._input_name = input_name
        self.output_names = output_names
        self._timeout = timeout_s
        self._retries = retries
        self._health_interval = health_interval_s
        self._on_batch = on_batch
        self._client = None
        self._ready = False
        self._monitor: asyncio.Task[None] | None = None
        # 0 disables shared memory; otherwise the size of each region (requests that don't fit use gRPC).
        self._shm_bytes = shared_memory_bytes
        self._shm_regions = shared_memory_regions
        self._shm: _SharedMemoryPool | None = None
        self._max_batch: int | None = None  # None: not read from Triton yet

    async def start(self) -> None:
        import tritonclient.grpc.aio as triton_grpc

        if self._shm_bytes:
            import os

            self._shm = _SharedMemoryPool(f"vision_{os.getpid()}_{self._model}", self._shm_regions, self._shm_bytes)
        self._client = triton_grpc.InferenceServerClient(
            url=self._url,
            channel_args=[
                # tritonclient's own defaults (replaced wholesale when channel_args is given).
                ("grpc.max_send_message_length", 2**31 - 1),
                ("grpc.max_receive_message_length", 2**31 - 1),
                # gRPC's reconnect backoff grows to 120 s by default: a Triton restart would then go unnoticed
                # for minutes. Cap it so the service recovers within about a second of Triton coming back.
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        await self._check_ready()
        if not self._ready:
            log.warning("Triton model %s version %s is not ready at %s yet", self._model, self._version, self._url)
        self._monitor = asyncio.get_running_loop().create_task(self._watch(), name=f"triton-health-{self._model}")

    async def _check_ready(self) -> bool:
        assert self._client is not None
        was_ready = self._ready
        try:
            ready = bool(await self._client.is_model_ready(self._model, self._version, client_timeout=self._health_interval))
            if ready and not was_ready:
                self._max_batch = None  # the model may have been reloaded with another config
                await self._fetch_max_batch()
                if self._shm is not None:
                    # A (re)started Triton knows none of our regions.
                    await self._shm.register(self._client)
            self._ready = ready
        except Exception:  # any transport error means "not ready"; the reason is in the next infer's error
            self._ready = False
        return self._ready

    async def _watch(self) -> None:
        while True:
            was_ready = self._ready
            await self._check_ready()
            if was_ready != self._ready:
                log.warning("Triton model %s version %s is %s", self._model, self._version, "ready" if self._ready else "NOT ready")
            await asyncio.sleep(self._health_interval)

    def is_ready(self) -> bool:
        return self._ready

    async def _fetch_max_batch(self) -> None:
        """Triton refuses requests above the model's max_batch_size; learn it to split larger requests."""
        if self._max_batch is not None or self._client is None:
            return
        try:
            config = await self._client.get_model_config(self._model, self._version, as_json=True, client_timeout=5)
            # 0 (a model without batching) is remembered too, so it is not asked again on every request.
            self._max_batch = int(config["config"].get("max_batch_size", 0))
        except Exception:  # not reachable yet: asked again on the next readiness change
            log.debug("cannot read Triton's config for %s yet", self._model, exc_info=True)

    async def infer(self, batch: np.ndarray) -> Outputs:
        if self._client is None:
            raise Unavailable("Triton backend is not started")
        await self._fetch_max_batch()
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        step = self._max_batch or len(batch)
        if len(batch) <= step:
            return await self._infer_chunk(batch)
        # Sent concurrently: Triton's dynamic batcher schedules the chunks as it sees fit.
        parts = await asyncio.gather(*(self._infer_chunk(batch[i : i + step]) for i in range(0, len(batch), step)))
        return {name: np.concatenate([p[name] for p in parts]) for name in self.output_names}

    async def _infer_chunk(self, batch: np.ndarray) -> Outputs:
        import tritonclient.grpc.aio as triton_grpc

        inputs = [triton_grpc.InferInput(self._input_name, list(batch.shape), "FP32")]
        outputs = [triton_grpc.InferRequestedOutput(name) for name in self.output_names]
        region = None
        try:
            if self._shm is not None and batch.nbytes <= self._shm.region_bytes:
                region = await self._shm.acquire()
                self._shm.write(region, batch)
                inputs[0].set_shared_memory(region, batch.nbytes)
            else:
                inputs[0].set_data_from_numpy(batch)
            return await self._infer_with_retries(inputs, outputs, len(batch))
        finally:
            if region is not None:
                self._shm.release(region)  # type: ignore[union-attr]

    async def _infer_with_retries(self, inputs: list, outputs: list, n: int) -> Outputs:
        from tritonclient.utils import InferenceServerException

        # The caller's gRPC deadline bounds everything; --triton-timeout-s bounds each attempt.
        deadline = request_deadline.get() or time.monotonic() + self._timeout * (self._retries + 1)
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"the deadline passed while waiting for Triton (model {self._model!r})")
            started = time.perf_counter()
            try:
                result = await self._client.infer(  # type: ignore[union-attr]
                    self._model,
                    inputs,
                    model_version=self._version,
                    outputs=outputs,
                    client_timeout=min(remaining, self._timeout),
                )
            except InferenceServerException as exc:
                error = self._translate(exc, deadline)
                # A timed-out attempt may still be running on Triton: retrying would pile more work on it.
                retry = isinstance(error, Unavailable) and not isinstance(error, _AttemptTimedOut)
                if not retry or attempt >= self._retries:
                    raise error from None
                attempt += 1
                await asyncio.sleep(min(0.05 * 2**attempt, max(0.0, deadline - time.monotonic())))
                await self._check_ready()  # also renews shared-memory registrations after a Triton restart
                continue
            if self._on_batch is not None:
                self._on_batch(BatchStats(n, 0.0, time.perf_counter() - started))
            return {name: result.as_numpy(name) for name in self.output_names}

    def _translate(self, exc: Exception, deadline: float) -> VisionError:
        status = str(getattr(exc, "status", lambda: "")() or "")
        message = getattr(exc, "message", lambda: str(exc))() or str(exc)
        where = f"Triton at {self._url}, model {self._model!r} version {self._version!r}"
        lowered = message.lower()
        if "shared memory" in lowered and "not" in lowered:
            # Triton restarted between two health probes and forgot our regions: transient, re-registered.
            self._ready = False
            return Unavailable(f"{where} lost its shared-memory registrations: {message}")
        if status == "StatusCode.RESOURCE_EXHAUSTED":
            return ResourceExhausted(f"{where} is overloaded: {message}; retry with backoff")
        if status == "StatusCode.DEADLINE_EXCEEDED" or "deadline exceeded" in lowered:
            if time.monotonic() >= deadline:
                return DeadlineExceeded(f"the deadline passed while waiting for {where}")
            return _AttemptTimedOut(f"{where} did not answer within --triton-timeout-s ({self._timeout:g} s)")
        if status in ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED") or "failed to connect" in lowered:
            self._ready = False
            return Unavailable(f"{where} is unavailable: {message}")
        if status == "StatusCode.NOT_FOUND" or "not ready" in lowered or "unknown model" in lowered:
            return FailedPrecondition(f"{where} is not loaded: {message}")
        return VisionError(f"{where} failed: {message}")

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            try:
                await self._monitor
            except asyncio.CancelledError:
                pass
        if self._client is not None:
            if self._shm is not None and self._ready:
                for name in self._shm._names:
                    try:
                        await self._client.unregister_system_shared_memory(name)
                    except Exception:  # Triton gone: its registrations went with it
                        pass
            await self._client.close()
        if self._shm is not None:
            self._shm.destroy()
