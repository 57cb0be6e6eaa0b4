"""What every fine-tune job shares, whatever trains: the base model it starts from, the device, atomic
checkpoints, its MLflow run and metrics, and registering the result (training.finetune, training.delf)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vision.core import files
from vision.jobs.runtime import JobFailed, TransientError

if TYPE_CHECKING:
    import torch
    from vision.jobs.runtime import JobRun

log = logging.getLogger(__name__)

EXPERIMENT = "vision-finetune"


@dataclass
class Base:
    """What a fine-tune starts from."""

    arch: str
    weights: Path | None  # None: seeded random initialisation
    num_classes: int  # head width of those weights
    preset: str
    description: str  # lineage: the URI or spec


def family(arch: str) -> str:
    if arch.startswith("efficientnet"):
        return "efficientnet"
    if arch.startswith(("resnet", "resnext")):
        return "resnet"
    raise JobFailed(
        f"architecture {arch!r} has no fine-tune recipe (head and last blocks); use an EfficientNet or ResNet"
    )


def registry_store(settings: Any) -> Any:
    from vision.registry.store import RegistryStore

    try:
        return RegistryStore(settings.registry_uri, settings.registry_artifact_root)
    except Exception as exc:  # the store (PostgreSQL, a share) may be back in a moment
        raise TransientError(f"cannot open the model registry: {exc}") from None


def resolve_base(spec: str, store: Any, work: Path) -> Base:
    from pydantic import ValidationError
    from vision.config.settings import RANDOM_WEIGHTS, ModelConfig
    from vision.config.uri import parse_model_uri
    from vision.core.errors import ConfigurationError, NotFound
    from vision.models import get_architecture
    from vision.registry.package import WEIGHTS
    from vision.serving.loading import head_width

    try:
        config = ModelConfig.parse_spec(spec)
    except (ValidationError, ConfigurationError) as exc:
        raise JobFailed(f"base {spec!r}: {exc}") from None
    if config.registry:
        uri = parse_model_uri(config.registry)
        try:
            version = store.resolve(uri)
            package = store.download(uri.name, version, work / "base" / f"{uri.name}-{version}")
        except NotFound as exc:
            raise JobFailed(f"base {spec}: {exc}") from None
        except ConfigurationError as exc:
            raise JobFailed(f"base {spec}: {exc}") from None
        arch = str(package.spec["arch"])
        return Base(
            arch,
            package.root / WEIGHTS,
            int(package.card["num_classes"]),
            str(package.spec.get("preset") or get_architecture(arch).defaults.preset),
            f"models:/{uri.name}/{version}",
        )
    try:
        entry = get_architecture(config.arch)
        width = head_width(config)
    except ConfigurationError as exc:
        raise JobFailed(f"base {spec!r}: {exc}") from None
    if config.weights == RANDOM_WEIGHTS:
        weights = None
    elif config.weights is not None:
        weights = Path(config.weights)
        if not weights.is_file():
            raise JobFailed(f"base {spec!r}: weights file {weights} does not exist")
    elif entry.defaults.bundled_weights is not None:
        weights = entry.defaults.bundled_weights()
    else:
        raise JobFailed(
            f"base {spec!r}: architecture {config.arch} has no bundled weights; give weights=FILE or weights=random"
        )
    return Base(config.arch, weights, width, config.preset or entry.defaults.preset, spec)


def pick_device(wanted: str) -> "torch.device":
    import torch

    if wanted:
        if wanted.startswith("cuda") and not torch.cuda.is_available():
            raise JobFailed(f"device {wanted!r} asked for, but this worker has no CUDA device")
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` atomically: a crash mid-save leaves the previous checkpoint whole."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_write(path) as fh:
        torch.save(obj, fh)


def start_mlflow_run(store: Any, run: "JobRun", task: str, params: dict[str, Any]) -> str:
    """The job's MLflow run in the experiment `vision-finetune` (created on first use), with `params`."""
    from mlflow.entities import Param

    client = store.client
    experiment_id = store.experiment(EXPERIMENT, store.artifact_root.rstrip("/") + "/finetune")
    created = client.create_run(
        experiment_id,
        run_name=f"{task}-{run.params['name']}-{run.job_id[:8]}",
        tags={"vision.job_id": run.job_id, "vision.task": task},
    )
    client.log_batch(created.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    return created.info.run_id


def log_metrics(client: Any, run_id: str, scores: dict[str, Any], epoch: int) -> None:
    """One epoch's numeric scores as MLflow metrics (step = epoch)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(k, float(v), now, epoch)
        for k, v in scores.items()
        if isinstance(v, (int, float)) and math.isfinite(v)
    ]
    try:
        client.log_batch(run_id, metrics=batch)
    except Exception as exc:  # the run's metrics are a record, not the training: never fail a job on them
        log.warning("MLflow: could not log epoch %d: %s", epoch, exc)


def register_version(
    store: Any,
    name: str,
    spec: dict[str, Any],
    *,
    run_id: str,
    golden: list[tuple[str, bytes]],
    lineage: dict[str, str],
    description: str,
    promote_to: str = "",
) -> str:
    """The seam to the model registry (vision.registry): one version of `name` from `spec` (a model spec's
    fields), its golden outputs recorded on `golden`, attached to the training run; then `promote_to`."""
    from vision.config.settings import ModelConfig
    from vision.core.errors import ConfigurationError

    config = ModelConfig(**spec)
    try:
        info = store.register(
            name, config, golden_images=golden, run_id=run_id, lineage=lineage, description=description
        )
        if promote_to:
            store.promote(name, info.version, promote_to)
    except ConfigurationError as exc:
        message = str(exc)
        if "locked" in message or "unreachable" in message or "connect" in message:
            raise TransientError(f"registering {name}: {message}") from None
        raise JobFailed(f"registering {name}: {message}") from None
    return info.version
