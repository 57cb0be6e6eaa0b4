"""Serving our models through a real NVIDIA Triton Inference Server.

- `runtime`: the Triton venv (nvidia-pytriton's tritonserver 2.51, numpy 1.26, onnxruntime) and
  `TritonProcess`, a tritonserver on 127.0.0.1 against a model repository.
- `repository`: writes a Triton model repository entry (config.pbtxt + `<version>/model.onnx`) atomically,
  in two flavours: `gpu-onnxruntime` (production: Triton's onnxruntime backend, KIND_GPU, optional TensorRT)
  and `cpu-python` (here: Triton's python backend running the same model.onnx with onnxruntime).
- `python_model.py`: the python-backend model (copied as `<version>/model.py`); it runs inside Triton's
  own Python and imports nothing from this package.

See docs/triton.md.
"""

from vision.triton.repository import TensorSpec, write_model
from vision.triton.runtime import (
    TritonError,
    TritonModelLoadError,
    TritonProcess,
    TritonRuntime,
    TritonRuntimeMissing,
    TritonSetupError,
    TritonStartError,
    default_venv,
    find_runtime,
    setup_runtime,
)

__all__ = [
    "TensorSpec",
    "TritonError",
    "TritonModelLoadError",
    "TritonProcess",
    "TritonRuntime",
    "TritonRuntimeMissing",
    "TritonSetupError",
    "TritonStartError",
    "default_venv",
    "find_runtime",
    "setup_runtime",
    "write_model",
]
