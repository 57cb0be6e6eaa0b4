"""In-process ONNX Runtime backend: the fastest CPU engine here (1.6-10x eager torch), same batching."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from vision.backends.base import LOGITS, BatchingConfig, InferenceBackend, Outputs
from vision.backends.batching import BatchStats, LocalBatchedBackend
from vision.core.errors import ConfigurationError


def _providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.startswith("cuda"):
        # TensorRT first where the build has it, CUDA next, CPU as the fallback for unsupported nodes.
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        chosen = [p for p in wanted if p in available]
        if "CUDAExecutionProvider" not in chosen:
            raise ConfigurationError(f"device {device!r} needs onnxruntime-gpu; this build has {available}")
        return chosen
    return ["CPUExecutionProvider"]


def open_session(model_path: Path, *, device: str = "cpu", threads: int = 1, spin_wait: bool = False):  # noqa: ANN201
    """An ONNX Runtime session set up as serving runs it (the quantizer's speed report uses the same)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin_wait:
        # Idle intra-op threads busy-wait by default; in a server they would steal the cores that decode
        # images and run gRPC. Off: +10% img/s at 16 clients on 2 cores (measured, see docs/benchmarks.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(model_path), options, providers=_providers(device))
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise ConfigurationError(f"ONNX Runtime cannot load {model_path}: {exc}") from None


class OnnxRuntimeBackend(LocalBatchedBackend, InferenceBackend):
    kind = "onnxruntime"

    def __init__(
        self,
        model_path: Path,
        *,
        device: str = "cpu",
        threads: int = 1,
        spin_wait: bool = False,
        batching: BatchingConfig = BatchingConfig(),
        on_batch: Callable[[BatchStats], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
        name: str = "model",
    ) -> None:
        self._session = open_session(model_path, device=device, threads=threads, spin_wait=spin_wait)
        self._input_name = self._session.get_inputs()[0].name
        self.output_names = tuple(o.name for o in self._session.get_outputs())
        self._init_batching(
            self.forward, batching=batching, on_batch=on_batch, on_queue_depth=on_queue_depth, name=name
        )

    def forward(self, batch: np.ndarray, outputs: tuple[str, ...] = (LOGITS,)) -> Outputs:
        # Only the requested outputs are copied out of the session (a layer3 map of ResNet-50 is 800 KB per
        # image that Classification would otherwise pay for).
        values = self._session.run(list(outputs), {self._input_name: batch})
        return dict(zip(outputs, values, strict=True))

