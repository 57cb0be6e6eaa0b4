"""The Ray Serve deployments: the same servicers, data plane and task modules as `vision serve`.

`VisionIngress` is what Ray's gRPC proxy calls. Each replica builds the hosted servicers over its own
`DataPlane` and model set with `vision.runners.hosting.host`, exactly as `vision.runners.server.serve` does
(one entry per service in `vision.runners.hosting.SERVICES`), and exposes every RPC as a method named
`ray_method_name(service, method)` (see `vision.runners.ray.grpc_services` for why the service is in the
name). Errors keep their status codes: the servicers' `@rpc_method` maps them as always, and
`RayContext.abort` hands the code and message to Ray's proxy through the replica's gRPC context.

Engines: fused topology, each ingress replica runs the model itself behind `@serve.batch`
(vision.runners.ray.batching); split topology, `VisionInference` (one deployment per model) does, and the ingress
sends it decoded tensors through a deployment handle. Models on Triton are called from the ingress
directly: Triton batches them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from ray import serve

from vision.config.settings import ModelConfig, ServeSettings
from vision.models.card import ModelCard
from vision.runners.hosting import SWITCH_INTERVAL_S, host, hosted_services
from vision.runners.ray import metrics as ray_metrics
from vision.runners.ray.batching import BatchedEngineBackend, EngineBatcher, RemoteEngineBackend
from vision.runners.ray.grpc_services import HEALTH, carried, ray_method_name, rpc_methods
from vision.serving.loading import build_backend, model_card
from vision.serving.repository import ModelRepository, ServedModel

log = logging.getLogger(__name__)


class RpcAborted(Exception):
    """Raised by `RayContext.abort`: the status is already on the Ray gRPC context."""


class RayContext:
    """What `vision.api.rpc.rpc_method` needs of a `grpc.aio.ServicerContext`, over Ray's serializable context.

    Ray's proxy does not pass the client's deadline on; when the client gives up, the proxy cancels the
    replica's call, which `rpc_method` counts as CANCELLED and which drops the queued work."""

    def __init__(self, grpc_context: Any) -> None:
        self._context = grpc_context

    def time_remaining(self) -> float | None:
        return None

    def code(self) -> grpc.StatusCode | None:
        return self._context.code() if self._context is not None else None

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        if self._context is not None:
            self._context.set_code(code)
            self._context.set_details(details)
        raise RpcAborted(f"{code.name}: {details}")


def replica_name() -> str:
    try:
        context = serve.get_replica_context()
        return f"{context.deployment}#{context.replica_id.unique_id}"
    except Exception:  # outside a replica (unit tests)
        return f"pid{os.getpid()}"


def local_engine(config: ModelConfig, settings: ServeSettings, card: ModelCard, weights: Any) -> BatchedEngineBackend:
    """The model's engine in this process, behind `@serve.batch` (ONNX Runtime or torch)."""
    engine = build_backend(config, settings, card, weights)
    if engine.kind == "torch":
        from vision.backends.torch_backend import torch_thread

        executor: concurrent.futures.Executor = torch_thread()  # torch runs on the thread that built it
        owned = None
    else:
        executor = owned = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{card.name}")
    batcher = EngineBatcher(
        engine.forward,  # type: ignore[attr-defined]
        executor,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        model=card.name,
        version=card.version,
    )
    return BatchedEngineBackend(engine.kind, batcher, close=(lambda: owned.shutdown(wait=False)) if owned else None)


def model_key(config: ModelConfig) -> str:
    return f"{config.served_name}:{config.version}"


def _configure(models: list[BatchedEngineBackend], user_config: dict[str, Any]) -> None:
    for backend in models:
        batcher = backend.batcher
        batcher.configure(
            int(user_config.get("max_batch_size", batcher.max_batch_size)), float(user_config.get("max_wait_ms", 0.0))
        )


class VisionIngress:
    """Every hosted gRPC service (and grpc.health.v1), plus GET /metrics and /healthz over Serve's HTTP proxy."""

    async def __init__(self, settings: dict[str, Any], inference: dict[str, Any] | None = None) -> None:
        sys.setswitchinterval(SWITCH_INTERVAL_S)  # see vision.runners.hosting: the event loop shares the GIL with decoding
        self._settings = config = ServeSettings(**settings)
        served = []
        for model in config.models:
            card, weights = model_card(model, config)
            if card.backend == "triton":
                backend = build_backend(model, config, card, weights)
            elif inference:
                backend = RemoteEngineBackend(card.backend, inference[model_key(model)], config.max_batch_size)
            else:
                backend = local_engine(model, config, card, weights)
            served.append(ServedModel(card, backend))
        self._repository = ModelRepository(served)
        await self._repository.start()
        capture = _MethodCapture()
        self._hosting = host(self._repository, config, capture, hosted_services(carried(list(config.services))))
        self._methods = capture.methods
        self._replica = replica_name()
        self._pusher = asyncio.get_running_loop().create_task(ray_metrics.push_forever(self._replica))
        log.info("replica %s serving %s", self._replica, ", ".join(svc.full_name for svc in self._hosting.services))

    def _engines(self) -> list[BatchedEngineBackend]:
        return [m.backend for m in self._repository if isinstance(m.backend, BatchedEngineBackend)]

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """`user_config` of the Serve config: max_batch_size and max_wait_ms, changed without a restart."""
        _configure(self._engines(), user_config)

    def check_health(self) -> None:
        """Serve replaces a replica whose check fails: an engine of our own that stopped (a remote Triton
        being down is reported through grpc.health instead; a new replica would not fix it)."""
        for model in self._repository:
            if model.backend.kind != "triton" and not model.backend.is_ready():
                raise RuntimeError(f"model {model.card.name}:{model.card.version} is not ready")

    async def _call(self, service: str, method: str, request: Any, grpc_context: Any) -> Any:
        context = RayContext(grpc_context)
        handler = self._methods.get(service, {}).get(method)
        if handler is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{service} is not hosted by this application")
        return await handler.unary_unary(request, context)  # type: ignore[union-attr]

    def _health(self, service: str) -> int | None:
        return self._hosting.health().get(service)

    async def HealthCheck(self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None) -> health_pb2.HealthCheckResponse:
        status = self._health(request.service)
        if status is None:
            await RayContext(grpc_context).abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def HealthList(self, request: Any, grpc_context: Any = None) -> Any:
        response = health_pb2.HealthListResponse()
        for name, status in self._hosting.health().items():
            response.statuses[name].status = status
        return response

    async def HealthWatch(self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None):  # noqa: ANN201
        last = None
        while True:
            status = self._health(request.service)
            status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN if status is None else status
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(1.0)

    async def __call__(self, request: Any) -> Any:
        """Serve's HTTP proxy: GET /metrics (our metrics from every replica) and GET /healthz."""
        from prometheus_client import CONTENT_TYPE_LATEST
        from starlette.responses import PlainTextResponse, Response

        path = request.url.path.rstrip("/")
        if path.endswith("/metrics"):
            body = await ray_metrics.hub().exposition.remote()
            return Response(body, media_type=CONTENT_TYPE_LATEST)
        if path.endswith("/healthz"):
            ok = self._health("") == health_pb2.HealthCheckResponse.SERVING
            return PlainTextResponse("ok" if ok else "not serving", status_code=200 if ok else 503)
        return PlainTextResponse("GET /metrics or /healthz", status_code=404)

    async def __del__(self) -> None:
        """Graceful shutdown: Serve has already drained this replica's requests (graceful_shutdown_timeout_s)."""
        self._pusher.cancel()
        try:
            await ray_metrics.hub().forget.remote(self._replica)
        except Exception:  # Ray itself may be going away
            pass
        await self._repository.close()
        self._hosting.close()


class VisionInference:
    """Split topology: one model's engine behind `@serve.batch`, called by the ingress with decoded tensors."""

    async def __init__(self, settings: dict[str, Any], model: str) -> None:
        config = ServeSettings(**settings)
        spec = next(m for m in config.models if model_key(m) == model)
        card, weights = model_card(spec, config)
        self._engine = local_engine(spec, config, card, weights)
        self._replica = replica_name()
        self._pusher = asyncio.get_running_loop().create_task(ray_metrics.push_forever(self._replica))

    async def infer(self, inputs: Any, outputs: tuple[str, ...]) -> Any:
        return await self._engine.infer(inputs, outputs)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        _configure([self._engine], user_config)

    def check_health(self) -> None:
        if not self._engine.is_ready():
            raise RuntimeError("engine closed")

    async def __del__(self) -> None:
        self._pusher.cancel()
        try:
            await ray_metrics.hub().forget.remote(self._replica)
        except Exception:
            pass
        await self._engine.close()


class _MethodCapture:
    """A server stand-in for `HostedService.add_to_server`: keeps each service's method handlers."""

    def __init__(self) -> None:
        self.methods: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: tuple[Any, ...]) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.methods[service] = handlers


def _rpc(service: str, method: str) -> Callable[..., Any]:
    async def call(self: VisionIngress, request: Any, grpc_context: Any = None) -> Any:
        return await self._call(service, method, request, grpc_context)

    call.__name__ = call.__qualname__ = ray_method_name(service, method)
    call.__doc__ = f"/{service}/{method}"
    return call


# One method per RPC of every service vision.runners.hosting can host (Ray's proxy routes only the hosted ones);
# grpc.health.v1's are written out above.
for _service, _method in rpc_methods():
    if _service != HEALTH:
        setattr(VisionIngress, ray_method_name(_service, _method), _rpc(_service, _method))
