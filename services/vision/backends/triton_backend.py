"""Remote inference on NVIDIA Triton Inference Server over gRPC (tritonclient's asyncio client).

Triton does the cross-request batching (its `dynamic_batching`), so this backend sends each request as it
comes, asking Triton for only the outputs the caller wants. It pins the model version it was configured
with, so the version in every response is the one Triton served. Transient failures (Triton restarting,
connection refused, the version reloading) are retried a bounded number of times within the caller's
deadline, then surface as UNAVAILABLE; a monitor task keeps `is_ready()` current so the health service
stops advertising SERVING while Triton or the model is down, and recovers by itself.

Whenever the pinned version (re)appears, it is checked against the served model's signature: one forward
pass of a blank crop, every output requested, each shape checked (`Signature.check`). A model that does not
fit (say a 10-class export behind 12 labels) stops start-up with ConfigurationError; found later, it keeps
the backend not ready and every request fails with FAILED_PRECONDITION naming the reason, instead of health
saying SERVING while each request would fail deep in postprocessing.

Nothing here imports torch: `--backend triton` serves without it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vision.backends.base import InferenceBackend, Outputs, request_deadline
from vision.backends.batching import BatchStats, chunks, joined
from vision.core import tracing
from vision.core.errors import (
    ConfigurationError,
    DeadlineExceeded,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
    VisionError,
)
from vision.models.signature import LOGITS, Signature

log = logging.getLogger(__name__)


class _AttemptTimedOut(Unavailable):
    """Triton took longer than the per-attempt timeout, before the caller's deadline."""


class _Transient(Exception):
    """The check of a newly ready version could not run (Triton went away meanwhile): try again later."""


def _status(exc: Exception) -> str:
    """The gRPC status tritonclient reports, e.g. "StatusCode.NOT_FOUND" ("" when it has none)."""
    status = getattr(exc, "status", None)
    return str(status() or "") if callable(status) else ""


def _message(exc: Exception) -> str:
    message = getattr(exc, "message", None)
    return str(message() if callable(message) else exc) or str(exc)


class _SharedMemoryPool:
    """System shared-memory regions for input tensors, registered with Triton: the service writes the batch
    into a region and sends only its name, instead of serialising the tensor into the gRPC message.
    Registrations live in the Triton process, so they are renewed whenever Triton comes back.

    Region names (the /dev/shm key and Triton's registration name are the same) carry the process, the
    model, the version and a nonce of this pool: two backends in one process, such as two versions of one
    model, must never write into each other's regions, and `create_only` makes a clash an error at start-up
    instead of silently shared memory."""

    def __init__(self, model: str, version: str, regions: int, region_bytes: int) -> None:
        import tritonclient.utils.shared_memory as shm

        self._shm = shm
        self.region_bytes = region_bytes
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{model}_v{version}")
        prefix = f"vision_{os.getpid()}_{safe}_{uuid.uuid4().hex[:8]}"
        self.names = [f"{prefix}_{i}" for i in range(regions)]
        self._handles: dict[str, Any] = {}
        try:
            for name in self.names:
                self._handles[name] = shm.create_shared_memory_region(
                    name, f"/{name}", region_bytes, create_only=True
                )
        except Exception:
            self.destroy()
            raise
        self._free: asyncio.Queue[str] = asyncio.Queue()
        for name in self.names:
            self._free.put_nowait(name)

    async def register(self, client: Any) -> None:
        for name in self.names:
            try:
                await client.unregister_system_shared_memory(name)
            except Exception:  # noqa: BLE001 - not registered (a fresh Triton): nothing to undo
                pass
            await client.register_system_shared_memory(name, f"/{name}", self.region_bytes)

    async def unregister(self, client: Any) -> None:
        for name in self.names:
            try:
                await client.unregister_system_shared_memory(name)
            except Exception:  # noqa: BLE001 - Triton gone: its registrations went with it
                pass

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


@dataclass(frozen=True)
class TritonTLS:
    """TLS to Triton's gRPC endpoint: the CA to trust, a client certificate for mutual TLS, a name override."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None


class TritonBackend(InferenceBackend):
    kind = "triton"

    def __init__(
        self,
        url: str,
        model_name: str,
        model_version: str,
        *,
        signature: Signature,
        input_name: str = "images",
        timeout_s: float = 10.0,
        retries: int = 3,
        health_interval_s: float = 1.0,
        on_batch: Callable[[BatchStats], None] | None = None,
        shared_memory_bytes: int = 0,
        shared_memory_regions: int = 16,
        tls: TritonTLS | None = None,
    ) -> None:
        self._url = url
        self._model = model_name
        self._version = model_version
        self._input_name = input_name
        self.signature = signature
        self.output_names = signature.outputs
        self._timeout = timeout_s
        self._retries = retries
        self._health_interval = health_interval_s
        self._on_batch = on_batch
        self._client: Any = None
        self._ready = False
        # What Triton said at the last probe, and the config the last signature check ran against: a check
        # runs again when the version reappears or its config changes (a reload with another config).
        self._triton_ready = False
        self._checked_config: dict[str, Any] | None = None
        # Why the served version does not fit the signature (None: it fits, or it was not checked yet).
        self._mismatch: str | None = None
        # The monitor and a retrying request may probe at once; one probe at a time keeps the shared-memory
        # re-registration and the signature check from running twice over each other.
        self._probe_lock = asyncio.Lock()
        self._monitor: asyncio.Task[None] | None = None
        # 0 disables shared memory; otherwise the size of each region (requests that don't fit use gRPC).
        self._shm_bytes = shared_memory_bytes
        self._shm_regions = shared_memory_regions
        self._shm: _SharedMemoryPool | None = None
        self._max_batch: int | None = None  # None: not read from Triton yet
        self._tls = tls

    @property
    def _where(self) -> str:
        return f"Triton model {self._model!r} version {self._version} at {self._url}"

    async def start(self) -> None:
        import tritonclient.grpc.aio as triton_grpc

        if self._shm_bytes:
            self._shm = _SharedMemoryPool(self._model, self._version, self._shm_regions, self._shm_bytes)
        tls = self._tls
        self._client = triton_grpc.InferenceServerClient(
            url=self._url,
            # tritonclient's own TLS: it reads the PEM files and builds the channel credentials.
            ssl=tls is not None,
            root_certificates=str(tls.ca) if tls else None,
            private_key=str(tls.key) if tls and tls.key else None,
            certificate_chain=str(tls.cert) if tls and tls.cert else None,
            channel_args=[
                *([("grpc.ssl_target_name_override", tls.server_name)] if tls and tls.server_name else []),
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
        await self._probe(starting=True)
        if self._mismatch is not None:
            reason = self._mismatch
            await self.close()
            raise ConfigurationError(f"{self._where} does not fit the served model: {reason}")
        if not self._triton_ready:
            log.warning("%s is not ready yet", self._where)
        self._monitor = asyncio.get_running_loop().create_task(self._watch(), name=f"triton-health-{self._model}")

    async def _probe(self, starting: bool = False) -> None:
        """Ask Triton whether the pinned version is ready; check it against the signature when it is new."""
        async with self._probe_lock:
            await self._probe_locked(starting)

    async def _probe_locked(self, starting: bool) -> None:
        assert self._client is not None
        try:
            ready = bool(
                await self._client.is_model_ready(self._model, self._version, client_timeout=self._health_interval)
            )
            config = None
            if ready:
                config = await self._client.get_model_config(
                    self._model, self._version, as_json=True, client_timeout=self._health_interval
                )
        except Exception:  # noqa: BLE001 - any transport error means "not ready"; the next infer says why
            ready, config = False, None
        if not ready:
            self._triton_ready = self._ready = False
            self._checked_config, self._mismatch = None, None
            return
        if self._triton_ready and config == self._checked_config:
            self._ready = self._mismatch is None
            return
        # Newly ready, or reloaded with another config: it may batch differently, have other outputs, and
        # a (re)started Triton knows none of our shared-memory regions.
        try:
            self._max_batch = int(config["config"].get("max_batch_size", 0))  # type: ignore[index]
            if self._shm is not None:
                await self._shm.register(self._client)
            mismatch = await self._check_outputs()
        except _Transient:
            self._triton_ready = self._ready = False
            return
        except Exception as exc:  # noqa: BLE001 - same as a failed probe: retried at the next one
            log.debug("%s: readiness check failed: %s", self._where, exc)
            self._triton_ready = self._ready = False
            return
        self._triton_ready, self._checked_config, self._mismatch = True, config, mismatch
        self._ready = mismatch is None
        if mismatch is not None and not starting:
            log.error("%s does not fit the served model, refusing its requests: %s", self._where, mismatch)

    async def _check_outputs(self) -> str | None:
        """Why the served version's outputs do not fit the signature (None when they do), from one forward
        pass of a blank crop with every output requested."""
        import tritonclient.grpc.aio as triton_grpc

        crop = self.signature.geometry.crop_size
        blank = np.zeros((1, 3, crop, crop), dtype=np.float32)
        inputs = [triton_grpc.InferInput(self._input_name, list(blank.shape), "FP32")]
        inputs[0].set_data_from_numpy(blank)
        requested = [triton_grpc.InferRequestedOutput(name) for name in self.output_names]
        try:
            result = await self._client.infer(
                self._model, inputs, model_version=self._version, outputs=requested, client_timeout=self._timeout
            )
        except Exception as exc:  # noqa: BLE001 - classified below
            status = _status(exc)
            if status in ("StatusCode.INVALID_ARGUMENT", "StatusCode.INTERNAL", "StatusCode.UNIMPLEMENTED"):
                # Triton or the model refused the request itself: e.g. an output the model does not have
                # ("unexpected inference output 'embedding'"), or an input shape it does not take.
                return f"a {crop}x{crop} request for outputs {list(self.output_names)} failed: {_message(exc)}"
            raise _Transient(_message(exc)) from None
        problems = []
        for name in self.output_names:
            array = result.as_numpy(name)
            if array is None:
                problems.append(f"output {name!r} is missing from Triton's response")
                continue
            problem = self.signature.check(name, tuple(array.shape), crop, crop)
            if problem is not None:
                problems.append(problem)
        return "; ".join(problems) or None

    async def _watch(self) -> None:
        while True:
            was_ready = self._ready
            await self._probe()
            if was_ready != self._ready and self._mismatch is None:
                log.warning("%s is %s", self._where, "ready" if self._ready else "NOT ready")
            await asyncio.sleep(self._health_interval)

    def is_ready(self) -> bool:
        return self._ready

    async def infer(self, batch: np.ndarray, outputs: tuple[str, ...] = (LOGITS,)) -> Outputs:
        if self._client is None:
            raise Unavailable("Triton backend is not started")
        if self._mismatch is not None:
            raise FailedPrecondition(f"{self._where} does not fit the served model: {self._mismatch}")
        unknown = [name for name in outputs if name not in self.output_names]
        if unknown:
            raise FailedPrecondition(
                f"{self._where}: outputs {unknown} are not in the served model's signature {list(self.output_names)}"
            )
        if self._max_batch is None:
            await self._probe()
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        step = self._max_batch or len(batch)
        if len(batch) <= step:
            return await self._infer_chunk(batch, outputs)
        # Sent concurrently: Triton's dynamic batcher schedules the chunks as it sees fit.
        parts = await asyncio.gather(*(self._infer_chunk(chunk, outputs) for chunk in chunks(batch, step)))
        return joined(parts)

    async def _infer_chunk(self, batch: np.ndarray, outputs: tuple[str, ...]) -> Outputs:
        import tritonclient.grpc.aio as triton_grpc

        inputs = [triton_grpc.InferInput(self._input_name, list(batch.shape), "FP32")]
        requested = [triton_grpc.InferRequestedOutput(name) for name in outputs]
        region = None
        try:
            if self._shm is not None and batch.nbytes <= self._shm.region_bytes:
                region = await self._shm.acquire()
                self._shm.write(region, batch)
                inputs[0].set_shared_memory(region, batch.nbytes)
            else:
                inputs[0].set_data_from_numpy(batch)
            return await self._infer_with_retries(inputs, requested, outputs, len(batch))
        finally:
            if region is not None:
                self._shm.release(region)  # type: ignore[union-attr]

    async def _infer_with_retries(self, inputs: list, requested: list, outputs: tuple[str, ...], n: int) -> Outputs:
        from tritonclient.utils import InferenceServerException

        # The caller's gRPC deadline bounds everything; --triton-timeout-s bounds each attempt.
        deadline = request_deadline.get() or time.monotonic() + self._timeout * (self._retries + 1)
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"the deadline passed while waiting for {self._where}")
            started = time.perf_counter()
            try:
                with tracing.span("triton.infer", {
                    "rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService", "rpc.method": "ModelInfer",
                    "vision.model": self._model, "vision.rows": n, "vision.attempt": attempt,
                }, kind="client"):
                    # Triton in its OpenTelemetry trace mode continues the W3C context sent as metadata.
                    result = await self._client.infer(
                        self._model,
                        inputs,
                        model_version=self._version,
                        outputs=requested,
                        client_timeout=min(remaining, self._timeout),
                        headers=tracing.inject({}) or None,
                    )
            except InferenceServerException as exc:
                error = self._translate(exc, deadline)
                # A timed-out attempt may still be running on Triton: retrying would pile more work on it.
                retry = isinstance(error, Unavailable) and not isinstance(error, _AttemptTimedOut)
                if not retry or attempt >= self._retries:
                    raise error from None
                attempt += 1
                await asyncio.sleep(min(0.05 * 2**attempt, max(0.0, deadline - time.monotonic())))
                await self._probe()  # also renews shared-memory registrations after a Triton restart
                if self._mismatch is not None:
                    raise FailedPrecondition(f"{self._where} does not fit the served model: {self._mismatch}")
                continue
            if self._on_batch is not None:
                self._on_batch(BatchStats(n, 0.0, time.perf_counter() - started))
            return {name: result.as_numpy(name) for name in outputs}

    def _translate(self, exc: Exception, deadline: float) -> VisionError:
        """Our error for a failed Triton call, by its gRPC status (tritonclient carries Triton's)."""
        status = _status(exc)
        message = _message(exc)
        if status == "StatusCode.NOT_FOUND" and "shared memory" in message.lower():
            # Triton answers NOT_FOUND both for an unknown model and for a shared-memory region it does not
            # know, which happens when it restarted between two health probes: only the text tells them
            # apart. Transient: the regions are registered again when the model is seen ready.
            self._triton_ready = self._ready = False
            return Unavailable(f"{self._where} lost its shared-memory registrations: {message}")
        if status == "StatusCode.RESOURCE_EXHAUSTED":
            return ResourceExhausted(f"{self._where} is overloaded: {message}; retry with backoff")
        if status == "StatusCode.DEADLINE_EXCEEDED":
            if time.monotonic() >= deadline:
                return DeadlineExceeded(f"the deadline passed while waiting for {self._where}")
            return _AttemptTimedOut(f"{self._where} did not answer within --triton-timeout-s ({self._timeout:g} s)")
        if status in ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED"):
            # Triton down or restarting (connection refused), or the version not ready (being reloaded or
            # unloaded): Triton says UNAVAILABLE for both.
            self._triton_ready = self._ready = False
            return Unavailable(f"{self._where} is unavailable: {message}")
        if status == "StatusCode.NOT_FOUND":
            return FailedPrecondition(f"{self._where} is not loaded: {message}")
        return VisionError(f"{self._where} failed: {message}")

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            try:
                await self._monitor
            except asyncio.CancelledError:
                pass
            self._monitor = None
        if self._client is not None:
            if self._shm is not None and self._triton_ready:
                await self._shm.unregister(self._client)
            await self._client.close()
            self._client = None
        if self._shm is not None:
            self._shm.destroy()
            self._shm = None
