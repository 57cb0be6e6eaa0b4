"""The Triton runtime: a venv holding nvidia-pytriton's tritonserver 2.51, set up once per machine.

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
  `$VISION_TRITON_SITE_PACKAGES` (set by `TritonRuntime.env`) first on `sys.path` before importing numpy;
  failing that it derives site-packages from the backend directory on `sys.path`.

The server process is `vision.triton.process.TritonProcess`, its admin API `vision.triton.admin.TritonAdmin`,
the `vision triton` command `vision.triton.cli.main`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vision.triton.errors import TritonRuntimeMissing, TritonSetupError

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
    venv: Path | None = None, *, python: str | None = None, force: bool = False, log: Callable[[str], None] | None = None
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
