"""Exporting registry models to ONNX: the file ONNX Runtime serves in-process and Triton serves remotely.

Opset 17 with the TorchScript-based exporter (`dynamo=False`): it handles every registry architecture,
and its graphs matched eager torch within 4e-6 here. The graph carries every output of the model's
signature (see vision.models.signature); the batch axis is dynamic, and so are height and width when the
geometry is variable (measured: no slower than a static 224 graph for EfficientNet-Lite0 on ONNX Runtime,
and a caller asking only for `logits` does not pay for copying the feature maps out). Every export is
checked against eager torch on a random batch before it is used, and refused beyond `PARITY_TOLERANCE`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vision.core import files
from vision.core.errors import ConfigurationError
from vision.models.signature import Signature

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "images"
PARITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportedModel:
    path: Path
    input_name: str
    output_names: tuple[str, ...]
    # Max abs difference to eager torch on the parity batch, relative to each output's scale (at least 1).
    max_abs_diff: float


def cache_key(arch: str, signature: Signature, weights_sha256: str) -> str:
    import torch

    facts = json.dumps(
        [arch, signature.outputs, signature.num_classes, signature.geometry.crop_size, signature.geometry.variable,
         weights_sha256, OPSET, torch.__version__],
        sort_keys=True,
    )
    return f"{arch}-{hashlib.sha256(facts.encode()).hexdigest()[:16]}"


def export_onnx(module: "object", path: Path, *, signature: Signature) -> ExportedModel:
    """Export `module` (eval mode, returning `signature.outputs` in order, as `with_outputs` builds it) to
    `path` atomically, then verify every output against eager torch."""
    import onnxruntime as ort
    import torch

    crop = signature.geometry.crop_size
    output_names = signature.outputs
    spatial = {2: "height", 3: "width"} if signature.geometry.variable else {}
    dynamic_axes = {INPUT_NAME: {0: "batch", **spatial}}
    for name in output_names:
        dynamic_axes[name] = {0: "batch", **(spatial if signature.is_map(name) else {})}
    dummy = torch.zeros(1, 3, crop, crop)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The graph replaces `path` only once it has passed the parity check below.
    with files.atomic_path(path) as tmp:
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
                dynamic_axes=dynamic_axes,
            )
        # A non-square probe when the geometry is variable, so a graph that baked in 224x224 is caught.
        height, width = (crop, crop + 32) if signature.geometry.variable else (crop, crop)
        probe = np.random.default_rng(0).standard_normal((2, 3, height, width)).astype(np.float32)
        with torch.inference_mode():
            reference = module(torch.from_numpy(probe))  # type: ignore[operator]
        reference = reference if isinstance(reference, tuple) else (reference,)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run(list(output_names), {INPUT_NAME: probe})
        # Relative to each output's scale: deep feature maps of random weights reach values in the hundreds,
        # where float32 rounding alone exceeds an absolute 1e-4.
        diff = max(
            float(np.abs(g - r.numpy()).max()) / max(1.0, float(np.abs(r.numpy()).max()))
            for g, r in zip(got, reference, strict=True)
        )
        if diff > PARITY_TOLERANCE:
            raise ConfigurationError(
                f"ONNX export of {type(module).__name__} differs from torch by {diff:.2e} (> {PARITY_TOLERANCE}); "
                "serve it with backend=torch"
            )
    log.info("exported %s to %s (max abs diff to torch %.1e)", type(module).__name__, path, diff)
    return ExportedModel(path, INPUT_NAME, output_names, diff)
