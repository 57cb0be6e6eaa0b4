"""Shared by the jobs tests: a real Redis, real `vision worker` processes and a local HTTP server.

Every test session uses its own namespace (queues and Redis keys `jt<pid><random>:...`), so sessions of
other engineers on the same Redis never see each other's jobs. Processes are stopped by the pid (and
process group) this module started.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest

from conftest import ServerProcess
from vision.v1 import jobs_pb2, jobs_pb2_grpc

REDIS_URL = os.environ.get("VISION_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TERMINAL = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)


def redis_answers(url: str = REDIS_URL) -> bool:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def redis_url() -> str:
    if not redis_answers():
        if os.environ.get("CI"):
            pytest.fail(f"Redis is not reachable at {REDIS_URL} (.ci/run starts it)")
        pytest.skip(f"Redis is not reachable at {REDIS_URL}")
    return REDIS_URL


@pytest.fixture(scope="session")
def namespace(redis_url: str) -> Iterator[str]:
    """A namespace of this session; its Redis keys are deleted at the end."""
    import redis

    ns = f"jt{os.getpid()}{uuid.uuid4().hex[:6]}"
    yield ns
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{ns}*", count=1000):  # and the sub-namespaces (ns + "s", "n")
        client.delete(key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    """`vision worker` in its own process group (so its Celery nodes and pool processes stop with it)."""

    def __init__(self, log_path: Path, namespace: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vision.cli",
                "worker",
                "--redis-url",
                REDIS_URL,
                "--namespace",
                namespace,
                "--metrics-port",
                "0",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.metrics_url = ""

    def wait_ready(self, queues: tuple[str, ...] = ("download", "train"), timeout: float = 120) -> "Worker":
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while not self.metrics_url:
            line = self.proc.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"worker exited ({self.proc.wait()}); log:\n{self.log()}")
            if m := re.search(r"metrics at (\S+)", line):
                self.metrics_url = m.group(1)
        while time.monotonic() < deadline:
            text = self.log()
            if all(re.search(rf"{q}@\S+ ready", text) for q in queues):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited ({self.proc.returncode}); log:\n{text}")
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready; log:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill_all(self) -> None:
        """SIGKILL the whole worker: supervisor, Celery nodes, pool processes (a lost node)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of this worker's own group
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self._log.close()


def jobs_server(tmp: Path, namespace: str, *args: str, redis_url: str = REDIS_URL) -> ServerProcess:
    return ServerProcess(
        ["--services", "jobs", "--redis-url", redis_url, "--jobs-namespace", namespace, *args],
        tmp / f"serve-{uuid.uuid4().hex[:6]}.log",
    ).wait_ready()


def stub(address: str) -> jobs_pb2_grpc.JobsStub:
    return jobs_pb2_grpc.JobsStub(
        grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
    )


def wait_job(
    jobs: jobs_pb2_grpc.JobsStub,
    job_id: str,
    timeout: float = 600,
    until: Callable[[jobs_pb2.Job], bool] | None = None,
) -> jobs_pb2.Job:
    deadline = time.monotonic() + timeout
    while True:
        job = jobs.GetJob(jobs_pb2.GetJobRequest(id=job_id), timeout=10)
        if until(job) if until else job.state in TERMINAL:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {jobs_pb2.JobState.Name(job.state)}: {job}")
        time.sleep(0.1)


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vision.cli", *args], capture_output=True, text=True, timeout=timeout
    )


# -- a local HTTP server with generated images and hostile endpoints ---------------------------------------


class Site:
    """A threaded HTTP server on 127.0.0.1: `routes[path] = handler(request) -> None` or static bodies."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        self.handlers: dict[str, Callable[[BaseHTTPRequestHandler], None]] = {}
        self.hits: dict[str, int] = {}
        self.delay_s = 0.0
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?")[0]
                site.hits[path] = site.hits.get(path, 0) + 1
                if site.delay_s:
                    time.sleep(site.delay_s)
                try:
                    if path in site.handlers:
                        site.handlers[path](self)
                    elif path in site.files:
                        body, ctype = site.files[path]
                        self.send_response(200)
                        self.send_header("Content-Type", ctype)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                    else:
                        body = b"not found"
                        self.send_response(404)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def redirect(location: str) -> Callable[[BaseHTTPRequestHandler], None]:
    def handle(req: BaseHTTPRequestHandler) -> None:
        req.send_response(302)
        req.send_header("Location", location)
        req.send_header("Content-Length", "0")
        req.end_headers()

    return handle


def png(img: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # type: ignore[attr-defined]
    return buf.getvalue()
