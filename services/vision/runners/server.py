"""The standalone `grpc.aio` runner: the hosted services in one process, plus health, reflection and metrics.

`--services` picks which of `SERVICES` this process hosts (all by default; one per Deployment in
Kubernetes); health and reflection list exactly those. Adding a service is one entry in `SERVICES`.

Start-up order matters for operators: models load first (a bad file stops start-up before any port is
bound), then the port opens, then health turns SERVING. On SIGTERM health turns NOT_SERVING at once (load
balancers stop routing), in-flight RPCs get `grace_seconds` to finish, then the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

from vision.api.servicers.classification import SERVICE as CLASSIFICATION
from vision.api.servicers.classification import ClassificationServicer
from vision.api.servicers.delf import SERVICE as DELF
from vision.api.servicers.delf import DelfServicer
from vision.api.servicers.features import SERVICE as FEATURES
from vision.api.servicers.features import FeaturesServicer
from vision.api.servicers.jobs import SERVICE as JOBS
from vision.api.servicers.jobs import add_to_server as add_jobs
from vision.api.servicers.tagging import SERVICE as TAGGING
from vision.api.servicers.tagging import TaggingServicer
from vision.config.settings import ServeSettings
from vision.core.cpus import describe_cpus
from vision.core.metrics import serve_metrics
from vision.media.imaging import DecodeLimits
from vision.models.card import DELF as DELF_TASK
from vision.models.card import FEATURES as FEATURES_TASK
from vision.serving.dataplane import DataPlane
from vision.serving.loading import load_repository
from vision.serving.repository import ModelRepository
from vision.tasks.classification import CLASSIFICATION as CLASSIFICATION_TASK
from vision.tasks.features import Features
from vision.tasks.tagging import TAGGING as TAGGING_TASK
from vision.v1 import classification_pb2_grpc, delf_pb2_grpc, features_pb2_grpc, tagging_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostedService:
    # The `--services` name.
    name: str
    # Fully qualified gRPC name, as health checks and reflection use it.
    full_name: str
    # The model capability its default model must have (ModelCard.tasks); "" for a service without models
    # (Jobs), whose add_to_server returns its own readiness check.
    task: str
    # Adds the servicer; may return a readiness callable (health SERVING while it returns True) that
    # replaces the default model check.
    add_to_server: Callable[[DataPlane, grpc.aio.Server, ServeSettings], Callable[[], bool] | None]


SERVICES: tuple[HostedService, ...] = (
    HostedService(
        "classification", CLASSIFICATION, CLASSIFICATION_TASK.name,
        lambda dp, server, _: classification_pb2_grpc.add_ClassificationServicer_to_server(ClassificationServicer(dp), server),
    ),
    HostedService(
        "tagging", TAGGING, TAGGING_TASK.name,
        lambda dp, server, _: tagging_pb2_grpc.add_TaggingServicer_to_server(TaggingServicer(dp), server),
    ),
    HostedService(
        "features", FEATURES, FEATURES_TASK,
        lambda dp, server, settings: features_pb2_grpc.add_FeaturesServicer_to_server(
            FeaturesServicer(dp, Features(max_shorter=settings.features_max_shorter)), server
        ),
    ),
    HostedService(
        "delf", DELF, DELF_TASK,
        lambda dp, server, _: delf_pb2_grpc.add_DelfServicer_to_server(DelfServicer(dp), server),
    ),
    # Jobs (vision.jobs): ready while its Redis answers.
    HostedService("jobs", JOBS, "", lambda _, server, settings: add_jobs(server, settings.jobs_config())),
)

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
SWITCH_INTERVAL_S = 0.001


def _enable_reflection(server: grpc.aio.Server, service_names: list[str]) -> None:
    """Reflection v1alpha (grpcio-reflection's) and v1. grpcio-reflection ships only v1alpha, but the v1
    protocol is the same messages under a new package name, byte for byte on the wire, so the same servicer
    answers both; current grpcurl asks for v1 first."""
    names = [*service_names, reflection.SERVICE_NAME, REFLECTION_V1]
    reflection.enable_server_reflection(names, server)
    servicer = ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),))


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
# Health-check name that is SERVING while the process runs, whatever its models do (liveness probes).
LIVENESS = "vision.liveness"


def _health_state(
    repository: ModelRepository,
    hosted: tuple[HostedService, ...],
    probes: dict[str, Callable[[], bool] | None] | None = None,
) -> HealthState:
    """Per hosted service: SERVING when its default model is ready, so one model that is down takes only
    its own services out of load balancing. The overall entry ("") is SERVING when every hosted service is;
    `LIVENESS` whenever the process runs."""
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    probes = probes or {}

    def ready(svc: HostedService) -> bool:
        probe = probes.get(svc.full_name)
        return probe() if probe is not None else repository.ready(svc.task)

    state = {svc.full_name: serving if ready(svc) else not_serving for svc in hosted}
    state[""] = serving if all(v == serving for v in state.values()) else not_serving
    # For liveness probes: the process answers. A model that is down must take its services out of load
    # balancing (readiness), not get the pod restarted, which would not bring a remote Triton back.
    state[LIVENESS] = serving
    return state


async def _update_health(
    health: health_aio.HealthServicer, repository: ModelRepository, hosted: tuple[HostedService, ...], current: HealthState,
    probes: dict[str, Callable[[], bool] | None] | None = None,
) -> HealthState:
    wanted = _health_state(repository, hosted, probes)
    for name, status in wanted.items():
        if current.get(name) != status:
            await health.set(name, status)
            if current:
                log.warning("health of %r is now %s", name or "server", health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    return wanted


async def _track_health(
    health: health_aio.HealthServicer, repository: ModelRepository, hosted: tuple[HostedService, ...],
    state: HealthState, interval_s: float = 0.5, probes: dict[str, Callable[[], bool] | None] | None = None,
) -> None:
    """Keeps health current: a remote Triton can go away and come back, versions come and go."""
    while True:
        await asyncio.sleep(interval_s)
        state = await _update_health(health, repository, hosted, state, probes)


def _bind(server: grpc.aio.Server, settings: ServeSettings) -> tuple[int, object, int]:
    """(gRPC port, metrics server, metrics port); OSError naming the address that could not be bound."""
    address = _hostport(settings.host, settings.port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpcio reports a failed bind as RuntimeError
        port = 0
    if port == 0:
        raise OSError(f"cannot bind gRPC on {address}: is another server using that port? (--port 0 picks a free one)")
    try:
        metrics_httpd, metrics_port = serve_metrics(settings.host, settings.metrics_port)
    except OSError as exc:
        raise OSError(f"cannot bind metrics on {_hostport(settings.host, settings.metrics_port)}: {exc.strerror}") from None
    return port, metrics_httpd, metrics_port


async def serve(
    settings: ServeSettings,
    *,
    repository: ModelRepository | None = None,
    on_ready: Callable[[Endpoints], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (or `stop` is set), then drain and return."""
    # The event loop shares the GIL with decode and postprocessing threads; Python hands the GIL over only
    # every switch interval (5 ms by default), and a small RPC needs it a few dozen times. At 1 ms a 1-image
    # Classify's max latency with 64-image threshold-0 Tags in flight fell from 328 to 146 ms (loadtest.stall).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    log.info("CPUs: %s; engine threads %d, decode workers %d", describe_cpus(), settings.threads, settings.decode_workers)
    registry = None
    if repository is None and any(m.registry for m in settings.models):
        # Imported only here: without a `models:/...` entry the registry (and MLflow) costs nothing.
        from vision.registry.publisher import RegistryPublisher

        registry = RegistryPublisher(settings)
        repository = load_repository(registry.resolve())
    hosted = tuple(svc for svc in SERVICES if svc.name in settings.services)
    # A process hosting only services without models (Jobs) loads none.
    repository = repository or (load_repository(settings) if any(svc.task for svc in hosted) else ModelRepository([]))
    try:
        await repository.start()
        if registry is not None:
            await registry.start(repository)  # gates the versions loaded, then follows their aliases
    except BaseException:
        if registry is not None:
            await registry.close()
        await repository.close()
        raise
    dataplane = DataPlane(
        repository,
        limits=DecodeLimits(settings.max_image_bytes, settings.max_image_pixels),
        max_images_per_request=settings.max_images_per_request,
        decode_workers=settings.decode_workers,
    )
    server = grpc.aio.server(options=_grpc_options(settings), maximum_concurrent_rpcs=settings.max_concurrent_rpcs)
    probes = {svc.full_name: svc.add_to_server(dataplane, server, settings) for svc in hosted}
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    _enable_reflection(server, [*(svc.full_name for svc in hosted), health_pb2.DESCRIPTOR.services_by_name["Health"].full_name])
    try:
        port, metrics_httpd, metrics_port = _bind(server, settings)
    except OSError:
        # Nothing started may outlive a failed start: the registry's followers, the models, the pools.
        if registry is not None:
            await registry.close()
        await repository.close()
        dataplane.close()
        raise
    await server.start()
    state = await _update_health(health, repository, hosted, {}, probes)
    health_task = asyncio.get_running_loop().create_task(
        _track_health(health, repository, hosted, state, probes=probes)
    )

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
        if registry is not None:
            await registry.close()
        await health.enter_graceful_shutdown()
        await server.stop(settings.grace_seconds)
        await repository.close()
        dataplane.close()
        metrics_httpd.shutdown()  # type: ignore[attr-defined]
        metrics_httpd.server_close()  # type: ignore[attr-defined]
        log.info("stopped")
