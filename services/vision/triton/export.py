"""`vision export-triton`: a registry model → ONNX → a Triton model repository entry."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from vision.settings import ModelConfig

Flavour = Literal["cpu-python", "gpu-onnxruntime"]


def export_to_triton(
    config: ModelConfig,
    repository: Path,
    *,
    flavour: Flavour = "cpu-python",
    max_batch_size: int = 16,
    preferred_batch_sizes: tuple[int, ...] = (4, 8, 16),
    max_queue_delay_us: int = 2000,
    instances: int = 1,
    tensorrt: bool = False,
) -> Path:
    """Export the model `config` describes (weights, labels → head width) and write it into `repository`
    under `config.triton_model or served name`, version `config.version`. Returns the model's directory."""
    from vision.backends.torch_backend import run_on_torch_thread
    from vision.errors import ConfigurationError
    from vision.export import INPUT_NAME, export_onnx
    from vision.imaging import get_preset
    from vision.models import create_model, get_architecture
    from vision.models.labels import resolve_labels
    from vision.triton.repository import TensorSpec, write_model

    if not config.version.isdigit():
        raise ConfigurationError(f"Triton versions are integers, got {config.version!r}")
    defaults = get_architecture(config.arch).defaults
    num_classes = config.num_classes or (len(resolve_labels(config.labels)) if config.labels else defaults.num_classes)
    weights = config.weights
    if weights is None and defaults.bundled_weights is not None:
        weights = defaults.bundled_weights()
    crop = get_preset(config.preset or defaults.preset).crop_size
    with tempfile.TemporaryDirectory(prefix="vision-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"

        def export() -> None:
            module = create_model(config.arch, num_classes=num_classes, weights=weights)
            export_onnx(module, onnx_path, crop_size=crop)

        run_on_torch_thread(export)
        return write_model(
            repository,
            config.triton_model or config.served_name,
            int(config.version),
            onnx_path,
            inputs=[TensorSpec(INPUT_NAME, "TYPE_FP32", (3, crop, crop))],
            outputs=[TensorSpec("logits", "TYPE_FP32", (num_classes,))],
            flavour=flavour,
            max_batch_size=max_batch_size,
            preferred_batch_sizes=list(preferred_batch_sizes),
            max_queue_delay_us=max_queue_delay_us,
            instances=instances,
            tensorrt=tensorrt,
        )
