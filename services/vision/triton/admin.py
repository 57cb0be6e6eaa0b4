"""Triton's admin API over HTTP (tritonclient.http): readiness, metadata, config, statistics, and the
repository extension (index, load, unload) that publishing and retiring versions drive.

Control plane only: the serving path (vision.backends.triton_backend) talks gRPC and never imports this
module, so the service does not load gevent, which tritonclient.http is built on.

Each call opens its own client. geventhttpclient's connection pool belongs to the gevent hub of the thread
that created it and fails when used from another thread; admin calls are rare (publish, retire, tests,
start-up polling), so a fresh loopback connection per call costs nothing that matters and makes one
`TritonAdmin` safe to share between threads. The per-call client also lets a load wait longer than a
readiness probe (the timeout is a property of the client in tritonclient.http).
"""

from __future__ import annotations

import time
from typing import Any

from vision.triton.errors import TritonAdminError, TritonError, TritonModelLoadError


def _version(version: str | int) -> str:
    return "" if version == "" else str(int(version))


class TritonAdmin:
    """Admin calls against Triton's HTTP endpoint `url` ("127.0.0.1:PORT", no scheme)."""

    def __init__(self, url: str, *, timeout_s: float = 30.0, load_timeout_s: float = 300.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        # Loading a model builds its instances (an ORT session per instance, TensorRT engines on GPUs).
        self.load_timeout_s = load_timeout_s

    def _call(self, what: str, method: str, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        from tritonclient.utils import InferenceServerException

        try:
            import tritonclient.http as httpclient
        except (ImportError, RuntimeError) as exc:  # tritonclient raises RuntimeError when gevent is missing
            raise TritonError(
                f"Triton's admin client needs tritonclient.http, which needs geventhttpclient "
                f"(pip install geventhttpclient==2.6.1; not the tritonclient[http] extra): {exc}"
            ) from None

        t = timeout or self.timeout_s
        try:
            with httpclient.InferenceServerClient(self.url, connection_timeout=t, network_timeout=t) as client:
                return getattr(client, method)(*args, **kwargs)
        except InferenceServerException as exc:
            detail = str(exc.message())
            raise TritonAdminError(f"{what} at {self.url}: {detail}", str(exc.status() or ""), detail) from None
        except OSError as exc:  # refused, reset, timed out: the server is not there (yet)
            raise TritonAdminError(f"{what} at {self.url}: {exc}", "", str(exc)) from None

    # -- health and metadata
    def server_ready(self, timeout: float = 2.0) -> bool:
        """True when the server answers ready (strict readiness: every loaded model ready); False when it is
        not ready or not reachable."""
        try:
            return bool(self._call("server readiness", "is_server_ready", timeout=timeout))
        except TritonAdminError:
            return False

    def server_metadata(self) -> dict[str, Any]:
        """{"name": "triton", "version": "2.51.0", "extensions": [...]}."""
        return dict(self._call("server metadata", "get_server_metadata"))

    def is_model_ready(self, name: str, version: str | int = "") -> bool:
        """Readiness of `name` (a specific `version`, or the versions Triton's policy serves)."""
        try:
            return bool(self._call(f"readiness of {name!r}", "is_model_ready", name, _version(version)))
        except TritonAdminError:
            return False

    def model_metadata(self, name: str, version: str | int = "") -> dict[str, Any]:
        return dict(self._call(f"metadata of {name!r}", "get_model_metadata", name, _version(version)))

    def model_config(self, name: str, version: str | int = "") -> dict[str, Any]:
        """The model's config as Triton loaded it (JSON form of inference.ModelConfig)."""
        return dict(self._call(f"config of {name!r}", "get_model_config", name, _version(version)))

    def model_stats(self, name: str, version: str | int = "") -> dict[str, Any]:
        """Statistics of `name` (one version, or the first one Triton lists): inference_count,
        execution_count, inference_stats, batch_stats, ..."""
        stats = self._call(f"statistics of {name!r}", "get_inference_statistics", name, _version(version))
        entries = stats.get("model_stats") or []
        return dict(entries[0]) if entries else {}

    def shared_memory_status(self) -> list[dict[str, Any]]:
        """System shared-memory regions registered with the server (name, key, offset, byte_size)."""
        return list(self._call("system shared-memory status", "get_system_shared_memory_status"))

    # -- the repository extension (model control mode "explicit")
    def repository_index(self) -> list[dict[str, Any]]:
        """One entry per model version Triton knows: name, version, state (READY, UNAVAILABLE, UNLOADING,
        ...) and, when a load failed, `reason`."""
        return list(self._call("repository index", "get_model_repository_index"))

    def load_model(self, name: str) -> None:
        """(Re)load `name` from the repository, re-reading its config.pbtxt and version folders.

        Measured with Triton 2.51: when the model's files changed since its last load (Triton compares
        modification times; a new version or a new policy in config.pbtxt is a change), every version the
        policy names is reloaded, unchanged ones included, and each is swapped in only once its new
        instance is ready, so versions in use keep answering throughout; a version dropped from the policy
        is unloaded. If the load fails, Triton keeps serving what it had. TritonModelLoadError carries
        Triton's reason (HTTP 500 for a model that cannot be loaded)."""
        try:
            self._call(f"loading {name!r}", "load_model", name, timeout=self.load_timeout_s)
        except TritonAdminError as exc:
            raise TritonModelLoadError(name, exc.detail, exc.status) from None

    def unload_model(self, name: str) -> None:
        """Unload every version of `name` (the repository is left as it is)."""
        self._call(f"unloading {name!r}", "unload_model", name)

    def wait_for_model(self, name: str, version: str | int, *, ready: bool = True, timeout: float = 60.0) -> None:
        """Block until `version` of `name` is ready (or, with ready=False, no longer ready); TritonAdminError
        after `timeout` seconds. Triton answers a load before a dropped version has finished unloading."""
        deadline = time.monotonic() + timeout
        while self.is_model_ready(name, version) != ready:
            if time.monotonic() > deadline:
                state = "ready" if ready else "unloaded"
                raise TritonAdminError(f"{name!r} version {version} was not {state} after {timeout:g} s")
            time.sleep(0.05)
