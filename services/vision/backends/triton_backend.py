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

from vision.backends.base import InferenceBackend, Outputs
from vision.backends.batching import BatchStats
from vision.errors import DeadlineExceeded, FailedPrecondition, Unavailable, VisionError

log = logging.getLogger(__name__)

# Triton status strings (grpc.StatusCode reprs) that mean "try again shortly".
_TRANSIENT = ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED", "StatusCode.RESOURCE_EXHAUSTED")


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

    async def start(self) -> None:
        import tritonclient.grpc.aio as triton_grpc

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
        try:
            self._ready = bool(
                await self._client.is_model_ready(self._model, self._version, client_timeout=self._health_interval)
            )
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

    async def infer(self, batch: np.ndarray, *, deadline: float | None = None) -> Outputs:
        import tritonclient.grpc.aio as triton_grpc
        from tritonclient.utils import InferenceServerException

        if self._client is None:
            raise Unavailable("Triton backend is not started")
        inputs = [triton_grpc.InferInput(self._input_name, list(batch.shape), "FP32")]
        inputs[0].set_data_from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        outputs = [triton_grpc.InferRequestedOutput(name) for name in self.output_names]
        deadline = deadline or time.monotonic() + self._timeout
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"Triton did not answer for model {self._model!r} within the deadline")
            started = time.perf_counter()
            try:
                result = await self._client.infer(
                    self._model,
                    inputs,
                    model_version=self._version,
                    outputs=outputs,
                    client_timeout=min(remaining, self._timeout),
                )
            except InferenceServerException as exc:
                error = self._translate(exc)
                if isinstance(error, Unavailable):
                    self._ready = False
                if not isinstance(error, Unavailable) or attempt >= self._retries:
                    raise error from None
                attempt += 1
                await asyncio.sleep(min(0.05 * 2**attempt, max(0.0, deadline - time.monotonic())))
                continue
            if self._on_batch is not None:
                self._on_batch(BatchStats(len(batch), 0.0, time.perf_counter() - started))
            return {name: result.as_numpy(name) for name in self.output_names}

    def _translate(self, exc: Exception) -> VisionError:
        status = str(getattr(exc, "status", lambda: "")() or "")
        message = getattr(exc, "message", lambda: str(exc))() or str(exc)
        where = f"Triton at {self._url}, model {self._model!r} version {self._version!r}"
        if status in _TRANSIENT or "failed to connect" in message.lower() or "unavailable" in message.lower():
            return Unavailable(f"{where} is unavailable: {message}")
        if status == "StatusCode.DEADLINE_EXCEEDED" or "deadline" in message.lower():
            return DeadlineExceeded(f"{where} did not answer in time")
        if "not found" in message.lower() or "not ready" in message.lower() or "unknown model" in message.lower():
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
            await self._client.close()
