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
from typing import TYPE_CHECKING

import numpy as np

from vision import metrics
from vision.backends import LOGITS, BatchingConfig, InferenceBackend, Outputs
from vision.backends.batching import BatchStats
from vision.errors import ConfigurationError, NotFound
from vision.imaging import Preset, get_preset
from vision.settings import ModelConfig, ServeSettings

if TYPE_CHECKING:
    from vision.tagging import Tagger
    from vision.vocab import LabelVocabulary

log = logging.getLogger(__name__)

TAGGING = "tagging"


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
    # Tag vocabulary, thresholds and scoring for the Tagging service; None when the model cannot tag.
    tagger: Tagger | None = None

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def tasks(self) -> frozenset[str]:
        """What the model can serve: its head's task ("classification" or "multilabel"), plus "tagging"."""
        return frozenset((self.task, TAGGING)) if self.tagger is not None else frozenset((self.task,))


class ServedModel:
    def __init__(self, card: ModelCard, backend: InferenceBackend) -> None:
        self.card = card
        self.backend = backend

    async def infer(self, batch: np.ndarray) -> Outputs:
        # No readiness pre-check: a remote backend may have recovered since its last health probe, and when
        # it has not, its own error says why (UNAVAILABLE: unreachable; FAILED_PRECONDITION: not loaded).
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
        """Models that can serve `task` (see `ModelCard.tasks`), in configuration order; all when None."""
        return [m for m in self._models if task is None or task in m.card.tasks]

    def get(self, name: str = "", version: str = "", *, task: str | None = None) -> ServedModel:
        """The model called `name` (default: the first configured for `task`), at `version` (default: newest)."""
        candidates = self.list(task)
        if not candidates:
            raise NotFound(f"no {task or ''} model is served".replace("  ", " "))
        name = name or candidates[0].card.name
        named = [m for m in candidates if m.card.name == name]
        if not named:
            known = ", ".join(sorted({m.card.name for m in candidates}))
            other = next((m for m in self._models if m.card.name == name), None)
            if other is not None:
                serves = ", ".join(sorted(other.card.tasks))
                raise NotFound(f"model {name!r} cannot be used for {task} (it serves: {serves}); available: {known}")
            raise NotFound(f"model {name!r} is not served here; available: {known}")
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


def _load_tagger(
    config: ModelConfig,
    default_task: str,
    labels: tuple[str, ...],
    labels_source: str | None,
    label_vocabulary: "LabelVocabulary | None",
) -> Tagger | None:
    from vision.tagging import load_tagger

    return load_tagger(
        model=config.served_name,
        task=config.task or default_task,
        labels_source=labels_source or "",
        labels=labels,
        hierarchy=config.hierarchy,
        thresholds=config.thresholds,
        label_vocabulary=label_vocabulary,
    )


def load_model(config: ModelConfig, settings: ServeSettings) -> ServedModel:
    """Build, load and wrap one model; raises ConfigurationError with the reason on any bad input."""
    from vision.models import get_architecture
    from vision.models.labels import labels_and_vocabulary
    from vision.models.weights import sha256_file

    entry = get_architecture(config.arch)
    defaults = entry.defaults
    labels_source = config.labels or defaults.labels
    labels, label_vocabulary = labels_and_vocabulary(labels_source)
    num_classes = config.num_classes or (len(labels) if config.labels else defaults.num_classes)
    if len(labels) != num_classes:
        raise ConfigurationError(
            f"model {config.served_name!r}: {len(labels)} labels but the head has {num_classes} outputs"
        )
    weights: Path | None = config.weights
    if weights is None and defaults.bundled_weights is not None:
        weights = defaults.bundled_weights()
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
        tagger=_load_tagger(config, defaults.task, labels, labels_source, label_vocabulary),
    )
    backend = _build_backend(config, settings, card, num_classes, weights)
    _check_outputs(backend, card, num_classes)
    metrics.record_model(card.name, card.version, card.architecture, backend.kind, card.weights_sha256)
    return ServedModel(card, backend)


def _check_outputs(backend: InferenceBackend, card: ModelCard, num_classes: int) -> None:
    """One forward pass on a blank image before serving: a model whose outputs don't match its labels
    (wrong pre-exported ONNX file, wrong head) is a start-up error, not INTERNAL on every request. It also
    warms the engine up, so the first caller doesn't pay for lazy initialisation."""
    forward = getattr(backend, "forward", None)
    if forward is None:  # remote engines: checked by the engine itself (Triton validates at load time)
        return
    size = card.preset.crop_size
    try:
        outputs = forward(np.zeros((1, 3, size, size), dtype=np.float32))
    except Exception as exc:
        raise ConfigurationError(f"model {card.name!r} fails on a {size}x{size} input: {exc}") from None
    logits = outputs.get(LOGITS)
    if logits is None:
        raise ConfigurationError(f"model {card.name!r} has no {LOGITS!r} output (it has {sorted(outputs)})")
    if logits.shape != (1, num_classes):
        raise ConfigurationError(
            f"model {card.name!r} outputs {LOGITS!r} of shape {tuple(logits.shape)} for one image; "
            f"its labels need (1, {num_classes})"
        )


def _build_backend(
    config: ModelConfig, settings: ServeSettings, card: ModelCard, num_classes: int, weights: Path | None
) -> InferenceBackend:
    from vision.models import create_model

    on_batch, on_depth = _metric_hooks(card.name, card.version)
    batching = BatchingConfig(settings.max_batch_size, settings.max_wait_ms, settings.max_queue_images)
    hooks = {"batching": batching, "on_batch": on_batch, "on_queue_depth": on_depth, "name": card.name}
    if settings.backend == "torch":
        from vision.backends.torch_backend import TorchBackend

        module = create_model(config.arch, num_classes=num_classes, weights=weights)
        return TorchBackend(module, device=settings.device, **hooks)
    if settings.backend == "onnxruntime":
        from vision.backends.onnx_backend import OnnxRuntimeBackend

        onnx_path = config.onnx or _exported_onnx(config, settings, card, num_classes, weights)
        return OnnxRuntimeBackend(
            onnx_path, device=settings.device, threads=settings.threads, spin_wait=settings.spin_wait, **hooks
        )
    if settings.backend == "triton":
        from vision.backends.triton_backend import TritonBackend

        if not config.version.isdigit():
            raise ConfigurationError(
                f"model {card.name!r}: Triton versions are integers (the repository's version folder), got {config.version!r}"
            )
        return TritonBackend(
            settings.triton_url,
            config.triton_model or card.name,
            config.version,
            timeout_s=settings.triton_timeout_s,
            retries=settings.triton_retries,
            on_batch=on_batch,
            shared_memory_bytes=settings.triton_shm_mb * 1024 * 1024,
        )
    raise ConfigurationError(f"unknown backend {settings.backend!r}")


def _exported_onnx(
    config: ModelConfig, settings: ServeSettings, card: ModelCard, num_classes: int, weights: Path | None
) -> Path:
    """The model's ONNX export from the cache, exporting (and parity-checking) it on a miss."""
    import tempfile

    from vision.export import cache_key, export_onnx
    from vision.models import create_model

    if weights is None:
        # Random weights differ on every start: never cache them.
        path = Path(tempfile.mkdtemp(prefix="vision-onnx-")) / f"{config.arch}.onnx"
    else:
        path = settings.onnx_cache / f"{cache_key(config.arch, num_classes, card.weights_sha256, card.preset.crop_size)}.onnx"
        if path.is_file():
            return path
    module = create_model(config.arch, num_classes=num_classes, weights=weights)
    export_onnx(module, path, crop_size=card.preset.crop_size)
    return path


def load_repository(settings: ServeSettings) -> ModelRepository:
    import torch

    from vision.backends.torch_backend import run_on_torch_thread

    def load_all() -> ModelRepository:
        torch.set_num_threads(settings.threads)
        return ModelRepository([load_model(cfg, settings) for cfg in settings.models])

    return run_on_torch_thread(load_all)
