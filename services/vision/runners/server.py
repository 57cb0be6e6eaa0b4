"""The standalone `grpc.aio` runner: the hosted services in one process, plus health, reflection and metrics.

`--services` picks which of `vision.runners.hosting.SERVICES` this process hosts (all by default; one per
Deployment in Kubernetes); health and reflection list exactly those.

Start-up order matters for operators: models load first (a bad file stops start-up before any port is
bound), then the port opens, then health turns SERVING. On SIGTERM health turns NOT_SERVING at once (load
balancers stop routing), in-flight RPCs get `grace_seconds` to finish, then the process exits.

With `--tls-cert/--tls-key` the port speaks TLS (mutual with `--tls-client-ca`), and the RPCs that change
state pass the authorization interceptor (vision.api.security); `--health-port` adds a plaintext port that
serves health only, for probes.
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

from vision.api.security import ServerCertificates, authorization_for, is_loopback, methods_changing_state
from vision.config.settings import ServeSettings
from vision.core.cpus import describe_cpus
from vision.core import tracing
from vision.core.metrics import serve_metrics
from vision.core.wire import MAX_MESSAGE_BYTES
from vision.runners.hosting import SWITCH_INTERVAL_S, HealthState, Hosting, host, hosted_services
from vision.serving.loading import load_repository
from vision.serving.repository import ModelRepository

log = logging.getLogger(__name__)


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


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
    # The plaintext health-only port (--health-port), if any.
    health_address: str | None = None
    tls: bool = False


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _grpc_options(settings: ServeSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Reject a second server on the same port instead of silently sharing it.
        ("grpc.so_reuseport", 0),
    ]


async def _update_health(health: health_aio.HealthServicer, hosting: Hosting, current: HealthState) -> HealthState:
    wanted = hosting.health()
    for name, status in wanted.items():
        if current.get(name) != status:
            await health.set(name, status)
            if current:
                log.warning("health of %r is now %s", name or "server", health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    return wanted


async def _track_health(
    health: health_aio.HealthServicer, hosting: Hosting, state: HealthState, interval_s: float = 0.5
) -> None:
    """Keeps health current: a remote Triton can go away and come back, versions come and go."""
    while True:
        await asyncio.sleep(interval_s)
        state = await _update_health(health, hosting, state)


def _bind(
    server: grpc.aio.Server, settings: ServeSettings, certificates: ServerCertificates | None
) -> tuple[int, object, int]:
    """(gRPC port, metrics server, metrics port); OSError naming the address that could not be bound."""
    address = _hostport(settings.host, settings.port)
    try:
        if certificates is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, certificates.credentials())
    except RuntimeError:  # grpcio reports a failed bind as RuntimeError
        port = 0
    if port == 0:
        raise OSError(f"cannot bind gRPC on {address}: is another server using that port? (--port 0 picks a free one)")
    try:
        metrics_httpd, metrics_port = serve_metrics(settings.host, settings.metrics_port)
    except OSError as exc:
        raise OSError(f"cannot bind metrics on {_hostport(settings.host, settings.metrics_port)}: {exc.strerror}") from None
    return port, metrics_httpd, metrics_port


def _tracing_interceptor() -> grpc.aio.ServerInterceptor | None:
    """OpenTelemetry's grpc.aio server interceptor while tracing is on (vision.core.tracing): a server span per
    RPC continuing the caller's W3C context from the metadata. First in the chain, so a call the authorization
    refuses is traced too. Health checks and reflection are left out: probes every few seconds would bury
    the traces worth reading."""
    if not tracing.enabled():
        return None
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    quiet = filters.negate(filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection")))
    return aio_server_interceptor(tracer_provider=tracing.provider(), filter_=quiet)


async def _health_only_server(
    settings: ServeSettings, health: health_aio.HealthServicer
) -> tuple[grpc.aio.Server, int] | tuple[None, None]:
    """The plaintext health port (--health-port): the same health states, no other service, for probes that
    cannot present certificates to the TLS port."""
    if settings.health_port is None:
        return None, None
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=16)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = _hostport(settings.host, settings.health_port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot bind the health port on {address}: is another server using it?")
    await server.start()
    return server, port


async def serve(
    settings: ServeSettings,
    *,
    repository: ModelRepository | None = None,
    on_ready: Callable[[Endpoints], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (or `stop` is set), then drain and return."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)  # see vision.runners.hosting: the event loop shares the GIL
    hosted = hosted_services(settings.services)
    # Security first: a missing certificate or an open job API off loopback stops start-up before any model loads.
    certificates = (
        ServerCertificates(settings.tls_cert, settings.tls_key, settings.tls_client_ca) if settings.tls_cert else None
    )
    authorization = authorization_for(
        host=settings.host, tokens=settings.auth_tokens, allowed=settings.auth_allow, open_all=settings.auth_open,
        guarded=methods_changing_state(svc.full_name for svc in hosted),
    )
    if settings.auth_tokens is not None and certificates is None and not is_loopback(settings.host):
        log.warning("bearer tokens over plaintext on %s: anyone on the network path can read them (--tls-cert)", settings.host)
    log.info("CPUs: %s; engine threads %d, decode workers %d", describe_cpus(), settings.threads, settings.decode_workers)
    registry = None
    if repository is None and any(m.registry for m in settings.models):
        # Imported only here: without a `models:/...` entry the registry (and MLflow) costs nothing.
        from vision.registry.publisher import RegistryPublisher

        registry = RegistryPublisher(settings)
        repository = load_repository(registry.resolve())
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
    interceptors = [i for i in (_tracing_interceptor(), authorization) if i is not None]
    server = grpc.aio.server(
        options=_grpc_options(settings), maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        interceptors=interceptors or None,
    )
    try:
        hosting = host(repository, settings, server, hosted)
    except BaseException:
        if registry is not None:
            await registry.close()
        await repository.close()
        raise
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    _enable_reflection(server, [*(svc.full_name for svc in hosted), health_pb2.DESCRIPTOR.services_by_name["Health"].full_name])
    try:
        port, metrics_httpd, metrics_port = _bind(server, settings, certificates)
    except OSError:
        # Nothing started may outlive a failed start: the registry's followers, the models, the pools.
        if registry is not None:
            await registry.close()
        await repository.close()
        hosting.close()
        raise
    await server.start()
    try:
        health_server, health_port = await _health_only_server(settings, health)
    except OSError:
        await server.stop(0)
        if registry is not None:
            await registry.close()
        await repository.close()
        hosting.close()
        metrics_httpd.shutdown()  # type: ignore[attr-defined]
        metrics_httpd.server_close()  # type: ignore[attr-defined]
        raise
    state = await _update_health(health, hosting, {})
    health_task = asyncio.get_running_loop().create_task(_track_health(health, hosting, state))

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests embedding the server)
            pass
    endpoints = Endpoints(
        _hostport(settings.host, port), f"http://{_hostport(settings.host, metrics_port)}/metrics",
        _hostport(settings.host, health_port) if health_port is not None else None, certificates is not None,
    )
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
        if health_server is not None:
            await health_server.stop(0)
        await repository.close()
        hosting.close()
        metrics_httpd.shutdown()  # type: ignore[attr-defined]
        metrics_httpd.server_close()  # type: ignore[attr-defined]
        log.info("stopped")
