"""Live publishing: `vision serve --model models:/NAME@alias` serves the version the alias points to, and
follows the alias while serving.

At start-up (before the port opens) each registry entry is resolved, its package downloaded and every
sha256 checked, and (on the Triton backend) the version written into Triton's repository and loaded; the
version is then loaded like any configured model and must pass its promotion gate before the server
reports ready. A pinned URI (`models:/NAME/3`) stops there.

While serving, one asyncio task per followed alias polls the registry every `--registry-poll-s`. When the
alias moved it:
1. downloads the new version's package and checks every sha256 against the version's tags;
2. on Triton: writes `<repo>/<name>/<version>/` atomically, adds it to the config's version policy and
   loads it through the repository API (explicit model control); the old version keeps answering;
3. loads the version on the loader thread (`vision.serving.loading.publish`: models already serving keep
   answering), runs the promotion gate on it before it is published (vision.registry.golden), then
   publishes it as the default in one step: new requests get it, requests in flight finish on the old one;
4. retires the old version after it drains (then, on Triton, unloads it and removes its folder).
A version that fails a check serves nothing: the old version stays, and the log, the metric
`vision_registry_refusals_total` and ListModels (ModelInfo.registry) say why. A version refused by its
sha256, its gate or its load is not retried (versions are immutable); a failed download is retried at the
next poll. Rollback is the same path: the alias moves back, and the old version is loaded again.

MLflow calls, downloads and Triton admin calls run on one `registry-io` thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vision.config.uri import ModelUri, parse_model_uri
from vision.core import metrics, tracing
from vision.core.errors import ConfigurationError, NotFound
from vision.core.files import atomic_write
from vision.registry.golden import GateFailed, Golden, gate
from vision.registry.package import ONNX, ArtifactCorrupted, Package, serving_config
from vision.serving.status import RegistryStatus

if TYPE_CHECKING:
    from vision.config.settings import ModelConfig, ServeSettings
    from vision.registry.store import RegistryStore
    from vision.serving.repository import ModelRepository, ServedModel

log = logging.getLogger(__name__)

# Under <registry cache>/<name>/: the version this entry served last and its files' sha256.
LAST_SERVED = "last-served.json"

# Downloaded versions kept per model in --registry-cache besides the one serving (rollback is then local).
KEEP_CACHED = 3


class Refused(Exception):
    """A version that must not serve; `check` is the one that refused it."""

    def __init__(self, check: str, reason: str, *, permanent: bool = True) -> None:
        self.check = check
        self.reason = reason
        self.permanent = permanent
        super().__init__(f"{check}: {reason}")


class Follower:
    """One `models:/...` entry of one process."""

    def __init__(self, publisher: "RegistryPublisher", base: "ModelConfig") -> None:
        assert base.registry
        self.publisher = publisher
        self.settings = publisher.settings
        self.base = base
        self.uri: ModelUri = parse_model_uri(base.registry)
        self.name = self.uri.name
        self.status = RegistryStatus(uri=str(self.uri), alias=self.uri.alias or "")
        self.refused: dict[str, Refused] = {}
        self._golden: dict[str, Golden] = {}
        self._cards: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None
        self._switching = False
        # Relative path -> sha256 of each prepared version's package (recorded when a version serves).
        self._files: dict[str, dict[str, str]] = {}

    # -- start-up (synchronous, before the server binds its port)
    def resolve(self) -> "ModelConfig":
        from vision.config.uri import default_registry_uri
        from vision.registry.store import InvalidRegistryUri, probe

        try:
            if not self.publisher.store_opened:
                probe(self.settings.registry_uri or default_registry_uri())
            store = self.publisher.store()
            version = store.resolve(self.uri)
        except NotFound as exc:
            raise ConfigurationError(f"{self.uri}: {exc} (`vision registry show {self.name}` lists its versions and aliases)") from None
        except InvalidRegistryUri:
            raise
        except Exception as exc:  # the registry database or server is unreachable
            return self._resolve_from_cache(exc)
        try:
            config = self._prepare(store, version)
        except Refused as exc:
            raise ConfigurationError(
                f"{self.uri} -> version {version} cannot serve ({exc.check}): {exc.reason}"
                + (". Point the alias at a good version (vision registry rollback/promote) or pin models:/"
                   f"{self.name}/VERSION" if self.uri.alias else "")
            ) from None
        self.status.alias_version = version if self.uri.alias else ""
        self.status.checked_at = time.time()
        return config

    @property
    def _last_served_path(self) -> Path:
        return self.settings.registry_cache / self.name / LAST_SERVED

    def _resolve_from_cache(self, error: Exception) -> "ModelConfig":
        """The registry is down at start-up: serve the version this entry served last, from the cache, after
        checking every file against the sha256 recorded when it was downloaded. The follower keeps trying
        the registry and switches once it answers. Without a cached version start-up fails, as before."""
        path = self._last_served_path
        try:
            record = json.loads(path.read_text())
            if record.get("uri") != str(self.uri):
                raise ValueError(f"the cache records {record.get('uri')!r}")
            version, files = str(record["version"]), dict(record["files"])
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigurationError(
                f"{self.uri}: the registry is unreachable ({error}) and no version served before is cached under "
                f"{path.parent} ({exc})"
            ) from None
        from vision.registry import package as pkg

        try:
            package = pkg.load(self.settings.registry_cache / self.name / version, files)
            config = self._adopt(package, version)
        except ConfigurationError as exc:  # ArtifactCorrupted included
            raise ConfigurationError(f"{self.uri}: the registry is unreachable ({error}) and the cached version {version} "
                                     f"cannot serve: {exc}") from None
        if (config.backend or self.settings.backend) == "triton":
            self._triton_add(config, package)
        self.status.error = f"registry unreachable at start-up, serving cached version {version}: {error}"
        log.warning("registry: %s unreachable at start-up (%s); serving cached version %s", self.uri, error, version)
        return config

    def _prepare(self, store: "RegistryStore", version: str) -> "ModelConfig":
        """Download + verify (+ publish into Triton): the config that serves `version`. Raises Refused."""
        try:
            package = store.download(self.name, version, self.settings.registry_cache / self.name / version)
        except ArtifactCorrupted as exc:
            raise Refused("sha256", str(exc)) from None
        except NotFound as exc:
            raise Refused("download", str(exc)) from None
        except Exception as exc:  # registry or artifact store unreachable: may work at the next poll
            raise Refused("download", str(exc), permanent=False) from None
        try:
            config = self._adopt(package, version)
        except ConfigurationError as exc:
            raise Refused("sha256", str(exc)) from None
        if (config.backend or self.settings.backend) == "triton":
            self._triton_add(config, package)
        self._run_ids[version] = store.version(self.name, version).run_id
        return config

    def _adopt(self, package: Package, version: str) -> "ModelConfig":
        """Keep a verified package's golden set, card and digests; the config that serves it."""
        self._golden[version] = Golden.load(package.root)
        self._cards[version] = package.card
        self._files[version] = package.files
        return serving_config(package, name=self.name, version=version, base=self.base)

    @property
    def _run_ids(self) -> dict[str, str]:
        return self.publisher.run_ids.setdefault(self.name, {})

    async def start(self, repository: "ModelRepository") -> None:
        """Gate the version loaded at start-up, pin it as the default, and follow the alias."""
        version = self.base_version(repository)
        model = repository.get(self.name, version)
        model.card, model.registry = self._annotate(model.card, version), self.status
        try:
            await gate(model, self._golden[version])
        except GateFailed as exc:
            metrics.REGISTRY_REFUSALS.labels(model=self.name, check="gate").inc()
            raise ConfigurationError(f"{self.uri} -> version {version} fails its promotion gate: {exc}") from None
        repository.set_default(self.name, version)
        self._served(version)
        if self.uri.alias:
            self._task = asyncio.get_running_loop().create_task(self._follow(repository), name=f"registry-{self.name}")

    def _annotate(self, card: Any, version: str) -> Any:
        """The card as the registry describes the version: what the package's card says about its weights (random on purpose, published metrics), which a weights file cannot."""
        facts = self._cards.get(version, {})
        metrics_ = tuple(sorted((str(k), float(v)) for k, v in (facts.get("metrics") or {}).items()))
        return replace(card, random_weights=bool(facts.get("random_weights", card.random_weights)),
                       metrics=metrics_ or card.metrics)

    def base_version(self, repository: "ModelRepository") -> str:
        versions = [m.card.version for m in repository if m.card.name == self.name]
        if len(versions) != 1:
            raise ConfigurationError(f"{self.uri}: expected one served version of {self.name!r}, found {versions}")
        return versions[0]

    def _served(self, version: str) -> None:
        self._remember(version)
        self.status.serving_version = version
        self.status.run_id = self._run_ids.get(version, "")
        self.status.refused_version = self.status.refused_check = self.status.refused_reason = ""
        metrics.REGISTRY_SERVING_VERSION.labels(model=self.name).set(float(version))
        if self.uri.alias and self.status.alias_version:
            metrics.REGISTRY_ALIAS_VERSION.labels(model=self.name, alias=self.uri.alias).set(float(self.status.alias_version))

    def _remember(self, version: str) -> None:
        """Record the version now serving, with its files' sha256, for a start-up without the registry."""
        files = self._files.get(version)
        if not files:
            return
        path = self._last_served_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # No fsync: this runs on the event loop that serves requests, and a record lost to a power cut
            # only means a start-up without the registry falls back to the one before (its files are checked).
            with atomic_write(path, "w", fsync=False) as fh:
                fh.write(json.dumps({"uri": str(self.uri), "version": version, "files": files}))
        except OSError as exc:  # a read-only cache only loses the fallback
            log.warning("registry: cannot record the served version under %s: %s", path.parent, exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    # -- following
    async def _follow(self, repository: "ModelRepository") -> None:
        while True:
            await asyncio.sleep(self.settings.registry_poll_s)
            try:
                await self.check(repository)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop the follower: log it, try again at the next poll
                log.exception("registry: checking %s failed", self.uri)

    async def check(self, repository: "ModelRepository") -> str | None:
        """One look at the registry; switches when the alias moved. Returns the version switched to, if any."""
        assert self.uri.alias
        try:
            target = await self.publisher.io(self.publisher.store().resolve, self.uri)
        except Exception as exc:
            metrics.REGISTRY_POLL_ERRORS.labels(model=self.name).inc()
            message = str(exc)
            if message != self.status.error:
                log.warning("registry: cannot resolve %s (still serving version %s): %s", self.uri,
                            self.status.serving_version, message)
            self.status.error = message
            return None
        self.status.error = ""
        self.status.checked_at = time.time()
        self.status.alias_version = target
        metrics.REGISTRY_ALIAS_VERSION.labels(model=self.name, alias=self.uri.alias).set(float(target))
        if target == self.status.serving_version or target in self.refused:
            return None
        return await self.switch(repository, target)

    async def switch(self, repository: "ModelRepository", version: str) -> str | None:
        """Publish `version` and make it the default (gate, load, switch, drain and retire the old one); the
        version now served, None when it was refused."""
        attributes = {"vision.model": self.name, "vision.version.from": self.status.serving_version or "",
                      "vision.version.to": version}
        with tracing.span("registry.switch", attributes) as current:
            switched = await self._switch(repository, version)
            if current is not None:
                current.set_attribute("vision.outcome", "served" if switched else "refused")
            return switched

    async def _switch(self, repository: "ModelRepository", version: str) -> str | None:
        started = time.monotonic()
        old = self.status.serving_version
        log.info("registry: %s moved to version %s (serving %s): publishing", self.uri, version, old)
        triton_added = False
        try:
            config = await self.publisher.io(self._prepare, self.publisher.store(), version)
            triton_added = (config.backend or self.settings.backend) == "triton"
            golden = self._golden[version]

            async def check(model: "ServedModel") -> None:
                model.card, model.registry = self._annotate(model.card, version), self.status
                await gate(model, golden)

            from vision.serving.loading import publish

            try:
                await publish(repository, config, self.settings, make_default=True, check=check)
            except GateFailed as exc:
                raise Refused("gate", str(exc)) from None
            except Refused:
                raise
            except Exception as exc:
                raise Refused("load", str(exc), permanent=isinstance(exc, ConfigurationError)) from None
        except Refused as exc:
            self._refuse(version, exc)
            if triton_added:
                await self.publisher.io(self._triton_retire, version, True)
            return None
        self._served(version)
        seconds = time.monotonic() - started
        metrics.REGISTRY_SWITCHES.labels(model=self.name, outcome="served").inc()
        metrics.REGISTRY_SWITCH_SECONDS.labels(model=self.name).observe(seconds)
        log.info("registry: %s now serves version %s (%.2fs after the move was seen); retiring version %s",
                 self.uri, version, seconds, old)
        if old and old != version:
            await repository.retire(self.name, old, drain_timeout_s=self.settings.registry_drain_timeout_s)
            if (self.base.backend or self.settings.backend) == "triton":
                await self.publisher.io(self._triton_retire, old, False)
        self._golden = {v: g for v, g in self._golden.items() if v == version}
        self._cards = {v: c for v, c in self._cards.items() if v == version}
        await self.publisher.io(self._prune_cache, version)
        return version

    def _refuse(self, version: str, exc: Refused) -> None:
        if exc.permanent:
            self.refused[version] = exc
        self.status.refused_version, self.status.refused_check, self.status.refused_reason = version, exc.check, exc.reason
        metrics.REGISTRY_REFUSALS.labels(model=self.name, check=exc.check).inc()
        metrics.REGISTRY_SWITCHES.labels(model=self.name, outcome="refused").inc()
        log.error("registry: %s version %s REFUSED by its %s check, version %s keeps serving%s: %s", self.uri, version,
                  exc.check, self.status.serving_version, "" if exc.permanent else " (retried at the next poll)", exc.reason)

    def _prune_cache(self, serving: str) -> None:
        root = self.settings.registry_cache / self.name
        if not root.is_dir():
            return
        versions = sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        others = [p for p in versions if p.name != serving]
        for path in others[: max(0, len(others) - KEEP_CACHED)]:
            shutil.rmtree(path, ignore_errors=True)

    # -- Triton
    def _triton_paths(self) -> tuple[Path, str]:
        if self.settings.triton_repository is None:
            raise Refused(
                "load",
                "registry models on the triton backend need --triton-repository (the model repository the Triton "
                "at --triton-url serves, shared with this process) and --triton-admin-url",
            )
        return Path(self.settings.triton_repository), self.base.triton_model or self.name

    def _triton_add(self, config: "ModelConfig", package: Package) -> None:
        """Make Triton serve `config.version` next to the versions it serves (idempotent: another replica may
        have published it already)."""
        from vision.core.files import sha256_file
        from vision.models import get_architecture
        from vision.triton.admin import TritonAdmin
        from vision.triton.errors import TritonError
        from vision.triton.export import triton_specs
        from vision.triton.repository import CONFIG, add_version, served_versions, write_model

        repo, model_name = self._triton_paths()
        version = int(config.version)
        admin = TritonAdmin(self.settings.triton_admin_url)
        onnx = package.root / ONNX
        model_dir = repo / model_name
        try:
            if not (model_dir / CONFIG).is_file():
                signature = get_architecture(config.arch).signature(int(package.card["num_classes"]))
                inputs, outputs = triton_specs(signature)
                batch = self.settings.max_batch_size
                write_model(
                    repo, model_name, version, onnx, inputs=inputs, outputs=outputs, flavour=self.settings.triton_flavour,
                    max_batch_size=batch, preferred_batch_sizes=[b for b in (4, 8, 16) if b <= batch],
                    max_queue_delay_us=2000,
                )
                admin.load_model(model_name)
                admin.wait_for_model(model_name, version, timeout=admin.load_timeout_s)
            elif (model_dir / str(version)).is_dir():
                present = model_dir / str(version) / "model.onnx"
                if not present.is_file() or sha256_file(present) != package.files[ONNX]:
                    raise Refused("load", f"Triton's repository already holds a different {model_name}/{version}/model.onnx")
                if version not in served_versions(model_dir):
                    raise Refused("load", f"{model_dir}/{version} exists but its config does not serve it; remove the folder")
                if not admin.is_model_ready(model_name, version):
                    admin.load_model(model_name)
                    admin.wait_for_model(model_name, version, timeout=admin.load_timeout_s)
            else:
                add_version(repo, model_name, version, onnx, admin=admin)
        except Refused:
            raise
        except (TritonError, OSError) as exc:
            raise Refused("load", f"Triton: {exc}", permanent=False) from None
        except ValueError as exc:  # the graph does not fit the model's config (another head width)
            raise Refused("load", f"Triton: {exc}") from None

    def _triton_retire(self, version: str, refused: bool) -> None:
        from vision.triton.admin import TritonAdmin
        from vision.triton.repository import retire_version

        try:
            repo, model_name = self._triton_paths()
            retire_version(repo, model_name, int(version), admin=TritonAdmin(self.settings.triton_admin_url))
        except Exception as exc:  # the version already serves nothing here; leave the cleanup to an operator
            log.warning("registry: could not retire %s version %s from Triton%s: %s", self.name, version,
                        " after its refusal" if refused else "", exc)


class RegistryPublisher:
    """Every `models:/...` entry of one `vision serve` process."""

    def __init__(self, settings: "ServeSettings") -> None:
        self.settings = settings
        self.followers = [Follower(self, m) for m in settings.models if m.registry]
        self.run_ids: dict[str, dict[str, str]] = {}
        self._store: RegistryStore | None = None
        self._io: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def store_opened(self) -> bool:
        return self._store is not None

    def store(self) -> "RegistryStore":
        if self._store is None:
            from vision.registry.store import RegistryStore

            self._store = RegistryStore(self.settings.registry_uri, self.settings.registry_artifact_root)
        return self._store

    async def io(self, fn: Any, *args: Any) -> Any:
        if self._io is None:
            self._io = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-io")
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    def resolve(self) -> "ServeSettings":
        """The settings with every registry entry replaced by the concrete version it serves now."""
        by_id = {id(f.base): f for f in self.followers}
        models = [by_id[id(m)].resolve() if id(m) in by_id else m for m in self.settings.models]
        return self.settings.model_copy(update={"models": models})

    async def start(self, repository: "ModelRepository") -> None:
        for follower in self.followers:
            await follower.start(repository)

    async def close(self) -> None:
        for follower in self.followers:
            await follower.close()
        if self._io is not None:
            self._io.shutdown(wait=False, cancel_futures=True)


def has_registry_models(settings: "ServeSettings") -> bool:
    return any(m.registry for m in settings.models)
