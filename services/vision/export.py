"""Exporting registry models to ONNX: the file ONNX Runtime serves in-process and Triton serves remotely.

Opset 17 with the TorchScript-based exporter (`dynamo=False`): it handles every registry architecture,
and its graphs matched eager torch within 4e-6 here. The batch axis is dynamic; every export is checked
against eager torch on a random batch before it is used, and refused beyond `PARITY_TOLERANCE`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vision.errors import ConfigurationError

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "images"
PARITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportedModel:
    path: Path
    input_name: str
    output_names: tuple[str, ...]
    # Max abs difference to eager torch on the parity batch.
    max_abs_diff: float


def cache_key(arch: str, num_classes: int, weights_sha256: str, crop_size: int) -> str:
    import torch

    facts = json.dumps([arch, num_classes, weights_sha256, crop_size, OPSET, torch.__version__], sort_keys=True)
    return f"{arch}-{hashlib.sha256(facts.encode()).hexdigest()[:16]}"


def export_onnx(module: "object", path: Path, *, crop_size: int, output_names: tuple[str, ...] = ("logits",)) -> ExportedModel:
    """Export `module` (eval mode, outputs in `output_names` order) to `path` atomically, then verify it."""
    import onnxruntime as ort
    import torch

    dummy = torch.zeros(1, 3, crop_size, crop_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of dynamo; it is the one that handles every
            # registry model today, so its deprecation notice is expected.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module,
                (dummy,),
                str(tmp),
                dynamo=False,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=list(output_names),
                dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in output_names}},
            )
        probe = np.random.default_rng(0).standard_normal((2, 3, crop_size, crop_size)).astype(np.float32)
        with torch.inference_mode():
            reference = module(torch.from_numpy(probe))  # type: ignore[operator]
        reference = reference if isinstance(reference, tuple) else (reference,)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run(list(output_names), {INPUT_NAME: probe})
        diff = max(float(np.abs(g - r.numpy()).max()) for g, r in zip(got, reference, strict=True))
        if diff > PARITY_TOLERANCE:
            raise ConfigurationError(
                f"ONNX export of {type(module).__name__} differs from torch by {diff:.2e} (> {PARITY_TOLERANCE}); "
                "serve it with --backend torch"
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported %s to %s (max abs diff to torch %.1e)", type(module).__name__, path, diff)
    return ExportedModel(path, INPUT_NAME, output_names, diff)
