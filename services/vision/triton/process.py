"""`TritonProcess`: a tritonserver on 127.0.0.1 serving a model repository, started and stopped by us.

- Model control mode is `explicit` with `--load-model=*`: every model in the repository is loaded at
  start-up (a model that fails to load stops the server, with Triton's reason in the log, because
  `--exit-on-error` stays on), and the repository API (load/unload) works afterwards, which is how a newly
  published version is taken up without a restart (vision.triton.repository.add_version). Which versions
  load is the config's explicit `version_policy`, never Triton's default (newest only).
- `--strict-readiness` makes /v2/health/ready mean "all loaded models are ready".
- A directory at the repository root is taken for a model by `--load-model=*`, hidden or not
  (`.staging-x` made start-up fail); repository writes stage outside the repository.
- Auto-complete is disabled: our configs are complete, and it would start one more python stub per model.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import uuid
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Self

from vision.triton.admin import TritonAdmin
from vision.triton.errors import TritonStartError
from vision.triton.runtime import TritonRuntime, find_runtime

ControlMode = Literal["explicit", "none"]
# Prefix of the python backend's /dev/shm regions (one random prefix per server, so stop() removes ours).
SHM_PREFIX = "vision_triton_"


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (held together while picking, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


_live: weakref.WeakSet[TritonProcess] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for proc in list(_live):
        with contextlib.suppress(Exception):
            proc.stop(timeout=5)


class TritonProcess:
    """tritonserver on 127.0.0.1 serving `repository`; started by `start()`, stopped by `stop()` (or `with`).

    Ports left at 0 are picked free. `urls`: `grpc_address` ("127.0.0.1:PORT", what tritonclient.grpc
    takes), `http_url`, `metrics_url`. Everything the server and its python stubs print goes to `log_path`.
    """

    def __init__(
        self,
        repository: Path,
        *,
        runtime: TritonRuntime | None = None,
        grpc_port: int = 0,
        http_port: int = 0,
        metrics_port: int = 0,
        model_control_mode: ControlMode = "explicit",
        load_models: Sequence[str] = ("*",),
        log_path: Path | None = None,
        log_verbose: int = 0,
        exit_on_error: bool = True,
        exit_timeout_s: int = 10,
        gpu: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.repository = Path(repository).resolve()
        self.runtime = runtime or find_runtime()
        self._requested_ports = (grpc_port, http_port, metrics_port)
        self.grpc_port, self.http_port, self.metrics_port = grpc_port, http_port, metrics_port
        self.model_control_mode = model_control_mode
        self.load_models = tuple(load_models)
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = Path(log_path)
        self.log_verbose = log_verbose
        self.exit_on_error = exit_on_error
        self.exit_timeout_s = exit_timeout_s
        self.gpu = gpu
        self.extra_args = tuple(extra_args)
        # Our own prefix for the python backend's /dev/shm regions, so stop() can remove exactly ours.
        self.shm_prefix = f"{SHM_PREFIX}{uuid.uuid4().hex[:12]}_"
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopped = False
        self.started_s = 0.0  # seconds from spawn to ready, for the record

    # -- addresses
    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def command(self) -> list[str]:
        rt = self.runtime
        cmd = [
            str(rt.tritonserver),
            f"--model-repository={self.repository}",
            f"--backend-directory={rt.backend_dir}",
            f"--model-control-mode={self.model_control_mode}",
            "--strict-readiness=true",
            f"--exit-on-error={'true' if self.exit_on_error else 'false'}",
            "--disable-auto-complete-config",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--allow-metrics=true",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        if self.model_control_mode == "explicit":
            cmd += [f"--load-model={m}" for m in self.load_models]
        if not self.gpu:
            # No CUDA here: skip the pinned/CUDA pools and GPU metrics (saves start-up noise and time).
            cmd += [
                "--pinned-memory-pool-byte-size=0",
                "--cuda-memory-pool-byte-size=0:0",
                "--allow-gpu-metrics=false",
            ]
        return cmd + list(self.extra_args)

    # -- lifecycle
    def start(self, timeout: float = 120.0) -> Self:
        """Spawn tritonserver and wait until /v2/health/ready; TritonStartError (with Triton's reasons) if not."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        if not self.repository.is_dir():
            raise TritonStartError(f"model repository {self.repository} is not a directory")
        # Ports picked free can be taken by someone else before tritonserver binds them: pick again then.
        attempts = 1 if any(self._requested_ports) else 3
        for attempt in range(attempts):
            picked = iter(free_ports(3))
            self.grpc_port, self.http_port, self.metrics_port = (
                p or next(picked) for p in self._requested_ports
            )
            try:
                return self._spawn_and_wait(timeout)
            except TritonStartError as exc:
                text = str(exc).lower()
                if attempt + 1 < attempts and ("address already in use" in text or "failed to start" in text):
                    continue
                raise
        raise AssertionError("unreachable")

    def _spawn_and_wait(self, timeout: float) -> Self:
        t0 = time.monotonic()
        self._stopped = False
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.runtime.env(),
                cwd=str(self.repository),
                # Own process group: the python stubs are its children; stop() can reach stragglers.
                start_new_session=True,
            )
        _live.add(self)
        deadline = t0 + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                self._cleanup_shm()
                raise TritonStartError(
                    self._failure(f"tritonserver exited with code {code} before it was ready")
                )
            if self._ready():
                self.started_s = time.monotonic() - t0
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise TritonStartError(self._failure(f"tritonserver was not ready after {timeout:.0f} s"))
            time.sleep(0.05)

    def _ready(self) -> bool:
        return self.admin.server_ready(timeout=2)

    def _failure(self, headline: str) -> str:
        text = self.log_text()
        reasons = model_failures(text)
        parts = [headline + f" (log {self.log_path})."]
        if reasons:
            parts.append(
                "Models that failed to load:\n" + "\n".join(f"  {m}: {r}" for m, r in reasons.items())
            )
        parts.append("Log tail:\n" + "\n".join(text.splitlines()[-40:]))
        return "\n".join(parts)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (Triton unloads models, its stubs exit), then SIGKILL after `timeout`; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if self._stopped:
            return proc.returncode
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Stubs outlive a killed server for a while; they are in the server's own process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if _group_alive(proc.pid):
                os.killpg(proc.pid, signal.SIGKILL)
        self._cleanup_shm()
        _live.discard(self)
        self._stopped = True
        return proc.returncode

    def _cleanup_shm(self) -> None:
        for leftover in Path("/dev/shm").glob(self.shm_prefix + "*"):
            with contextlib.suppress(OSError):
                leftover.unlink()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- admin API (tritonclient.http, loopback only)
    @property
    def admin(self) -> TritonAdmin:
        """Triton's HTTP admin API of this server (repository load/unload/index, readiness, config, stats)."""
        return TritonAdmin(f"127.0.0.1:{self.http_port}")

    # Shorthands kept for callers that hold only the process (tests, loadtest).
    def is_model_ready(self, name: str, version: str | int = "") -> bool:
        return self.admin.is_model_ready(name, version)

    def server_metadata(self) -> dict[str, Any]:
        return self.admin.server_metadata()

    def model_config(self, name: str, version: str | int = "") -> dict[str, Any]:
        return self.admin.model_config(name, version)

    def model_stats(self, name: str, version: str | int = "") -> dict[str, Any]:
        return self.admin.model_stats(name, version)

    def repository_index(self) -> list[dict[str, Any]]:
        return self.admin.repository_index()

    def load_model(self, name: str) -> None:
        self.admin.load_model(name)

    def unload_model(self, name: str) -> None:
        self.admin.unload_model(name)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


_FAILED = re.compile(r"failed to load '([^']+)' version \d+: (.*?)\"?$")


def model_failures(log: str) -> dict[str, str]:
    """Model name -> Triton's load-failure reason, from a tritonserver log."""
    out: dict[str, str] = {}
    for line in log.splitlines():
        if m := _FAILED.search(line):
            out[m.group(1)] = m.group(2).encode().decode("unicode_escape", errors="replace").strip()
    return out
