"""`vision export-triton`: a registry model -> ONNX with every output of its signature -> a Triton model
repository entry whose config declares those outputs.

torch is imported only inside the export itself: `--backend triton` serves without torch installed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vision.models.signature import Signature
from vision.triton.repository import Flavour, TensorSpec, write_model

if TYPE_CHECKING:
    from vision.config.settings import ModelConfig

INPUT_NAME = "images"  # vision.models.export.INPUT_NAME, without importing torch to learn it


def triton_specs(signature: Signature) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The config's (inputs, outputs) for a model exported with `signature`: images (3, H, W); vectors
    (C,); maps (C, h, w). H, W, h, w are -1 (any size) when the geometry is variable, else the crop's."""
    geometry = signature.geometry
    crop = geometry.crop_size
    side = -1 if geometry.variable else crop
    inputs = [TensorSpec(INPUT_NAME, "TYPE_FP32", (3, side, side))]
    outputs = []
    for name in signature.outputs:
        dims = signature.output_shape(name, crop, crop)
        if signature.is_map(name) and geometry.variable:
            dims = (dims[0], -1, -1)
        outputs.append(TensorSpec(name, "TYPE_FP32", dims))
    return inputs, outputs


def export_model(
    repository: Path,
    name: str,
    version: int,
    *,
    arch: str,
    num_classes: int,
    weights: Path | None,
    flavour: Flavour = "cpu-python",
    max_batch_size: int = 16,
    preferred_batch_sizes: Sequence[int] = (4, 8, 16),
    max_queue_delay_us: int = 2000,
    instances: int = 1,
    tensorrt: bool = False,
    intra_op_threads: int | None = None,
    overwrite: bool = False,
    onnx_file: Path | None = None,
) -> Path:
    """Build `arch` with a `num_classes` head and `weights` (None: seeded random initialisation), export it
    with every output of its signature (parity-checked against torch by `export_onnx`), and write it as
    `version` of `name` in `repository`. Returns the model's directory.

    `onnx_file` is written as it is instead (an int8 model from `vision quantize`): its outputs are checked
    against the signature, and with `tensorrt` TensorRT builds it in INT8 from its explicit Q/DQ scales."""
    from vision.backends.torch_backend import run_on_torch_thread
    from vision.models import create_model, get_architecture, with_outputs
    from vision.models.export import export_onnx

    signature = get_architecture(arch).signature(num_classes)
    inputs, outputs = triton_specs(signature)
    with tempfile.TemporaryDirectory(prefix="vision-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        precision = "FP16"
        if onnx_file is not None:
            from vision.models.precision import precision_of

            onnx_path = Path(onnx_file)
            precision = "INT8" if precision_of(onnx_path) == "int8" else "FP16"
        else:

            def export() -> None:
                module = create_model(arch, num_classes=num_classes, weights=weights, pretrained=False)
                export_onnx(with_outputs(arch, module, num_classes), onnx_path, signature=signature)

            # On the process's torch thread, like every torch call here (see vision.backends.torch_backend).
            run_on_torch_thread(export)
        return write_model(
            repository,
            name,
            int(version),
            onnx_path,
            inputs=inputs,
            outputs=outputs,
            flavour=flavour,
            max_batch_size=max_batch_size,
            preferred_batch_sizes=list(preferred_batch_sizes),
            max_queue_delay_us=max_queue_delay_us,
            instances=instances,
            tensorrt=tensorrt,
            tensorrt_precision=precision,  # type: ignore[arg-type]
            intra_op_threads=intra_op_threads,
            overwrite=overwrite,
        )


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
    """Export the model `config` describes (weights, labels -> head width) and write it into `repository`
    under `config.triton_model or served name`, version `config.version`; a spec with `onnx=FILE` (an int8
    model) is written as that file. Returns the model's directory."""
    from vision.core.errors import ConfigurationError
    from vision.serving.loading import head_width, resolve_weights

    if not config.version.isdigit():
        raise ConfigurationError(f"Triton versions are integers, got {config.version!r}")
    num_classes = head_width(config)
    return export_model(
        repository,
        config.triton_model or config.served_name,
        int(config.version),
        arch=config.arch,
        num_classes=num_classes,
        # The export builds the module here, so it needs the weights a local engine would load (for
        # backend "triton" resolve_weights answers None: Triton holds the weights).
        weights=None if config.onnx else resolve_weights(config, "torch"),
        onnx_file=config.onnx,
        flavour=flavour,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=preferred_batch_sizes,
        max_queue_delay_us=max_queue_delay_us,
        instances=instances,
        tensorrt=tensorrt,
    )
