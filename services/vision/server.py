"""The standalone `grpc.aio` runner: every service in one process, plus health, reflection and metrics.

Start-up order matters for operators: models load first (a bad file stops start-up before any port is
bound), then the port opens, then health turns SERVING. On SIGTERM health turns NOT_SERVING at once (load
balancers stop routing), in-flight RPCs get `grace_seconds` to finish, then the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from vision.dataplane import DataPlane
from vision.imaging import DecodeLimits
from vision.metrics import serve_metrics
from vision.repository import ModelRepository, load_repository
from vision.servicers.classification import SERVICE as CLASSIFICATION, TASK as CLASSIFICATION_TASK, ClassificationServicer
from vision.servicers.tagging import SERVICE as TAGGING, TASK as TAGGING_TASK, TaggingServicer
from vision.settings import ServeSettings
from vision.v1 import classification_pb2, classification_pb2_grpc, tagging_pb2, tagging_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoints:
    grpc_address: str
    metrics_url: str


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _grpc_options(settings: ServeSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        # Reject a second server on the same port instead of silently sharing it.
        ("grpc.so_reuseport", 0),
    ]


HealthState = dict[str, int]


def _health_state(repository: ModelRepository, services: dict[str, str]) -> HealthState:
    """Per service: SERVING when it has at least one model for its task and every model is ready; the
    overall entry ("") is SERVING when every backend is ready."""
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    ready = repository.ready()
    state = {"": serving if ready else not_serving}
    for name, task in services.items():
        state[name] = serving if ready and repository.list(task) else not_serving
    return state


async def _update_health(
    health: health_aio.HealthServicer, repository: ModelRepository, services: dict[str, str], current: HealthState
) -> HealthState:
    wanted = _health_state(repository, services)
    for name, status in wanted.items():
        if current.get(name) != status:
            await health.set(name, status)
            if current:
                log.warning("health of %r is now %s", name or "server", health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    return wanted


async def _track_health(
    health: health_aio.HealthServicer, repository: ModelRepository, services: dict[str, str], state: HealthState,
    interval_s: float = 0.5,
) -> None:
    """Keeps health current: a remote Triton can go away and come back."""
    while True:
        await asyncio.sleep(interval_s)
        state = await _update_health(health, repository, services, state)


async def serve(
    settings: ServeSettings,
    *,
    repository: ModelRepository | None = None,
    on_ready: Callable[[Endpoints], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (or `stop` is set), then drain and return."""
    repository = repository or load_repository(settings)
    await repository.start()
    dataplane = DataPlane(
        repository,
        limits=DecodeLimits(settings.max_image_bytes, settings.max_image_pixels),
        max_images_per_request=settings.max_images_per_request,
        decode_workers=settings.decode_workers,
    )
    server = grpc.aio.server(options=_grpc_options(settings), maximum_concurrent_rpcs=settings.max_concurrent_rpcs)
    classification_pb2_grpc.add_ClassificationServicer_to_server(ClassificationServicer(dataplane), server)
    tagging_pb2_grpc.add_TaggingServicer_to_server(TaggingServicer(dataplane), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    services = {CLASSIFICATION: CLASSIFICATION_TASK, TAGGING: TAGGING_TASK}
    reflection.enable_server_reflection(
        [
            classification_pb2.DESCRIPTOR.services_by_name["Classification"].full_name,
            tagging_pb2.DESCRIPTOR.services_by_name["Tagging"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    address = _hostport(settings.host, settings.port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpcio reports a failed bind as RuntimeError
        port = 0
    if port == 0:
        await repository.close()
        raise OSError(f"cannot bind gRPC on {address}: is another server using that port? (--port 0 picks a free one)")
    try:
        metrics_httpd, metrics_port = serve_metrics(settings.host, settings.metrics_port)
    except OSError as exc:
        await repository.close()
        raise OSError(f"cannot bind metrics on {_hostport(settings.host, settings.metrics_port)}: {exc.strerror}") from None
    await server.start()
    state = await _update_health(health, repository, services, {})
    health_task = asyncio.get_running_loop().create_task(_track_health(health, repository, services, state))

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests embedding the server)
            pass
    endpoints = Endpoints(_hostport(settings.host, port), f"http://{_hostport(settings.host, metrics_port)}/metrics")
    if on_ready is not None:
        on_ready(endpoints)
    try:
        await stop.wait()
    finally:
        log.info("shutting down: draining in-flight RPCs for up to %.1fs", settings.grace_seconds)
        health_task.cancel()
        await health.enter_graceful_shutdown()
        await server.stop(settings.grace_seconds)
        await repository.close()
        dataplane.close()
        metrics_httpd.shutdown()  # type: ignore[attr-defined]
        metrics_httpd.server_close()  # type: ignore[attr-defined]
        log.info("stopped")
