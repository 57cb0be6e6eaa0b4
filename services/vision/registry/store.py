"""`RegistryStore`: MLflow's Model Registry (through `MlflowClient`) plus what serving needs from it.

MLflow keeps the versions, aliases, tags, runs and artifacts; this module adds the version package
(vision.registry.package) with its sha256 recorded in the version's tags, golden outputs, an alias
history per alias (so `rollback` knows where an alias was before), name checks and clear errors.

Stores: `sqlite:///PATH` (the default, under the user's data directory), `postgresql://...`, or an MLflow
tracking server `http(s)://HOST:PORT` (the chart's; artifacts then go through its proxied store); artifacts in
a filesystem root (a PVC on Kubernetes) or any artifact store MLflow supports, set explicitly as the
artifact location of the registry's experiment so that nothing lands in the current directory.
MLflow is imported here only, and only when a store is opened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from vision.config.uri import (
    ModelUri,
    check_alias,
    check_name,
    check_version,
    default_artifact_root,
    default_registry_uri,
    redact,
)
from vision.core import files
from vision.core.errors import ConfigurationError, NotFound
from vision.registry import package as pkg

log = logging.getLogger(__name__)

EXPERIMENT = "vision-registry"
SHA_TAG = "vision.sha256."
HISTORY_TAG = "vision.alias_history."
HISTORY_LENGTH = 50
# Lineage tags of a version (the jobs that train models set them; `register` takes them as options).
LINEAGE_TAGS = ("base_model", "dataset_fingerprint", "job_id")
T = TypeVar("T")


class RegistryError(ConfigurationError):
    """The registry refused or could not do what was asked (message says what to do)."""


class InvalidRegistryUri(RegistryError):
    """The registry URI itself is wrong: no retry or fallback can help."""


def probe(uri: str, timeout_s: float = 3.0) -> None:
    """RegistryError when the registry's database cannot be reached now. MLflow retries a failed connection
    for about 100 s before giving up; a process starting up wants to know at once (and fall back to its
    cache), so this checks the network path or the SQLite file first."""
    import socket

    if uri.startswith("sqlite:///"):
        if not Path(uri.removeprefix("sqlite:///")).is_file():
            raise RegistryError(f"registry database {uri.removeprefix('sqlite:///')} does not exist")
        return
    if uri.startswith(("http://", "https://")):
        from urllib.parse import urlsplit

        server = urlsplit(uri)
        port = server.port or (443 if server.scheme == "https" else 80)
        try:
            socket.create_connection((server.hostname or "", port), timeout=timeout_s).close()
        except OSError as exc:
            raise RegistryError(f"cannot reach the MLflow tracking server at {server.hostname}:{port}: {exc}") from None
        return
    from sqlalchemy.engine import make_url

    try:
        url = make_url(uri)
    except Exception as exc:  # sqlalchemy's ArgumentError: not a URL
        raise InvalidRegistryUri(f"registry URI {redact(uri)!r}: {exc}") from None
    defaults = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
    port = url.port or defaults.get(url.get_backend_name(), 0)
    if not url.host or not port:
        return  # a socket path or an unusual driver: let MLflow try
    try:
        socket.create_connection((url.host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise RegistryError(f"cannot reach the registry database at {url.host}:{port}: {exc}") from None


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    aliases: tuple[str, ...]
    run_id: str
    source: str
    created_ms: int
    description: str
    tags: dict[str, str]

    @property
    def sha256(self) -> dict[str, str]:
        return {k[len(SHA_TAG):]: v for k, v in self.tags.items() if k.startswith(SHA_TAG)}

    @property
    def lineage(self) -> dict[str, str]:
        return {k: self.tags[f"vision.{k}"] for k in LINEAGE_TAGS if f"vision.{k}" in self.tags}


@dataclass(frozen=True)
class ModelSummary:
    name: str
    description: str
    aliases: dict[str, str]
    latest_version: str
    versions: int
    tags: dict[str, str] = field(default_factory=dict)


def _quiet_mlflow() -> None:
    import warnings

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Against a tracking server MLflow writes "View run ... at: URL" to stdout when a run ends, which would
    # corrupt `vision registry ... --json` and anything else a command prints for a program to read.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # MLflow 3.17's tracking store configures a `noload` relationship that SQLAlchemy 2.1 deprecates.
    warnings.filterwarnings("ignore", message=".*noload.*", module="mlflow")
    warnings.filterwarnings("ignore", message=".*noload.*")
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.store.model_registry.abstract_store"):
        logging.getLogger(name).setLevel(logging.WARNING)


class RegistryStore:
    """One registry: `uri` (SQLAlchemy URL) and `artifact_root` (where new versions' files go)."""

    def __init__(self, uri: str | None = None, artifact_root: str | None = None) -> None:
        self.uri = uri or default_registry_uri()
        if not self.uri.startswith(("sqlite:///", "postgresql://", "postgresql+", "mysql", "mssql", "http://", "https://")):
            raise InvalidRegistryUri(
                f"registry URI {redact(self.uri)!r}: use sqlite:///ABSOLUTE/PATH.db, postgresql://USER@HOST:PORT/DB "
                "or an MLflow tracking server http(s)://HOST:PORT"
            )
        root = artifact_root or default_artifact_root(self.uri)
        if "://" not in root and not root.startswith("mlflow-artifacts:"):
            root = Path(root).expanduser().resolve().as_uri()
        self.artifact_root = root
        _quiet_mlflow()
        from mlflow import MlflowClient

        with self._init_lock():
            self.client = _retry(lambda: MlflowClient(tracking_uri=self.uri, registry_uri=self.uri), "open")
            self._experiment_id = _retry(lambda: self.experiment(EXPERIMENT, self.artifact_root), "create the registry experiment")

    # -- plumbing
    @contextlib.contextmanager
    def _init_lock(self) -> Iterator[None]:
        """Serialises the first-use schema creation of a SQLite store between processes (two processes
        creating the tables at once fail); PostgreSQL is retried instead."""
        if not self.uri.startswith("sqlite:///"):
            yield
            return
        db = Path(self.uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.with_name(db.name + ".lock"), "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def experiment(self, name: str, artifact_location: str) -> str:
        """The id of MLflow experiment `name`, created with `artifact_location` on first use (a concurrent
        creator wins the race harmlessly). An existing experiment keeps the location it was created with."""
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            if artifact_location.startswith("file://"):
                Path(artifact_location.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
            try:
                return self.client.create_experiment(name, artifact_location=artifact_location)
            except Exception as exc:
                if _code(exc) != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self.client.get_experiment_by_name(name)
                assert exp is not None
        if exp.artifact_location.rstrip("/") != artifact_location.rstrip("/"):
            log.info("experiment %s keeps its artifact location %s", name, exp.artifact_location)
        return exp.experiment_id

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (RegistryError, NotFound):
            raise
        except Exception as exc:
            code = _code(exc)
            if code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc)):
                raise NotFound(f"{what}: {_message(exc)}") from None
            raise RegistryError(f"{what}: {_message(exc)}") from None

    # -- queries
    def version(self, name: str, version: str | int) -> VersionInfo:
        check_name(name)
        version = check_version(version)
        mv = self._call(f"model {name!r} version {version}", lambda: self.client.get_model_version(name, version))
        return _info(mv)

    def resolve(self, uri: ModelUri | str) -> str:
        """The version a URI names now (the alias's target, or the pinned version after checking it exists)."""
        if isinstance(uri, str):
            from vision.config.uri import parse_model_uri

            uri = parse_model_uri(uri)
        if uri.alias:
            mv = self._call(
                f"alias {uri.alias!r} of model {uri.name!r}",
                lambda: self.client.get_model_version_by_alias(uri.name, uri.alias),
            )
            return str(mv.version)
        return self.version(uri.name, uri.version or "").version

    def models(self) -> list[ModelSummary]:
        out = []
        for rm in self._call("listing models", lambda: list(_paged(self.client.search_registered_models))):
            versions = self.versions(rm.name)
            out.append(ModelSummary(
                name=rm.name, description=rm.description or "", aliases={a: str(v) for a, v in (rm.aliases or {}).items()},
                latest_version=versions[-1].version if versions else "", versions=len(versions),
                tags={k: v for k, v in (rm.tags or {}).items() if not k.startswith(HISTORY_TAG)},
            ))
        return sorted(out, key=lambda m: m.name)

    def versions(self, name: str) -> list[VersionInfo]:
        check_name(name)
        found = self._call(
            f"versions of {name!r}",
            lambda: list(_paged(lambda **kw: self.client.search_model_versions(f"name = '{name}'", **kw))),
        )
        return sorted((_info(mv) for mv in found), key=lambda v: int(v.version))

    def model(self, name: str) -> ModelSummary:
        check_name(name)
        rm = self._call(f"model {name!r}", lambda: self.client.get_registered_model(name))
        versions = self.versions(name)
        return ModelSummary(rm.name, rm.description or "", {a: str(v) for a, v in (rm.aliases or {}).items()},
                            versions[-1].version if versions else "", len(versions),
                            {k: v for k, v in (rm.tags or {}).items() if not k.startswith(HISTORY_TAG)})

    def alias_history(self, name: str, alias: str) -> list[dict[str, Any]]:
        rm = self._call(f"model {name!r}", lambda: self.client.get_registered_model(name))
        raw = (rm.tags or {}).get(HISTORY_TAG + alias)
        return json.loads(raw) if raw else []

    def lineage(self, info: VersionInfo) -> dict[str, Any]:
        """The run that produced a version: its name, params, latest metrics and the curves it logged."""
        if not info.run_id:
            return {}
        try:
            run = self.client.get_run(info.run_id)
        except Exception as exc:
            return {"run_id": info.run_id, "error": _message(exc)}
        curves = {}
        for key in run.data.metrics:
            try:
                curves[key] = len(self.client.get_metric_history(info.run_id, key))
            except Exception:  # a metric store without history: report the latest value only
                curves[key] = 1
        return {
            "run_id": info.run_id,
            "run_name": run.info.run_name,
            "experiment_id": run.info.experiment_id,
            "status": run.info.status,
            "params": dict(run.data.params),
            "metrics": dict(run.data.metrics),
            "curves": {k: n for k, n in curves.items() if n > 1},
            **info.lineage,
        }

    # -- changes
    def register(
        self,
        name: str,
        config: Any,
        *,
        golden_images: Sequence[tuple[str, bytes]] | None = None,
        expect_like: str | int | None = None,
        tolerance: float | None = None,
        min_agreement: float | None = None,
        run_id: str | None = None,
        description: str = "",
        lineage: Mapping[str, str] | None = None,
        extra: Mapping[str, Path] | None = None,
    ) -> VersionInfo:
        """Package `config` (a ModelConfig, as `vision serve --model` takes), record its golden outputs, log
        the files to an MLflow run (`run_id`: the training run that produced it, for lineage; default a new
        run in the registry experiment) and create the next version of `name`."""
        from vision.registry.golden import DEFAULT_TOLERANCE

        check_name(name)
        lineage = dict(lineage or {})
        unknown = sorted(set(lineage) - set(LINEAGE_TAGS))
        if unknown:
            raise RegistryError(f"unknown lineage keys {unknown}; known: {', '.join(LINEAGE_TAGS)}")
        with tempfile.TemporaryDirectory(prefix="vision-register-") as tmp:
            reference_dir = None
            if expect_like is not None:
                reference_dir = self.download(name, expect_like, Path(tmp) / "reference").root
            package = pkg.build(
                config, Path(tmp) / "model", golden_images=golden_images, expect_like=reference_dir,
                tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance, min_agreement=min_agreement, extra=extra,
            )
            if run_id:
                self._call(f"run {run_id!r}", lambda: self.client.get_run(run_id))
                artifact_path, own_run = f"vision-model-{uuid.uuid4().hex[:8]}", False
            else:
                run = _retry(lambda: self.client.create_run(
                    self._experiment_id, run_name=f"register-{name}", tags={"vision.registered_name": name}
                ), "create a run")
                run_id, artifact_path, own_run = run.info.run_id, "vision-model", True
            try:
                _retry(lambda: self.client.log_artifacts(run_id, str(package.root), artifact_path), "upload artifacts")
                params = {f"vision.{k}": str(v) for k, v in package.spec.items()}
                if own_run:
                    _retry(lambda: self.client.log_batch(run_id, params=[_param(k, v) for k, v in params.items()]), "log params")
            finally:
                if own_run:
                    with contextlib.suppress(Exception):
                        self.client.set_terminated(run_id)
            source = self._call("run artifacts", lambda: self.client.get_run(run_id)).info.artifact_uri.rstrip("/") + "/" + artifact_path
        tags = {SHA_TAG + rel: sha for rel, sha in package.files.items()}
        tags.update({f"vision.{k}": v for k, v in lineage.items()})
        tags["vision.arch"] = str(package.spec["arch"])
        tags["vision.format"] = str(pkg.FORMAT)
        tags["vision.precision"] = str(package.card.get("precision", "fp32"))
        if expect_like is not None:
            tags["vision.expect_like"] = str(expect_like)
        self._ensure_registered_model(name)
        mv = _retry(
            lambda: self.client.create_model_version(name, source, run_id=run_id, tags=tags, description=description),
            f"create a version of {name!r}",
        )
        log.info("registered %s version %s (run %s)", name, mv.version, run_id)
        return self.version(name, mv.version)

    def _ensure_registered_model(self, name: str) -> None:
        try:
            self.client.get_registered_model(name)
            return
        except Exception as exc:
            if _code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise RegistryError(f"model {name!r}: {_message(exc)}") from None
        try:
            _retry(lambda: self.client.create_registered_model(name, tags={"vision.created_by": "vision registry"}),
                   f"create model {name!r}", ok_codes=("RESOURCE_ALREADY_EXISTS",))
        except _AlreadyExists:
            pass  # another process registered the name meanwhile

    def promote(self, name: str, version: str | int, alias: str) -> str | None:
        """Point `alias` at `version`; returns the version it held before (None if new). Services following
        the alias move on their next poll."""
        check_alias(alias)
        version = self.version(name, version).version
        try:
            before: str | None = self.resolve(ModelUri(name, alias=alias))
        except NotFound:
            before = None
        if before == version:
            return before
        history = self.alias_history(name, alias)
        if before is not None:
            history.append({"version": before, "until": int(time.time())})
        self._set_history(name, alias, history)
        self._call(f"alias {alias!r}", lambda: self.client.set_registered_model_alias(name, alias, version))
        log.info("model %s alias %s: %s -> %s", name, alias, before, version)
        return before

    def rollback(self, name: str, alias: str) -> tuple[str, str]:
        """Point `alias` back at the version it held before its last move; returns (from, to). Versions deleted
        since are skipped. Rolling back again goes further back."""
        check_alias(alias)
        current = self.resolve(ModelUri(check_name(name), alias=alias))
        history = self.alias_history(name, alias)
        existing = {v.version for v in self.versions(name)}
        while history:
            entry = history.pop()
            target = str(entry["version"])
            if target != current and target in existing:
                self._call(f"alias {alias!r}", lambda: self.client.set_registered_model_alias(name, alias, target))
                self._set_history(name, alias, history)
                log.info("model %s alias %s rolled back: %s -> %s", name, alias, current, target)
                return current, target
        raise RegistryError(f"alias {alias!r} of {name!r} has no earlier version to roll back to (it is at version {current})")

    def _set_history(self, name: str, alias: str, history: list[dict[str, Any]]) -> None:
        # MLflow tag values hold up to 5000 characters; 50 entries of ~35 fit.
        value = json.dumps(history[-HISTORY_LENGTH:], separators=(",", ":"))
        self._call("alias history", lambda: self.client.set_registered_model_tag(name, HISTORY_TAG + alias, value))

    def delete_version(self, name: str, version: str | int, *, force: bool = False) -> None:
        """Delete a version. Refused while an alias points at it, unless `force` (which removes those
        aliases: services following them keep serving what they serve and log that the alias is gone).
        The run and its artifacts stay (lineage); delete the run in MLflow to remove the files."""
        info = self.version(name, version)
        if info.aliases and not force:
            raise RegistryError(
                f"model {name!r} version {info.version} is the target of alias(es) {', '.join(info.aliases)}; move "
                "them first (promote/rollback) or pass --force"
            )
        self._call("delete", lambda: self.client.delete_model_version(name, info.version))

    def set_description(self, name: str, version: str | int, description: str) -> None:
        version = self.version(name, version).version
        self._call("describe", lambda: self.client.update_model_version(name, version, description=description))

    # -- files
    def download(self, name: str, version: str | int, dest: Path) -> pkg.Package:
        """The version's package under `dest` (reused when present and intact), every sha256 checked
        against the version's tags; ArtifactCorrupted when one differs."""
        from mlflow.artifacts import download_artifacts

        info = self.version(name, version)
        expected = info.sha256
        if dest.is_dir():
            # Each file is hashed once: load() verifies; a corrupted cache is replaced by a fresh download.
            with contextlib.suppress(pkg.ArtifactCorrupted):
                return pkg.load(dest, expected)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # No fsync: this is a cache whose every reuse is checked against the sha256 tags above, so a tree torn
        # by a crash is downloaded again; fsyncing hundreds of MB would only delay a server's start.
        with (
            tempfile.TemporaryDirectory(prefix=f".{dest.name}-", dir=dest.parent) as staging,
            files.atomic_path(dest, fsync=False) as staged,
        ):
            try:
                # mlflow-artifacts:/ sources resolve against a tracking server: this store's, not MLflow's
                # process-wide tracking URI (which this class never sets).
                server = self.uri if self.uri.startswith(("http://", "https://")) else None
                got = Path(download_artifacts(artifact_uri=info.source, dst_path=staging, tracking_uri=server))
            except Exception as exc:
                raise RegistryError(f"model {name!r} version {info.version}: cannot download {info.source}: {_message(exc)}") from None
            package = pkg.load(got, expected)  # raises ArtifactCorrupted
            os.rename(got, staged)  # MLflow names the tree it downloads; it replaces `dest` as a whole
        return dataclasses.replace(package, root=dest)


class _AlreadyExists(Exception):
    pass


def _retry(fn: Callable[[], T], what: str, *, attempts: int = 8, ok_codes: Sequence[str] = ()) -> T:
    """Retries what concurrent writers cause (SQLite's `database is locked`, a version number taken by
    another process between MLflow's read and insert, a schema being created by another process)."""
    delay = 0.05
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            code = _code(exc)
            if code in ok_codes:
                raise _AlreadyExists() from None
            text = str(exc).lower()
            transient = any(s in text for s in ("locked", "unique", "duplicate", "integrity", "deadlock", "already exists", "could not serialize"))
            if not transient or attempt + 1 == attempts or code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                if isinstance(exc, RegistryError):
                    raise
                raise RegistryError(f"cannot {what}: {_message(exc)}") from None
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 1.0)
    raise AssertionError("unreachable")


def _code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", "") or "")


def _message(exc: Exception) -> str:
    return str(getattr(exc, "message", None) or exc).strip().splitlines()[0][:500]


def _param(key: str, value: str) -> Any:
    from mlflow.entities import Param

    return Param(key, value[:6000])


def _paged(search: Callable[..., Any]) -> Iterator[Any]:
    token = None
    while True:
        page = search(max_results=200, page_token=token) if token else search(max_results=200)
        yield from page
        token = getattr(page, "token", None)
        if not token:
            return


def _info(mv: Any) -> VersionInfo:
    return VersionInfo(
        name=mv.name,
        version=str(mv.version),
        aliases=tuple(sorted(mv.aliases or ())),
        run_id=mv.run_id or "",
        source=mv.source or "",
        created_ms=int(mv.creation_timestamp or 0),
        description=mv.description or "",
        tags=dict(mv.tags or {}),
    )
