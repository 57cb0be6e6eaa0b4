"""Served models: loading them from settings and finding them by name and version.

A `ModelCard` is the record clients see (name, version, labels, preprocessing, lineage); a `ServedModel`
pairs it with the backend that runs it. Loading happens before the server binds its port, so a bad
weights or label file stops start-up with a clear message instead of failing the first request.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vision import metrics
from vision.backends import BatchingConfig, InferenceBackend, Outputs
from vision.backends.batching import BatchStats
from vision.errors import ConfigurationError, FailedPrecondition, NotFound
from vision.imaging import Preset, get_preset
from vision.settings import ModelConfig, ServeSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    architecture: str
    task: str
    labels: tuple[str, ...]
    preset: Preset
    backend: str
    weights_sha256: str = ""

    @property
    def num_labels(self) -> int:
        return len(self.labels)


class ServedModel:
    def __init__(self, card: ModelCard, backend: InferenceBackend) -> None:
        self.card = card
        self.backend = backend

    async def infer(self, batch: np.ndarray) -> Outputs:
        if not self.backend.is_ready():
            raise FailedPrecondition(f"model {self.card.name!r} version {self.card.version!r} is not ready yet")
        return await self.backend.infer(batch)


def _version_key(version: str) -> tuple[tuple[int, object], ...]:
    # "10" sorts after "9"; non-numeric parts compare as text.
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", version) if p)


class ModelRepository:
    def __init__(self, models: list[ServedModel]) -> None:
        self._models = models

    def __iter__(self):  # noqa: ANN204 - simple iterator
        return iter(self._models)

    def list(self, task: str | None = None) -> list[ServedModel]:
        return [m for m in self._models if task is None or m.card.task == task]

    def get(self, name: str = "", version: str = "", *, task: str | None = None) -> ServedModel:
        """The model called `name` (default: the first configured for `task`), at `version` (default: newest)."""
        candidates = self.list(task)
        if not candidates:
            raise NotFound(f"no {task or ''} model is served".replace("  ", " "))
        name = name or candidates[0].card.name
        named = [m for m in candidates if m.card.name == name]
        if not named:
            known = sorted({m.card.name for m in candidates})
            raise NotFound(f"model {name!r} is not served here; available: {', '.join(known)}")
        if not version:
            return max(named, key=lambda m: _version_key(m.card.version))
        for model in named:
            if model.card.version == version:
                return model
        versions = sorted((m.card.version for m in named), key=_version_key)
        raise NotFound(f"model {name!r} has no version {version!r}; available: {', '.join(versions)}")

    async def start(self) -> None:
        for model in self._models:
            await model.backend.start()

    async def close(self) -> None:
        for model in self._models:
            await model.backend.close()

    def ready(self) -> bool:
        return all(m.backend.is_ready() for m in self._models)


def _metric_hooks(name: str, version: str):  # noqa: ANN202 - pair of callbacks
    batch_hist = metrics.BATCH_SIZE.labels(model=name, version=version)
    queue_hist = metrics.STAGE_LATENCY.labels(stage="queue", model=name, version=version)
    infer_hist = metrics.STAGE_LATENCY.labels(stage="inference", model=name, version=version)
    depth = metrics.QUEUE_DEPTH.labels(model=name, version=version)

    def on_batch(stats: BatchStats) -> None:
        batch_hist.observe(stats.size)
        queue_hist.observe(stats.queue_seconds)
        infer_hist.observe(stats.run_seconds)

    return on_batch, depth.set


def load_model(config: ModelConfig, settings: ServeSettings) -> ServedModel:
    """Build, load and wrap one model; raises ConfigurationError with the reason on any bad input."""
    from vision.models import create_model, get_architecture
    from vision.models.labels import resolve_labels
    from vision.models.weights import sha256_file

    entry = get_architecture(config.arch)
    defaults = entry.defaults
    labels = resolve_labels(config.labels or defaults.labels)
    num_classes = config.num_classes or (len(labels) if config.labels else defaults.num_classes)
    if len(labels) != num_classes:
        raise ConfigurationError(
            f"model {config.served_name!r}: {len(labels)} labels but the head has {num_classes} outputs"
        )
    weights: Path | None = config.weights
    if weights is None and defaults.bundled_weights is not None:
        weights = defaults.bundled_weights()
    module = create_model(config.arch, num_classes=num_classes, weights=weights)
    if weights is None:
        log.warning("model %s serves RANDOM weights: no weights file given and none bundled", config.served_name)
    card = ModelCard(
        name=config.served_name,
        version=config.version,
        architecture=config.arch,
        task=config.task or defaults.task,
        labels=labels,
        preset=get_preset(config.preset or defaults.preset),
        backend=settings.backend,
        weights_sha256=sha256_file(weights) if weights is not None else "",
    )
    on_batch, on_depth = _metric_hooks(card.name, card.version)
    batching = BatchingConfig(settings.max_batch_size, settings.max_wait_ms, settings.max_queue_images)
    from vision.backends.torch_backend import TorchBackend

    backend = TorchBackend(
        module, device=settings.device, batching=batching, on_batch=on_batch, on_queue_depth=on_depth, name=card.name
    )
    metrics.record_model(card.name, card.version, card.architecture, backend.kind, card.weights_sha256)
    return ServedModel(card, backend)


def load_repository(settings: ServeSettings) -> ModelRepository:
    import torch

    from vision.backends.torch_backend import run_on_torch_thread

    def load_all() -> ModelRepository:
        torch.set_num_threads(settings.threads)
        return ModelRepository([load_model(cfg, settings) for cfg in settings.models])

    return run_on_torch_thread(load_all)
