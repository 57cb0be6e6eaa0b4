"""Serving our models through a real NVIDIA Triton Inference Server.

- `runtime`: the Triton venv (nvidia-pytriton's tritonserver 2.51, numpy 1.26, onnxruntime): `setup_runtime`,
  `find_runtime`.
- `process`: `TritonProcess`, a tritonserver on 127.0.0.1 against a model repository.
- `admin`: `TritonAdmin`, Triton's HTTP admin API (readiness, config, statistics, repository load/unload).
- `repository`: config.pbtxt through Triton's ModelConfig protobuf with an explicit version policy, atomic
  writes (`write_model`), and the version lifecycle (`add_version`, `retire_version`), in two flavours:
  `gpu-onnxruntime` (production: Triton's onnxruntime backend, KIND_GPU, optional TensorRT) and `cpu-python`
  (here: Triton's python backend running the same model.onnx with onnxruntime).
- `export`: a registry model -> ONNX with every output of its signature -> a repository entry.
- `python_model.py`: the python-backend model (copied as `<version>/model.py`); it runs inside Triton's
  own Python and imports nothing from this package.
- `cli`: `vision triton` / `python -m vision.triton`.

See docs/triton.md.
"""

from vision.triton.admin import TritonAdmin
from vision.triton.errors import (
    TritonAdminError,
    TritonError,
    TritonModelLoadError,
    TritonRuntimeMissing,
    TritonSetupError,
    TritonStartError,
)
from vision.triton.process import TritonProcess
from vision.triton.repository import TensorSpec, add_version, retire_version, write_model
from vision.triton.runtime import TritonRuntime, default_venv, find_runtime, setup_runtime

__all__ = [
    "TensorSpec",
    "TritonAdmin",
    "TritonAdminError",
    "TritonError",
    "TritonModelLoadError",
    "TritonProcess",
    "TritonRuntime",
    "TritonRuntimeMissing",
    "TritonSetupError",
    "TritonStartError",
    "add_version",
    "default_venv",
    "find_runtime",
    "retire_version",
    "setup_runtime",
    "write_model",
]
