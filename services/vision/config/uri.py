"""Registry names, model URIs and the default store location. No MLflow import here: `vision serve` parses
`--model models:/NAME@alias` with this module alone.

URIs are MLflow's own forms: `models:/NAME@ALIAS` follows an alias (the service moves when the alias
moves), `models:/NAME/VERSION` pins a version.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from vision.core.errors import ConfigurationError

SCHEME = "models:/"
# Registered model names double as served model names and Triton model names (a folder in its repository):
# letters, digits, '_', '-', '.', not starting with '.' or '-'.
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")
# MLflow reserves `latest` and `v<digits>` as alias names (they would shadow versions).
_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")
_RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigurationError(
            f"model name {name!r} is not valid: use 1-100 letters, digits, '_', '-' or '.', not starting "
            "with '.' or '-' (it is also the served name and the Triton model folder)"
        )
    return name


def check_alias(alias: str) -> str:
    if not isinstance(alias, str) or not _ALIAS.match(alias) or _RESERVED_ALIAS.match(alias):
        raise ConfigurationError(
            f"alias {alias!r} is not valid: use letters, digits, '_' or '-', starting with a letter or '_' "
            "('latest' and 'v<number>' are reserved by MLflow)"
        )
    return alias


def check_version(version: str | int) -> str:
    text = str(version).strip()
    if not text.isdigit() or int(text) < 1:
        raise ConfigurationError(f"version {version!r} is not valid: registry versions are positive integers")
    return str(int(text))


@dataclass(frozen=True)
class ModelUri:
    """`models:/NAME@ALIAS` (alias set) or `models:/NAME/VERSION` (version set)."""

    name: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"{SCHEME}{self.name}@{self.alias}" if self.alias else f"{SCHEME}{self.name}/{self.version}"

    @property
    def follows_alias(self) -> bool:
        return self.alias is not None


def is_model_uri(text: str) -> bool:
    return isinstance(text, str) and text.strip().startswith(SCHEME)


def parse_model_uri(text: str) -> ModelUri:
    """`models:/lite@production` -> ModelUri("lite", alias="production"); `models:/lite/3` -> version "3"."""
    raw = text.strip()
    if not raw.startswith(SCHEME):
        raise ConfigurationError(f"{text!r} is not a registry model URI: use models:/NAME@ALIAS or models:/NAME/VERSION")
    rest = raw[len(SCHEME):].strip("/")
    if "@" in rest:
        name, _, alias = rest.partition("@")
        return ModelUri(check_name(name), alias=check_alias(alias))
    name, sep, version = rest.partition("/")
    if not sep or not version:
        raise ConfigurationError(
            f"{text!r}: name an alias or a version, e.g. models:/{name or 'NAME'}@production or models:/{name or 'NAME'}/3"
        )
    return ModelUri(check_name(name), version=check_version(version))


def data_dir() -> Path:
    """The user's data directory for this program: $XDG_DATA_HOME/vision-serving (~/.local/share/...)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "vision-serving"


def default_registry_uri() -> str:
    """A SQLite store under the user's data directory (never the current directory)."""
    return f"sqlite:///{data_dir() / 'registry' / 'registry.db'}"


def default_artifact_root(registry_uri: str) -> str:
    """Beside a SQLite file (`<dir>/artifacts`); through an MLflow tracking server, the server's own proxied
    store (`mlflow server --serve-artifacts`); under the data directory for any other store."""
    if registry_uri.startswith(("http://", "https://")):
        return "mlflow-artifacts:/"
    if registry_uri.startswith("sqlite:///"):
        db = Path(registry_uri.removeprefix("sqlite:///"))
        return (db.parent / "artifacts").resolve().as_uri()
    return (data_dir() / "registry" / "artifacts").as_uri()


def redact(uri: str) -> str:
    """The URI with any password replaced, for logs and messages."""
    # `*`, not `+`: Redis URLs usually have an empty user name (redis://:password@host).
    return re.sub(r"(://[^:/@]*:)[^@]+@", r"\1***@", uri)
