"""What a process knows about a registry model it follows: shown by ListModels and `vision models`.

Kept free of heavy imports: the servicers read it through `ModelCard.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False)
class RegistryStatus:
    """Live status of one `models:/...` entry; every served version of that model shares the one object."""

    # The URI followed, e.g. "models:/lite@production".
    uri: str
    # The alias followed; "" for a pinned version.
    alias: str = ""
    # The version the alias pointed to at the last check (may be ahead of the served one while it loads, or
    # while that version is refused).
    alias_version: str = ""
    # The version serving requests that name no version.
    serving_version: str = ""
    # The last version refused, which check refused it (sha256, gate, load, download) and why; cleared when
    # a version is published.
    refused_version: str = ""
    refused_check: str = ""
    refused_reason: str = ""
    # Unix time of the last successful look at the registry, and the last error talking to it ("" if none).
    checked_at: float = 0.0
    error: str = ""
    # The MLflow run that produced the served version (lineage).
    run_id: str = ""

    @property
    def in_sync(self) -> bool:
        return bool(self.serving_version) and self.serving_version == (self.alias_version or self.serving_version)
