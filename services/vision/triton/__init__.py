"""Serving through a real NVIDIA Triton Inference Server: its runtime, process, admin API, model repository and export; see docs/triton.md."""

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
