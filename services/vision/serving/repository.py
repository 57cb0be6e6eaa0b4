"""The live model set: the served models, found by name and version, changed while serving.

A `ServedModel` pairs a `ModelCard` (vision.models.card: the record clients see) with the backend that
runs it, and, for a model followed through the model registry, that entry's live status.

Changes are atomic: the set is an immutable snapshot replaced in one assignment on the event loop, so a
request sees either the old set or the new one. A request holds a lease on the model it resolved, so it
finishes on the version it started with; a retired version leaves the set at once, and its backend closes
only when its last lease is returned (no request fails because of a retirement). Its metric series go
with it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from vision.backends import InferenceBackend, Outputs
from vision.core import metrics
from vision.core.errors import ConfigurationError, NotFound
from vision.models.card import ModelCard
from vision.models.signature import LOGITS

if TYPE_CHECKING:
    from vision.serving.status import RegistryStatus

log = logging.getLogger(__name__)

class ServedModel:
    def __init__(self, card: ModelCard, backend: InferenceBackend, registry: RegistryStatus | None = None) -> None:
        self.card = card
        self.backend = backend
        # For a model followed through the model registry (`models:/NAME@alias`): the live status of that
        # entry (alias, served version, refusals), shared by its versions; None otherwise.
        self.registry = registry
        self._leases = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def key(self) -> tuple[str, str]:
        return self.card.name, self.card.version

    async def infer(self, batch: np.ndarray, outputs: tuple[str, ...] = (LOGITS,)) -> Outputs:
        # No readiness pre-check: a remote backend may have recovered since its last health probe, and when
        # it has not, its own error says why (UNAVAILABLE: unreachable; FAILED_PRECONDITION: not loaded).
        return await self.backend.infer(batch, outputs)

    @contextmanager
    def lease(self) -> Iterator[ServedModel]:
        """Held by a request while it uses the model; a retirement waits until none is held."""
        self._leases += 1
        self._idle.clear()
        try:
            yield self
        finally:
            self._leases -= 1
            if self._leases == 0:
                self._idle.set()

    @property
    def leases(self) -> int:
        return self._leases

    async def drained(self) -> None:
        await self._idle.wait()

    async def verify_outputs(self) -> None:
        """One forward pass on a blank crop before the model serves: outputs that don't fit the signature
        (a wrong pre-exported ONNX file, a head that disagrees with the labels) are a configuration error,
        not INTERNAL on every request. It also warms the engine up, so the first caller does not pay for
        lazy initialisation."""
        signature = self.card.signature
        size = signature.geometry.crop_size
        try:
            outputs = await self.backend.infer(np.zeros((1, 3, size, size), dtype=np.float32), signature.outputs)
        except Exception as exc:
            raise ConfigurationError(
                f"model {self.card.name!r} version {self.card.version!r} fails on a {size}x{size} input: {exc}"
            ) from None
        for name in signature.outputs:
            problem = signature.check(name, outputs[name].shape, size, size)
            if problem:
                raise ConfigurationError(f"model {self.card.name!r} version {self.card.version!r}: {problem}")


def version_key(version: str) -> tuple[tuple[int, object], ...]:
    """Sort key of versions: "10" sorts after "9"; non-numeric parts compare as text."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", version) if p)


@dataclass(frozen=True)
class _Snapshot:
    # In configuration / publication order: the first model able to serve a task is that task's default.
    models: tuple[ServedModel, ...] = ()
    # name -> version answering requests that name no version; absent: the newest version.
    default_versions: dict[str, str] = field(default_factory=dict)


class ModelRepository:
    def __init__(self, models: list[ServedModel] | None = None) -> None:
        self._snapshot = _Snapshot(tuple(models or ()))

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._snapshot.models)

    def list(self, task: str | None = None) -> list[ServedModel]:
        """Models that can serve `task` (see `ModelCard.tasks`), in configuration order; all when None."""
        return [m for m in self._snapshot.models if task is None or task in m.card.tasks]

    def default_version(self, name: str) -> str | None:
        snapshot = self._snapshot
        named = [m for m in snapshot.models if m.card.name == name]
        if not named:
            return None
        chosen = snapshot.default_versions.get(name)
        if chosen is not None:
            return chosen
        return max(named, key=lambda m: version_key(m.card.version)).card.version

    def get(self, name: str = "", version: str = "", *, task: str | None = None) -> ServedModel:
        """The model called `name` (default: the first configured for `task`), at `version` (default: the
        name's default version, which is the newest unless `set_default` chose another)."""
        snapshot = self._snapshot
        candidates = [m for m in snapshot.models if task is None or task in m.card.tasks]
        if not candidates:
            raise NotFound(f"no {task or ''} model is served".replace("  ", " "))
        name = name or candidates[0].card.name
        named = [m for m in candidates if m.card.name == name]
        if not named:
            known = ", ".join(sorted({m.card.name for m in candidates}))
            other = next((m for m in snapshot.models if m.card.name == name), None)
            if other is not None:
                serves = ", ".join(sorted(other.card.tasks))
                raise NotFound(f"model {name!r} cannot be used for {task} (it serves: {serves}); available: {known}")
            raise NotFound(f"model {name!r} is not served here; available: {known}")
        version = version or self.default_version(name) or ""
        for model in named:
            if model.card.version == version:
                return model
        versions = sorted((m.card.version for m in named), key=version_key)
        raise NotFound(f"model {name!r} has no version {version!r}; available: {', '.join(versions)}")

    def ready(self, task: str | None = None) -> bool:
        """True when the default model of `task` is ready (every model's backend when `task` is None)."""
        if task is None:
            return all(m.backend.is_ready() for m in self._snapshot.models)
        try:
            return self.get(task=task).backend.is_ready()
        except NotFound:
            return False

    async def start(self) -> None:
        """Start every backend and check its outputs; a bad model stops start-up (ConfigurationError)."""
        for model in self._snapshot.models:
            await _start(model)

    async def add(
        self, model: ServedModel, *, make_default: bool = False, check: Callable[[ServedModel], Awaitable[None]] | None = None
    ) -> None:
        """Start and verify `model`, then publish it in one step (requests see it at once). With
        `make_default`, requests naming no version get it from now on. `check` runs on the started model
        before it is published (the registry's promotion gate); when it raises, the model never serves."""
        if any(m.key == model.key for m in self._snapshot.models):
            raise ConfigurationError(f"model {model.card.name!r} version {model.card.version!r} is already served")
        try:
            await _start(model)
            if check is not None:
                await check(model)
        except BaseException:
            await model.backend.close()
            metrics.forget_model(*model.key)
            raise
        snapshot = self._snapshot
        defaults = dict(snapshot.default_versions)
        if make_default:
            defaults[model.card.name] = model.card.version
        self._snapshot = _Snapshot((*snapshot.models, model), defaults)
        log.info("serving model %s version %s", *model.key)

    def set_default(self, name: str, version: str) -> None:
        """Requests that name no version get `version` of `name` from now on (the registry moving an alias)."""
        self.get(name, version)  # NotFound when it is not served
        snapshot = self._snapshot
        self._snapshot = replace(snapshot, default_versions={**snapshot.default_versions, name: version})
        log.info("model %s now defaults to version %s", name, version)

    async def retire(self, name: str, version: str, *, drain_timeout_s: float | None = None) -> None:
        """Take a version out of service: new requests stop seeing it at once, requests holding it finish,
        then its backend closes and its metric series are removed. The default version moves to the newest
        remaining one when it was the retired one. `drain_timeout_s`: give up waiting and close anyway."""
        snapshot = self._snapshot
        model = next((m for m in snapshot.models if m.key == (name, version)), None)
        if model is None:
            self.get(name, version)  # raises NotFound with what is available
            return
        defaults = {k: v for k, v in snapshot.default_versions.items() if (k, v) != (name, version)}
        self._snapshot = _Snapshot(tuple(m for m in snapshot.models if m is not model), defaults)
        log.info("retiring model %s version %s (%d requests in flight)", name, version, model.leases)
        try:
            await asyncio.wait_for(model.drained(), drain_timeout_s)
        except TimeoutError:
            log.warning("model %s version %s still had %d requests after %.1fs; closing it", name, version,
                        model.leases, drain_timeout_s)
        await model.backend.close()
        metrics.forget_model(name, version)
        await asyncio.to_thread(release_memory)

    async def close(self) -> None:
        for model in self._snapshot.models:
            await model.backend.close()


async def _start(model: ServedModel) -> None:
    await model.backend.start()
    # A remote engine checks its outputs itself whenever a version becomes ready (it may not be yet).
    if model.backend.kind != "triton":
        await model.verify_outputs()
    card = model.card
    metrics.record_model(
        card.name,
        card.version,
        architecture=card.architecture,
        backend=card.backend,
        weights_sha256="random" if card.random_weights else card.weights_sha256,
    )


def release_memory() -> None:
    """Hand the memory of a retired version back to the OS. Measured (registry switches, ONNX Runtime):
    without this RSS kept ~55 MiB more after every switch, 304 -> 719 MiB over 8 switches, because a
    closed session's buffers go back to glibc's heap but not to the OS; with it RSS returns to about one
    version's worth after each switch."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return
    trim(0)
