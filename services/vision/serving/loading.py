"""From a model spec to a served model: weights, labels, card, backend.

Everything that can be wrong with a spec (a missing weights file, labels that don't fit the head, an
unknown preset) is found here and raised as a ConfigurationError naming the problem, before the model
serves. Loading is synchronous and heavy (building, exporting, opening sessions): the server runs it before
it binds its port, and the live model set runs it on a loader thread so the models already serving keep
answering.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from vision.backends import BatchingConfig, InferenceBackend
from vision.backends.batching import BatchStats
from vision.config.settings import RANDOM_WEIGHTS, ModelConfig, ServeSettings
from vision.core import metrics
from vision.core.errors import ConfigurationError
from vision.media.imaging import get_preset
from vision.models.card import DELF, FEATURES, TAGGING, ModelCard
from vision.serving.repository import ModelRepository, ServedModel

log = logging.getLogger(__name__)

# `labels=none`: a pure feature extractor, served without a classifier head.
NO_LABELS = "none"


def load_model(config: ModelConfig, settings: ServeSettings) -> ServedModel:
    """Build, load and wrap one model (not started yet); raises ConfigurationError with the reason."""
    card, weights = model_card(config, settings)
    return ServedModel(card, build_backend(config, settings, card, weights))


def resolve_weights(config: ModelConfig, backend: str) -> Path | None:
    """The weights file a spec serves: its own, else the architecture's bundled one; None for
    `weights=random`, and for a Triton model without a file (Triton holds its weights). An architecture
    without bundled weights and no file is refused: serving random weights with real labels would answer
    every request with confident nonsense."""
    from vision.models import get_architecture

    if config.weights == RANDOM_WEIGHTS:
        return None
    if config.weights is not None:
        return Path(config.weights)
    if backend == "triton":
        return None
    bundled = get_architecture(config.arch).defaults.bundled_weights
    if bundled is None:
        raise ConfigurationError(
            f"model {config.served_name!r}: architecture {config.arch!r} has no bundled weights; give "
            f"weights=FILE (a state dict or checkpoint), or weights=random to serve random weights on purpose"
        )
    return bundled()


def head_width(config: ModelConfig, n_labels: int | None = None) -> int:
    """Outputs of the spec's classifier head: `num_classes=`, else one per label of its label file, else
    the architecture's default; 0 for a feature extractor (`labels=none`). `n_labels` saves reading the
    label file again when the caller has it."""
    from vision.labels.names import resolve_labels
    from vision.models import get_architecture

    if config.labels == NO_LABELS:
        return 0
    if config.num_classes:
        return config.num_classes
    if config.labels:
        return n_labels if n_labels is not None else len(resolve_labels(config.labels))
    return get_architecture(config.arch).defaults.num_classes


def model_card(config: ModelConfig, settings: ServeSettings) -> tuple[ModelCard, Path | None]:
    """The record of a spec, and the weights file it names (None: seeded random weights)."""
    from vision.core.files import sha256_file
    from vision.labels.names import labels_and_vocabulary
    from vision.models import get_architecture

    entry = get_architecture(config.arch)
    defaults = entry.defaults
    # `labels=none`, or an architecture that is a pure extractor by default (DELF) given no labels.
    feature_extractor = config.labels == NO_LABELS or (
        config.labels is None and not config.num_classes and defaults.labels is None and defaults.num_classes == 0
    )
    labels_source = None if feature_extractor else (config.labels or defaults.labels)
    labels, label_vocabulary = ((), None) if feature_extractor else labels_and_vocabulary(labels_source)
    num_classes = head_width(config, len(labels))
    if len(labels) != num_classes:
        raise ConfigurationError(
            f"model {config.served_name!r}: {len(labels)} labels but the head has {num_classes} outputs"
        )
    backend = config.backend or settings.backend
    weights = resolve_weights(config, backend)
    random_weights = config.weights == RANDOM_WEIGHTS
    if random_weights:
        log.warning("model %s serves seeded RANDOM weights (weights=random)", config.served_name)
    task = "features" if feature_extractor else (config.task or defaults.task)
    precision = _precision(config, backend)
    signature = entry.signature(num_classes)
    card = ModelCard(
        name=config.served_name,
        version=config.version,
        architecture=config.arch,
        task=task,
        labels=labels,
        preset=get_preset(config.preset or defaults.preset),
        backend=backend,
        signature=signature,
        weights_sha256=sha256_file(weights) if weights is not None else "",
        random_weights=random_weights,
        # Published metrics describe the bundled weights only.
        metrics=defaults.metrics if config.weights is None else (),
        artifacts={
            TAGGING: None if feature_extractor else _load_tagger(config, defaults.task, labels, labels_source, label_vocabulary),
            FEATURES: _load_whitenings(config),
            DELF: _load_delf(config, signature),
        },
        precision=precision,
    )
    return card, weights


def _precision(config: ModelConfig, backend: str) -> str:
    """The precision of the graph a spec serves: its `onnx=` file's, else float32 (every export is)."""
    if config.onnx is None or not Path(config.onnx).is_file():
        return "fp32"
    from vision.models.precision import precision_of

    precision = precision_of(Path(config.onnx))
    if precision != "fp32" and backend == "torch":
        # The torch backend runs the float weights, not the ONNX file: it would serve another model than
        # the one named, and report the wrong precision.
        raise ConfigurationError(
            f"model {config.served_name!r}: {config.onnx} is a {precision} ONNX model; serve it with backend=onnxruntime "
            "(or Triton), the torch backend would run the float weights instead"
        )
    return precision


def _load_delf(config: ModelConfig, signature: object):  # noqa: ANN202 - DelfModel | None
    from vision.tasks.delf import load_delf_model

    return load_delf_model(
        config.served_name,
        signature,  # type: ignore[arg-type]
        layer=config.delf_layer,
        score_threshold=config.delf_score_threshold,
        max_image_side=config.delf_max_side,
        pca=config.delf_pca,
    )


def _load_whitenings(config: ModelConfig) -> dict:  # noqa: ANN401 - name -> Whitening
    from vision.tasks.features import load_whitenings

    return load_whitenings(config.whitenings)


def _load_tagger(config: ModelConfig, default_task: str, labels: tuple[str, ...], labels_source: str | None, label_vocabulary: object):  # noqa: ANN202
    from vision.tasks.tagging import load_tagger

    return load_tagger(
        model=config.served_name,
        task=config.task or default_task,
        labels_source=labels_source or "",
        labels=labels,
        hierarchy=config.hierarchy,
        thresholds=config.thresholds,
        label_vocabulary=label_vocabulary,  # type: ignore[arg-type]
    )


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


def build_torch_module(config: ModelConfig, card: ModelCard, weights: Path | None):  # noqa: ANN201 - nn.Module
    """The model as a module returning every output of its signature (torch backend, ONNX export)."""
    from vision.models import create_model, with_outputs

    num_classes = card.signature.num_classes
    module = create_model(config.arch, num_classes=num_classes, weights=weights, pretrained=False)
    return with_outputs(config.arch, module, num_classes)


def build_backend(config: ModelConfig, settings: ServeSettings, card: ModelCard, weights: Path | None) -> InferenceBackend:
    on_batch, on_depth = _metric_hooks(card.name, card.version)
    batching = BatchingConfig(settings.max_batch_size, settings.max_wait_ms, settings.max_queue_images)
    hooks = {"batching": batching, "on_batch": on_batch, "on_queue_depth": on_depth, "name": card.name}
    if card.backend == "torch":
        _require_torch(config, "runs on the torch backend, which")
        import torch

        from vision.backends.torch_backend import TorchBackend, run_on_torch_thread

        # Built on the torch thread, where it will run (see torch_backend for why that matters).
        run_on_torch_thread(torch.set_num_threads, settings.threads)
        module = run_on_torch_thread(build_torch_module, config, card, weights)
        return TorchBackend(module, output_names=card.signature.outputs, device=settings.device, **hooks)
    if card.backend == "onnxruntime":
        from vision.backends.onnx_backend import OnnxRuntimeBackend

        onnx_path = config.onnx or cached_onnx(config, settings, card, weights)
        return OnnxRuntimeBackend(
            onnx_path, device=settings.device, threads=settings.threads, spin_wait=settings.spin_wait, **hooks
        )
    if card.backend == "triton":
        from vision.backends.triton_backend import TritonBackend, TritonTLS

        if not config.version.isdigit():
            raise ConfigurationError(
                f"model {card.name!r}: Triton versions are integers (the repository's version folder), got {config.version!r}"
            )
        return TritonBackend(
            settings.triton_url,
            config.triton_model or card.name,
            config.version,
            signature=card.signature,
            timeout_s=settings.triton_timeout_s,
            retries=settings.triton_retries,
            on_batch=on_batch,
            shared_memory_bytes=settings.triton_shm_mb * 1024 * 1024,
            tls=TritonTLS(settings.triton_tls_ca, settings.triton_tls_cert, settings.triton_tls_key,
                          settings.triton_tls_server_name) if settings.triton_tls_ca else None,
        )
    raise ConfigurationError(f"unknown backend {card.backend!r}")


def _require_torch(config: ModelConfig, what: str) -> None:
    """One line instead of a traceback when torch is missing (the slim image), naming what would work."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise ConfigurationError(
            f"model {config.served_name!r} {what} needs torch, which this installation lacks (the slim image): "
            "give the model a pre-exported onnx=FILE (`vision export-triton` writes one), serve it with "
            "--backend triton, or use the full image"
        )


def cached_onnx(config: ModelConfig, settings: ServeSettings, card: ModelCard, weights: Path | None) -> Path:
    """The model's ONNX export from the cache, exporting (and parity-checking) it on a miss. Random
    weights are seeded, so they are cached like any other: nothing is written outside the cache."""
    _require_torch(config, "has no onnx= file, and exporting one at start")
    from vision.models.export import cache_key, export_onnx

    digest = card.weights_sha256 or "random-seed-0"
    path = settings.onnx_cache / f"{cache_key(config.arch, card.signature, digest)}.onnx"
    if not path.is_file():
        module = build_torch_module(config, card, weights)
        export_onnx(module, path, signature=card.signature)
    return path


async def publish(
    repository: ModelRepository,
    config: ModelConfig,
    settings: ServeSettings,
    *,
    make_default: bool = False,
    check: Callable[[ServedModel], Awaitable[None]] | None = None,
) -> ServedModel:
    """Load `config` on a loader thread (the event loop and the models already serving keep running), then
    add it to the live set; the registry's publisher drives this. `check` runs on the started model before
    it is published (see ModelRepository.add)."""
    loop = asyncio.get_running_loop()
    model = await loop.run_in_executor(_loader(), load_model, config, settings)
    await repository.add(model, make_default=make_default, check=check)
    return model


_LOADER: concurrent.futures.ThreadPoolExecutor | None = None


def _loader() -> concurrent.futures.ThreadPoolExecutor:
    # One thread: two loads at once would only compete for the cores the serving models need.
    global _LOADER
    if _LOADER is None:
        _LOADER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader")
    return _LOADER


def load_repository(settings: ServeSettings) -> ModelRepository:  # noqa: ANN201 - ModelRepository
    """Every configured model, loaded before the server binds its port. Registry entries
    (`models:/NAME@alias`) are resolved first (vision.registry.publisher.RegistryPublisher.resolve)."""
    unresolved = [cfg.registry for cfg in settings.models if cfg.registry]
    if unresolved:
        raise ConfigurationError(f"registry models {unresolved} must be resolved first (vision.registry.publisher)")
    return ModelRepository([load_model(cfg, settings) for cfg in settings.models])
