"""`vision serve --runner ray`: the same services as a Ray Serve application, for clients unchanged.

Local instance (default): open the public listeners on `--host` (gRPC `--port`, `--metrics-port`), move
into a private network namespace (`--ray-network netns`, see vision.runners.ray.network), start Ray there
(`--ray-num-cpus`, node IP 127.0.0.1, no dashboard), start Serve with its HTTP proxy on 127.0.0.1 and its
gRPC proxy carrying our services (vision.runners.ray.grpc_services), deploy the application (vision.runners.ray.app), then
relay the public gRPC port to the proxy and serve `/metrics` (ours from every replica, plus Ray's own).
Start-up checks the models first (a bad spec stops it before Ray starts) and fills the ONNX cache, so the
replicas only load.

SIGTERM/SIGINT: stop accepting connections, let Serve stop the replicas gracefully (each finishes what it
holds, up to `--grace-seconds`), close the relayed connections, stop Ray (no raylet or GCS is left behind).

`--ray-address` deploys to a running cluster instead (KubeRay, `ray start --head`) and returns; clients use
that cluster's gRPC proxy (`--port` there).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from vision.config.settings import ServeSettings
from vision.core.errors import ConfigurationError
from vision.runners.ray import network
from vision.runners.ray.app import APP_NAME, build_app, settings_args, write_config
from vision.runners.ray.grpc_services import servicer_functions

log = logging.getLogger(__name__)

_LOOPBACK = "127.0.0.1"


def preflight(settings: ServeSettings) -> None:
    """Every model spec checked (labels, weights files, head width) and its ONNX export cached, before Ray."""
    from vision.serving.loading import cached_onnx, model_card

    registry = [m.registry for m in settings.models if m.registry]
    if registry:
        raise ConfigurationError(
            f"--runner ray serves models given by spec; registry models ({', '.join(registry)}) are followed by the "
            "grpc runner only. Deploy a new version under Ray with a new Serve config (serve deploy) instead"
        )
    from vision.runners.ray.grpc_services import carried

    left_out = [name for name in settings.services if name not in carried(list(settings.services))]
    if left_out:
        log.warning("--runner ray does not carry the %s service(s) yet; serving %s", ", ".join(left_out),
                    ", ".join(carried(list(settings.services))))
    for model in settings.models:
        card, weights = model_card(model, settings)
        if card.backend == "onnxruntime" and model.onnx is None:
            cached_onnx(model, settings, card, weights)


def combine_metrics(ours: bytes, rays: str) -> bytes:
    """Our exposition, then Ray's families whose names we do not already export."""
    from prometheus_client.parser import text_string_to_metric_families

    names = {f.name for f in text_string_to_metric_families(ours.decode())}
    kept, skip = [], False
    for line in rays.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            family = line.split(" ", 3)[2]
            skip = family in names or family.removesuffix("_total") in names
        if not skip and line:
            kept.append(line)
    return ours + ("\n".join(kept) + "\n").encode() if kept else ours


class _MetricsServer:
    """GET /metrics on a listener opened before the namespace change: our metrics and Ray's."""

    def __init__(self, sock, ray_metrics_url: str | None) -> None:  # noqa: ANN001 - socket.socket
        import ray

        from vision.runners.ray.metrics import hub

        hub_actor = hub()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?")[0].rstrip("/") != "/metrics":
                    self.send_error(404, "GET /metrics")
                    return
                try:
                    body = ray.get(hub_actor.exposition.remote(), timeout=10)
                    if ray_metrics_url:
                        with urllib.request.urlopen(ray_metrics_url, timeout=5) as resp:  # loopback only
                            body = combine_metrics(body, resp.read().decode())
                except Exception as exc:  # Ray going away: say so instead of a half answer
                    self.send_error(503, f"metrics unavailable: {exc}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        sock.setblocking(True)
        self.httpd = ThreadingHTTPServer(sock.getsockname()[:2], Handler, bind_and_activate=False)
        self.httpd.socket.close()
        self.httpd.socket = sock
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run(settings: ServeSettings, on_ready: Callable[[object], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT (local Ray), or deploy and return (`--ray-address`)."""
    from vision.runners.server import Endpoints

    if settings.ray_config_only:
        assert settings.ray_config_out is not None
        path = write_config(settings, settings.ray_config_out)
        print(f"vision serve: wrote the Serve config to {path} (serve run {path})", flush=True)
        return
    preflight(settings)
    if settings.ray_address is not None:
        _deploy_to_cluster(settings)
        return

    netns = settings.ray_network == "netns"
    node_ip = _LOOPBACK if netns else settings.host
    grpc_sock = network.listen(settings.host, settings.port) if netns else None
    grpc_port = grpc_sock.getsockname()[1] if grpc_sock is not None else (settings.port or network.free_port(settings.host))
    metrics_sock = network.listen(settings.host, settings.metrics_port)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    if netns:
        network.enter_private_netns()
    else:
        log.warning(
            "--ray-network host: Ray's core processes and Serve's gRPC proxy (port %d) listen on all interfaces; "
            "firewall this machine or use --ray-network netns", grpc_port
        )

    import ray
    from ray import serve

    started = drained = False
    forwarder: network.Forwarder | None = None
    metrics_server: _MetricsServer | None = None
    # Ray starts its workers (Serve's proxy and replicas among them) at nice 15 by default, below everything
    # else on the machine: on a shared 2-core host the serving path then starves behind any busy neighbour.
    # Serving is the point of this process, so they run at normal priority (RAY_worker_niceness overrides).
    os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        ray_metrics_port = network.free_port(node_ip)
        ray.init(
            num_cpus=settings.ray_num_cpus or settings.threads,
            _node_ip_address=node_ip,
            include_dashboard=False,
            object_store_memory=settings.ray_object_store_mb * 1024 * 1024,
            namespace="vision",
            _metrics_export_port=ray_metrics_port,
            logging_level=logging.WARNING,
        )
        started = True
        serve.start(
            http_options={"host": node_ip, "port": settings.ray_http_port},
            grpc_options={"port": grpc_port, "grpc_servicer_functions": servicer_functions(list(settings.services))},
        )
        if stop.is_set():
            return
        serve.run(build_app({"settings": settings_args(settings)}), name=APP_NAME, route_prefix="/")
        if settings.ray_config_out is not None:
            write_config(settings, settings.ray_config_out, grpc_port=grpc_port)
        metrics_server = _MetricsServer(metrics_sock, f"http://{_hostport(node_ip, ray_metrics_port)}/metrics")
        endpoints = Endpoints(
            _hostport(settings.host, grpc_port),
            f"http://{_hostport(settings.host, metrics_sock.getsockname()[1])}/metrics",
        )
        if on_ready is not None:
            on_ready(endpoints)
        if grpc_sock is not None:
            forwarder = network.Forwarder(grpc_sock, _LOOPBACK, grpc_port)
        asyncio.run(_serve_until_stopped(stop, forwarder, settings.grace_seconds))
        drained = True
    finally:
        if started:
            if not drained:  # start-up failed or was interrupted: stop Serve, but never wait on a broken cluster
                _bounded(serve.shutdown, settings.grace_seconds + 30)
            if metrics_server is not None:
                metrics_server.close()
            ray.shutdown()  # stops GCS, raylet and every worker it started
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("stopped")


async def _serve_until_stopped(stop: threading.Event, forwarder: network.Forwarder | None, grace_seconds: float) -> None:
    """Relay until SIGTERM/SIGINT, then shut down gracefully while the relay still carries the responses
    of the requests in flight."""
    from ray import serve

    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    if stop.is_set():
        done.set()
    if forwarder is not None:
        await forwarder.start()
    await done.wait()
    log.info("shutting down: no new connections; Serve drains the replicas for up to %.1fs", grace_seconds)
    if forwarder is not None:
        forwarder.stop_accepting()
    try:
        # Deleting the application first lets its replicas finish what they hold (graceful_shutdown_timeout_s)
        # while the proxies still carry the answers back; serve.shutdown alone stops the proxies at once.
        await asyncio.to_thread(_bounded, lambda: serve.delete(APP_NAME), grace_seconds + 30)
        await asyncio.to_thread(_bounded, serve.shutdown, 60)
    finally:
        if forwarder is not None:
            await forwarder.close()


def _bounded(fn: Callable[[], object], timeout_s: float) -> None:
    """`fn()` in a daemon thread, waiting at most `timeout_s`: Serve's shutdown blocks for good when a Ray
    process it needs already died, and stopping must not hang on that."""
    thread = threading.Thread(target=fn, name="serve-shutdown", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        log.warning("Serve did not shut down within %.0fs; stopping Ray anyway", timeout_s)


def _deploy_to_cluster(settings: ServeSettings) -> None:
    import ray
    from ray import serve

    ray.init(address=settings.ray_address, namespace="vision", logging_level=logging.WARNING)
    serve.start(
        http_options={"host": settings.host, "port": settings.ray_http_port},
        grpc_options={"port": settings.port, "grpc_servicer_functions": servicer_functions(list(settings.services))},
    )
    serve.run(build_app({"settings": settings_args(settings)}), name=APP_NAME, route_prefix="/")
    if settings.ray_config_out is not None:
        write_config(settings, Path(settings.ray_config_out))
    print(f"vision serve: deployed application {APP_NAME!r} to {settings.ray_address}; its gRPC proxy port is "
          f"{settings.port} on every node (`serve status` shows it)", flush=True)
