"""`vision worker`: Celery worker nodes for the job queues, and their Prometheus metrics.

    vision worker --queues download,train        # one node per queue, metrics on 127.0.0.1:9465
    vision worker --queues train --device cuda   # a GPU node
    vision worker --queues download --concurrency 8 --allow-private-addresses 10.20.0.0/16

Each queue gets its own Celery worker node (a child process, `<queue>@<host>`), because the queues want
different pools: a train node runs one job at a time (one pool process, prefetch 1) whatever
`--concurrency` says; a download node runs `--concurrency` jobs at once (each fetches many URLs in
threads). This process supervises the nodes: it forwards SIGTERM/SIGINT (Celery's warm shutdown: running
jobs finish or, killed at the grace period's end, are redelivered), serves /metrics for all of them
(prometheus_client's multiprocess mode) and exits when a node exits, with its status, for the
orchestrator to restart.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from vision.config.jobs import TRAIN
from vision.jobs.settings import WorkerSettings

PROG = "vision worker"
log = logging.getLogger(__name__)


# -- the supervisor ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    fields = WorkerSettings.model_fields

    def add(flag: str, name: str, **kw: Any) -> None:
        field = fields[name]
        default = field.get_default(call_default_factory=True)
        p.add_argument(
            flag,
            dest=name,
            default=None,
            help=f"{field.description or ''} [env VISION_{name.upper()}; default {default}]",
            **kw,
        )

    add("--queues", "queues", metavar="Q[,Q]")
    add("--concurrency", "concurrency", type=int)
    p.add_argument(
        "--allow-private-addresses",
        dest="download_allow_private_addresses",
        nargs="?",
        const="all",
        default=None,
        metavar="NETWORKS",
        help="let download jobs fetch loopback/private/link-local addresses: alone = all of them, or only the "
        "comma-separated networks given (e.g. 127.0.0.0/8). Off by default: this is the worker operator's "
        "decision, a submitter cannot make it [env VISION_DOWNLOAD_ALLOW_PRIVATE_ADDRESSES=1 or NETWORKS]",
    )
    add("--redis-url", "redis_url")
    add("--namespace", "jobs_namespace")
    add("--visibility-timeout-s", "jobs_visibility_timeout_s", type=int)
    add("--work-dir", "jobs_work_dir")
    add("--data-root", "jobs_data_root")
    add("--registry-uri", "registry_uri")
    add("--registry-artifact-root", "registry_artifact_root")
    add("--device", "device")
    add("--threads", "threads", type=int)
    add("--host", "host")
    add("--metrics-port", "metrics_port", type=int)
    add("--log-level", "log_level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


# OpenTelemetry's service.name of the workers' spans, unless OTEL_SERVICE_NAME says otherwise.
WORKER_SERVICE_NAME = "vision-worker"


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = WorkerSettings(**overrides)
        settings.jobs_config()
    except (ValidationError, ValueError) as exc:
        print(f"{PROG}: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    from vision.core import tracing
    from vision.core.errors import ConfigurationError

    try:
        # Checked here, where a bad value stops the worker; each pool process turns tracing on for itself.
        tracing.config_from_env(os.environ, WORKER_SERVICE_NAME)
    except ConfigurationError as exc:
        print(f"{PROG}: invalid tracing configuration: {exc}", file=sys.stderr)
        return 2
    tracing.configure_logging(settings.log_level)
    return supervise(settings)


def supervise(settings: WorkerSettings) -> int:
    # Before anything imports prometheus_client: every process of this tree writes its metrics here.
    metrics_dir = tempfile.mkdtemp(prefix="vision-worker-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    try:
        httpd, _ = start_http_server(settings.metrics_port, addr=settings.host, registry=registry)
    except OSError as exc:
        print(
            f"{PROG}: cannot bind metrics on {settings.host}:{settings.metrics_port}: {exc.strerror} "
            "(--metrics-port 0 picks a free one)",
            file=sys.stderr,
        )
        return 1
    port = httpd.server_address[1]
    env = {**os.environ, "VISION_WORKER_SETTINGS": settings.model_dump_json()}
    nodes: dict[str, subprocess.Popen[bytes]] = {}
    for queue in settings.queues:
        nodes[queue] = subprocess.Popen([sys.executable, "-m", "vision.runners.worker", queue], env=env)
    config = settings.jobs_config()
    print(
        f"{PROG}: queues {', '.join(config.queue(q) for q in settings.queues)} on {config.redacted_url()} "
        f"(pids {', '.join(f'{q}={p.pid}' for q, p in nodes.items())}); private addresses: "
        f"{settings.download_allow_private_addresses or 'refused'}",
        flush=True,
    )
    print(f"{PROG}: metrics at http://{settings.host}:{port}/metrics", flush=True)

    stopping = {"signal": 0}

    def forward(signum: int, _frame: Any) -> None:
        stopping["signal"] = signum
        for proc in nodes.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    try:
        while nodes:
            for queue, proc in list(nodes.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del nodes[queue]
                if not stopping["signal"]:
                    print(
                        f"{PROG}: the {queue} node exited with {rc}; stopping the others",
                        file=sys.stderr,
                        flush=True,
                    )
                    code = rc or 1
                    forward(signal.SIGTERM, None)
            time.sleep(0.2)
    finally:
        httpd.shutdown()
        import shutil

        shutil.rmtree(metrics_dir, ignore_errors=True)
    return code


# -- one node ---------------------------------------------------------------------------------------------


def run_node(queue: str) -> int:
    """One Celery worker node for `queue` (run by the supervisor with its settings in the environment)."""
    settings = WorkerSettings.model_validate(json.loads(os.environ["VISION_WORKER_SETTINGS"]))
    from vision.core import tracing

    tracing.configure_logging(settings.log_level, f"%(asctime)s %(levelname)s [{queue}] %(name)s: %(message)s%(trace_ids)s")
    from celery.signals import worker_process_init, worker_process_shutdown

    from vision.jobs.app import make_app
    from vision.runners.job_tasks import register

    config = settings.jobs_config()
    app = make_app(config)
    register(app)
    app.conf.vision_worker = settings

    @worker_process_init.connect(weak=False)
    def _pool_process_started(**_: Any) -> None:
        # Fine-tunes set their own torch threads; keep OpenMP from spinning up one thread per core per process.
        os.environ.setdefault("OMP_NUM_THREADS", str(settings.threads or _cpus()))
        # Celery's pool processes are daemonic, and Python refuses children to daemonic processes; a fine-tune's
        # DataLoader workers are such children. They end with their DataLoader, and watch this process: they
        # exit on their own when it dies (a SIGKILLed pool process leaves none behind).
        import multiprocessing

        multiprocessing.current_process()._config["daemon"] = False  # type: ignore[attr-defined]
        # After the fork: the span exporter's thread does not survive one (the instrumentation's own advice).
        tracing.configure(WORKER_SERVICE_NAME)
        tracing.instrument_celery()

    @worker_process_shutdown.connect(weak=False)
    def _pool_process_gone(pid: int | None = None, **_: Any) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())
        tracing.shutdown()  # what the process traced reaches the receiver before it exits

    concurrency = 1 if queue == TRAIN else settings.concurrency
    argv = [
        "worker",
        "--queues",
        config.queue(queue),
        "--concurrency",
        str(concurrency),
        "--pool",
        "prefork",
        "--hostname",
        f"{config.namespace}-{queue}@{socket.gethostname()}",
        "--loglevel",
        settings.log_level,
        "--without-gossip",
        "--without-mingle",
        "--prefetch-multiplier",
        "1",
    ]
    app.worker_main(argv)
    return 0


def _cpus() -> int:
    from vision.core.cpus import available_cpus

    return available_cpus()


if __name__ == "__main__":
    sys.exit(run_node(sys.argv[1]))
