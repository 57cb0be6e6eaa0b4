"""A real NVIDIA Triton Inference Server on this machine: its runtime, and a process that serves a repository.

The only `tritonserver` reachable offline is the 2.51 binary inside PyPI's `nvidia-pytriton` 0.7.0 (python
backend only, no onnxruntime/TensorRT backends). `nvidia-pytriton` pins numpy<2 while the rest of the stack
wants numpy 2, so it lives in a venv of its own (default `<repo>/.triton-venv`, env `VISION_TRITON_VENV`)
that also holds what our python-backend models import: numpy 1.26 and onnxruntime.

How the pieces fit, and why (each was hit here):
- `tritonserver` needs `LD_LIBRARY_PATH=<site-packages>/nvidia_pytriton.libs` and
  `--backend-directory=<site-packages>/pytriton/tritonserver/backends`; the python backend wants its
  `triton_python_backend_stub` next to `libtriton_python.so`, so setup copies the one for the venv's
  Python (`python_backend_stubs/3.11/`) there.
- The stub embeds the *system* libpython3.11 (Debian's, prefix /usr): its `sys.path` is the system one, it
  ignores PYTHONPATH and cannot see the venv. Our model.py (vision/triton/python_model.py) therefore puts
  `$VISION_TRITON_SITE_PACKAGES` (set here) first on `sys.path` before importing numpy; failing that it
  derives site-packages from the backend directory on `sys.path`.
- Model control mode is `explicit` with `--load-model=*`: every model in the repository is loaded at
  start-up (a model that fails to load stops the server, with Triton's reason in the log, because
  `--exit-on-error` stays on), and the repository API (load/unload) works afterwards, which is how a newly
  published version is taken up without a restart. `--strict-readiness` makes /v2/health/ready mean "all
  loaded models are ready".
- A directory at the repository root is taken for a model by `--load-model=*`, hidden or not
  (`.staging-x` made start-up fail); stage writes outside the repository (see repository.py).
- Auto-complete is disabled: our configs are complete, and it would start one more python stub per model.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

# The Triton venv, exactly. `nvidia-pytriton` is installed without its dependencies: only its tritonserver
# binary, libraries and python-backend files are used (its Python API would pull in tritonclient, gevent,
# pyzmq, ... and numpy<2, none of which the server needs). numpy 1.26: BYTES tensors crashed the 2.51 stub
# with numpy 2. onnxruntime 1.31.1 is the main venv's version (same kernels, same numbers), supports
# numpy 1.26 on cp311 and runs opset-17 graphs; flatbuffers/packaging/protobuf are its declared dependencies.
PYTRITON_PIN = "nvidia-pytriton==0.7.0"
PINS: tuple[str, ...] = (
    PYTRITON_PIN,
    "numpy==1.26.4",
    "onnxruntime==1.31.1",
    "flatbuffers==25.12.19",
    "packaging==26.3",
    "protobuf==7.36.2",
)
# Python versions the package ships a python-backend stub for.
STUB_PYTHONS = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13")
MARKER = "vision-triton-runtime.json"
SITE_PACKAGES_ENV = "VISION_TRITON_SITE_PACKAGES"
VENV_ENV = "VISION_TRITON_VENV"
SHM_PREFIX = "vision_triton_"
ControlMode = Literal["explicit", "none"]

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class TritonError(RuntimeError):
    """Base class of this module's errors."""


class TritonRuntimeMissing(TritonError):
    """The Triton venv is absent or incomplete; the message says the command that sets it up."""


class TritonSetupError(TritonError):
    """Setting the runtime up failed (pip, missing libpython, ...)."""


class TritonStartError(TritonError):
    """tritonserver exited or did not become ready; the message carries Triton's reasons and log tail."""


class TritonModelLoadError(TritonError):
    """Triton refused to load a model; `reason` is Triton's own message."""

    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        self.reason = reason
        super().__init__(f"Triton could not load model {model!r}: {reason}")


def repo_root() -> Path:
    here = Path(__file__).resolve()
    root = here.parents[3]  # services/vision/triton/runtime.py -> repository root
    return root if (root / "pyproject.toml").exists() else Path.cwd()


def default_venv() -> Path:
    return Path(os.environ.get(VENV_ENV) or repo_root() / ".triton-venv")


def setup_command(venv: Path | None = None) -> str:
    cmd = f"{sys.executable} -m vision.triton --setup-only"
    if venv is not None and venv != default_venv():
        cmd += f" --venv {venv}"
    return cmd


@dataclass(frozen=True)
class TritonRuntime:
    """A prepared Triton venv: where the server, its libraries and its backends are."""

    venv: Path
    python: Path
    python_version: str  # "3.11": the stub and the wheels are for this version
    site_packages: Path
    tritonserver: Path
    lib_dir: Path
    backend_dir: Path
    # Added to LD_LIBRARY_PATH when the system has no libpython<version>.so for the stub (pyenv-only hosts).
    extra_library_dirs: tuple[Path, ...] = ()

    @property
    def stub(self) -> Path:
        return self.backend_dir / "python" / "triton_python_backend_stub"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for tritonserver (and so for its python stubs)."""
        env = dict(os.environ if base is None else base)
        # The embedded interpreter must find its own stdlib; a PYTHONHOME/PYTHONPATH meant for another Python
        # would break or shadow it. The stub reads our site-packages from SITE_PACKAGES_ENV instead.
        env.pop("PYTHONHOME", None)
        env.pop("PYTHONPATH", None)
        libs = [str(self.lib_dir), *map(str, self.extra_library_dirs)]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        env[SITE_PACKAGES_ENV] = str(self.site_packages)
        return env


def _read_marker(venv: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((venv / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _site_packages(venv: Path) -> Path | None:
    found = sorted(venv.glob("lib/python3.*/site-packages"))
    return found[0] if found else None


def _missing(venv: Path, what: str) -> TritonRuntimeMissing:
    return TritonRuntimeMissing(
        f"Triton runtime not found in {venv}: {what}. Set it up (once, about 10-30 s, needs only the package "
        f"registry) with:\n    {setup_command(venv)}\n(or `vision triton --setup-only`; env {VENV_ENV} moves it)"
    )


def find_runtime(venv: Path | None = None) -> TritonRuntime:
    """The prepared runtime in `venv` (default: `default_venv()`), or TritonRuntimeMissing saying how to set it up."""
    venv = Path(venv) if venv is not None else default_venv()
    marker = _read_marker(venv)
    if marker is None:
        raise _missing(venv, f"no {MARKER} (setup never finished)")
    if marker.get("pins") != list(PINS):
        raise _missing(venv, f"it was set up with other pins ({marker.get('pins')}); wanted {list(PINS)}")
    sp = _site_packages(venv)
    if sp is None:
        raise _missing(venv, "no lib/python3.*/site-packages")
    runtime = TritonRuntime(
        venv=venv,
        python=venv / "bin" / "python",
        python_version=str(marker["python_version"]),
        site_packages=sp,
        tritonserver=sp / "pytriton" / "tritonserver" / "bin" / "tritonserver",
        lib_dir=sp / "nvidia_pytriton.libs",
        backend_dir=sp / "pytriton" / "tritonserver" / "backends",
        extra_library_dirs=tuple(Path(p) for p in marker.get("extra_library_dirs", [])),
    )
    for path in (runtime.python, runtime.tritonserver, runtime.lib_dir, runtime.stub):
        if not path.exists():
            raise _missing(venv, f"{path} is missing")
    return runtime


@contextlib.contextmanager
def _locked(venv: Path) -> Iterator[None]:
    """One setup at a time per venv (parallel test sessions, CI steps)."""
    key = hashlib.sha256(str(venv.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"vision-triton-setup-{key}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pick_python(python: str | None) -> str:
    """A Python whose minor version has a stub; the venv's wheels (cp3XX) must match the stub's libpython."""
    if python:
        return python
    if f"{sys.version_info.major}.{sys.version_info.minor}" in STUB_PYTHONS:
        return sys.executable
    for candidate in ("python3.11", "python3.12", "python3.10", "/usr/bin/python3"):
        found = shutil.which(candidate)
        if found:
            return found
    raise TritonSetupError(f"no Python among {STUB_PYTHONS} found for the Triton venv; pass --python")


def _run(cmd: Sequence[str], *, env: dict[str, str] | None = None, what: str) -> str:
    proc = subprocess.run(list(cmd), check=False, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip()
        raise TritonSetupError(f"{what} failed ({' '.join(cmd)}), exit {proc.returncode}:\n{out[-4000:]}")
    return proc.stdout


def _libpython_dirs(python: Path, stub: Path, lib_dir: Path) -> list[str]:
    """Library dirs the stub needs beyond the system's: none when ld.so finds libpython3.X already."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return []
    env = {**os.environ, "LD_LIBRARY_PATH": str(lib_dir)}
    out = subprocess.run([ldd, str(stub)], check=False, capture_output=True, text=True, env=env).stdout
    missing = [line.split()[0] for line in out.splitlines() if "not found" in line]
    if not missing:
        return []
    if not all(name.startswith("libpython") for name in missing):
        raise TritonSetupError(f"the python backend stub {stub} misses shared libraries: {missing}")
    libdir = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')"],
        what="asking the venv's Python for its LIBDIR",
    ).strip()
    if libdir and all((Path(libdir) / name).exists() for name in missing):
        return [libdir]
    raise TritonSetupError(
        f"the python backend stub needs {missing}, which neither the system nor {python} provides. "
        f"Install the shared libpython (Debian: `apt-get install lib{missing[0].split('.so')[0][3:]}`) "
        "or use a Python built with --enable-shared (--python)."
    )


# Run by the Triton venv's Python after pip: proves numpy and onnxruntime import, says where site-packages is.
_PROBE = (
    "import json, sys, sysconfig, numpy, onnxruntime;"
    "print(json.dumps({'python_version': '%d.%d' % sys.version_info[:2],"
    " 'site_packages': sysconfig.get_paths()['purelib'],"
    " 'numpy': numpy.__version__, 'onnxruntime': onnxruntime.__version__}))"
)


def setup_runtime(
    venv: Path | None = None, *, python: str | None = None, force: bool = False, log: Any = None
) -> TritonRuntime:
    """Create (idempotently) the Triton venv and prepare the python backend; returns the runtime.

    Needs only the package registry (pip's configured index). A venv whose marker names the current pins is
    reused as is; a partial or outdated one is rebuilt from scratch.
    """
    venv = Path(venv) if venv is not None else default_venv()
    say = log or (lambda msg: None)
    with _locked(venv):
        if not force:
            try:
                return find_runtime(venv)
            except TritonRuntimeMissing:
                pass
        if venv.exists():
            say(f"removing incomplete or outdated {venv}")
            shutil.rmtree(venv)
        base = _pick_python(python)
        say(f"creating {venv} with {base}")
        _run([base, "-m", "venv", str(venv)], what="creating the Triton venv")
        vpy = venv / "bin" / "python"
        pip_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
        # The machine's find-links dir holds a CPU torch wheel for the main venv; nothing here wants it.
        pip_env["PIP_FIND_LINKS"] = ""
        say(f"installing {' '.join(PINS)}")
        _run(
            [str(vpy), "-m", "pip", "install", "--quiet", "--no-deps", *PINS], env=pip_env, what="pip install"
        )
        info = json.loads(
            _run([str(vpy), "-c", _PROBE], what="checking numpy and onnxruntime in the Triton venv")
        )
        pyver = info["python_version"]
        if pyver not in STUB_PYTHONS:
            raise TritonSetupError(f"nvidia-pytriton ships no python backend stub for Python {pyver}")
        sp = Path(info["site_packages"])
        server_dir = sp / "pytriton" / "tritonserver"
        stub_src = server_dir / "python_backend_stubs" / pyver / "triton_python_backend_stub"
        stub_dst = server_dir / "backends" / "python" / "triton_python_backend_stub"
        if not stub_src.exists():
            raise TritonSetupError(f"{stub_src} is missing from {PYTRITON_PIN}")
        shutil.copy2(stub_src, stub_dst)
        stub_dst.chmod(0o755)
        extra = _libpython_dirs(vpy, stub_dst, sp / "nvidia_pytriton.libs")
        marker = {
            "pins": list(PINS),
            "python_version": pyver,
            "base_python": base,
            "numpy": info["numpy"],
            "onnxruntime": info["onnxruntime"],
            "extra_library_dirs": extra,
        }
        (venv / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        say(
            f"Triton runtime ready in {venv} (python {pyver}, numpy {info['numpy']}, onnxruntime {info['onnxruntime']})"
        )
        return find_runtime(venv)


# --------------------------------------------------------------------------------------------------------
# The server process


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
        try:
            status, _ = self.http("GET", "/v2/health/ready", timeout=2)
        except OSError:
            return False
        return status == 200

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

    # -- HTTP/REST API (urllib, loopback only)
    def http(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        """(status, decoded JSON or text) of a request to the server's HTTP endpoint."""
        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        req = urllib.request.Request(self.http_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with _NO_PROXY.open(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        text = raw.decode(errors="replace")
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, text

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        status, payload = self.http(method, path, body)
        if status != 200:
            raise TritonError(f"{method} {path} -> HTTP {status}: {_error_text(payload)}")
        return payload

    def is_model_ready(self, name: str, version: str | int = "") -> bool:
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version != "" else "") + "/ready"
        return self.http("GET", path)[0] == 200

    def server_metadata(self) -> dict[str, Any]:
        """GET /v2: {"name": "triton", "version": "2.51.0", "extensions": [...]}."""
        return dict(self._json("GET", "/v2"))

    def model_config(self, name: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/v2/models/{name}/config"))

    def model_stats(self, name: str, version: str | int = "") -> dict[str, Any]:
        """The first entry of /v2/models/<name>/stats: inference_count, execution_count, inference_stats, ..."""
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version != "" else "") + "/stats"
        stats = self._json("GET", path)["model_stats"]
        return dict(stats[0]) if stats else {}

    def repository_index(self) -> list[dict[str, Any]]:
        """Every model in the repository with its state (READY, UNAVAILABLE, ...) and, if failed, `reason`."""
        return list(self._json("POST", "/v2/repository/index", {}))

    def load_model(self, name: str) -> None:
        """(Re)load `name` from the repository (explicit mode); TritonModelLoadError with Triton's reason."""
        status, payload = self.http("POST", f"/v2/repository/models/{name}/load", {}, timeout=300)
        if status != 200:
            raise TritonModelLoadError(name, _error_text(payload))

    def unload_model(self, name: str) -> None:
        self._json("POST", f"/v2/repository/models/{name}/unload", {})


def _error_text(payload: Any) -> str:
    if isinstance(payload, dict) and "error" in payload:
        return str(payload["error"])
    return str(payload)


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


# --------------------------------------------------------------------------------------------------------
# `python -m vision.triton` / `vision triton`


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vision triton",
        description="Set up the local Triton runtime (a venv with nvidia-pytriton's tritonserver 2.51) and/or run "
        "tritonserver on 127.0.0.1 against a model repository, until interrupted.",
    )
    parser.add_argument(
        "--repository", type=Path, help="model repository directory (config.pbtxt + versions)"
    )
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (0 = any free; default 8001)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port (0 = any free; default 8000)")
    parser.add_argument(
        "--metrics-port", type=int, default=8002, help="Prometheus port (0 = any free; default 8002)"
    )
    parser.add_argument("--setup-only", action="store_true", help="create/verify the Triton venv and exit")
    parser.add_argument(
        "--no-setup",
        action="store_true",
        help="fail if the Triton venv is missing or outdated instead of setting it up first (by default a "
        "missing runtime is set up automatically: once, about 20 s, needs only the package registry)",
    )
    parser.add_argument(
        "--venv", type=Path, default=None, help=f"Triton venv (default {default_venv()}; env {VENV_ENV})"
    )
    parser.add_argument("--python", default=None, help="Python 3.8-3.13 for the venv (default: this one)")
    parser.add_argument(
        "--model-control-mode",
        choices=("explicit", "none"),
        default="explicit",
        help="explicit (default): load all at start, repository API enabled; none: load all, API disabled",
    )
    parser.add_argument("--log-file", type=Path, default=None, help="tritonserver log (default: a temp file)")
    parser.add_argument("--log-verbose", type=int, default=0)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    def say(msg: str) -> None:
        print(f"vision triton: {msg}", file=sys.stderr, flush=True)

    if args.setup_only:
        t0 = time.monotonic()
        try:
            runtime = setup_runtime(args.venv, python=args.python, log=say)
        except TritonError as exc:
            say(str(exc))
            return 1
        print(
            json.dumps(
                {
                    "venv": str(runtime.venv),
                    "tritonserver": str(runtime.tritonserver),
                    "seconds": round(time.monotonic() - t0, 1),
                }
            )
        )
        return 0
    if args.repository is None:
        parser.error("--repository is required unless --setup-only")
    try:
        runtime = find_runtime(args.venv)
    except TritonRuntimeMissing as exc:
        if args.no_setup:
            say(str(exc))
            return 1
        venv = Path(args.venv) if args.venv is not None else default_venv()
        say(f"Triton runtime not set up in {venv}; setting it up now (once, about 20 s, needs only the package registry)")
        t0 = time.monotonic()
        try:
            runtime = setup_runtime(args.venv, python=args.python, log=say)
        except TritonError as setup_exc:
            say(str(setup_exc))
            return 1
        say(f"runtime set up in {time.monotonic() - t0:.1f} s")
    server = TritonProcess(
        args.repository,
        runtime=runtime,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        model_control_mode=args.model_control_mode,
        log_path=args.log_file,
        log_verbose=args.log_verbose,
    )
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except TritonError as exc:
        say(str(exc))
        return 1
    print(f"vision triton: gRPC listening on {server.grpc_address}", flush=True)
    print(f"vision triton: HTTP at {server.http_url}", flush=True)
    print(f"vision triton: metrics at {server.metrics_url}", flush=True)
    print(
        f"vision triton: log at {server.log_path} (pid {server.pid}, ready in {server.started_s:.2f} s)",
        flush=True,
    )
    try:
        while not stopping and server.proc is not None and server.proc.poll() is None:
            time.sleep(0.2)
    finally:
        code = server.stop()
    if not stopping:
        say(f"tritonserver exited with code {code}; log {server.log_path}")
        return 1
    return 0
