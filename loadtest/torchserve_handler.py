"""TorchServe handler for the peer that `python -m loadtest.modes` compares this service against.

The peer must do the same work as `vision serve`, or the comparison says nothing: it receives the encoded
image (server-side decode), decodes and preprocesses it with the project's own `vision.media.imaging`
(resize 256 / centre crop 224 / normalise, JPEG draft decode: imported from the checkout, not mirrored),
builds the architecture with the project's builders (`vision.models.create_model`) and loads the very state
dict the harness saved from the served model, runs it in eager torch with channels_last under
`inference_mode` on `threads` intra-op threads, and answers the top-k (softmax) classes as JSON.

TorchServe imports this file in its own virtualenv (.venv-torchserve), where the project is not installed, so
`initialize` puts the checkout's `services/` folder on sys.path (the path comes from the archive's
`vision_peer.json`). The model logic lives in `PeerModel`, free of TorchServe types, so the harness runs
the same code in-process as the peer's raw baseline and the tests check it without TorchServe.

Entry point: the module-level `handle(data, context)` (TorchServe calls it once with data=None to
initialise, then once per batch; `data` is a list of requests, each a dict whose "data" or "body" holds
the bytes sent in `PredictionsRequest.input["data"]`).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_NAME = "vision_peer.json"


def add_services_path(services: str | None) -> None:
    """Make the checkout's `vision` package importable (TorchServe's worker does not have it installed)."""
    if services and services not in sys.path:
        sys.path.insert(0, services)


def softmax_top_k(logits: np.ndarray, k: int) -> list[list[dict[str, float]]]:
    """Per row: the k most probable classes, highest first, as {"index", "score"}.

    The same arithmetic as the service's classification answer (softmax over the logits, top-k by
    probability), in float64 so ties and rounding do not depend on the engine's output dtype.
    """
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    k = min(k, p.shape[1])
    # argpartition then a sort of only k values: cheaper than sorting 1000 classes per image.
    top = np.argpartition(-p, k - 1, axis=1)[:, :k]
    rows = []
    for i, idx in enumerate(top):
        order = idx[np.argsort(-p[i, idx], kind="stable")]
        rows.append([{"index": int(j), "score": float(p[i, j])} for j in order])
    return rows


class PeerModel:
    """The peer's whole inference path: bytes → decode + preprocess → eager torch forward → top-k."""

    def __init__(self, arch: str, num_classes: int, state_dict: Path, *, threads: int, preset: str = "torchvision",
                 top_k: int = 5, channels_last: bool = True) -> None:
        import torch
        from vision.media.imaging import get_preset
        from vision.models import create_model

        # The same intra-op thread count as the service's engine (--threads); one TorchServe worker.
        torch.set_num_threads(threads)
        self._torch = torch
        self.preset = get_preset(preset)
        self.top_k = top_k
        # pretrained=False: the architecture only; its weights come from the harness's state dict, so the
        # peer runs exactly the tensors the service runs (bundled or seeded-random weights alike).
        module = create_model(arch, num_classes=num_classes, pretrained=False)
        module.load_state_dict(torch.load(state_dict, map_location="cpu", weights_only=True), strict=True)
        # channels_last: the same memory format as the service's torch engine (faster oneDNN kernels).
        self._format = torch.channels_last if channels_last else torch.contiguous_format
        self.module = module.eval().to(memory_format=self._format)

    def preprocess(self, images: list[bytes]) -> np.ndarray:
        """Encoded images → float32 (N, 3, crop, crop), through the service's own decode and preprocessing."""
        from vision.media.imaging import load_image

        return np.stack([load_image(data, self.preset) for data in images])

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """One forward pass over the batch: float32 logits (N, classes)."""
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(batch).contiguous(memory_format=self._format)
            return self.module(x).float().numpy()

    def postprocess(self, logits: np.ndarray) -> list[list[dict[str, float]]]:
        return softmax_top_k(logits, self.top_k)

    def __call__(self, images: list[bytes]) -> list[list[dict[str, float]]]:
        return self.postprocess(self.infer(self.preprocess(images)))


def request_bytes(row: dict[str, Any]) -> bytes:
    """The image bytes of one TorchServe request (gRPC `input={"data": ...}` arrives as "data")."""
    payload = row.get("data") if row.get("data") is not None else row.get("body")
    if isinstance(payload, (bytes, bytearray)):
        return bytes(payload)
    raise ValueError(f"expected the encoded image as bytes in 'data', got {type(payload).__name__}")


_model: PeerModel | None = None
# Batches and images seen, logged every LOG_EVERY batches: the harness reads the last line back from
# TorchServe's model log to report the mean batch TorchServe formed (its own metrics do not say).
_counts = [0, 0]
LOG_EVERY = 5
log = logging.getLogger(__name__)


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[str] | None:  # noqa: ANN401 - ts Context
    """TorchServe's entry point: None initialises; otherwise one JSON answer per request of the batch."""
    global _model
    if _model is None:
        model_dir = Path(context.system_properties["model_dir"])
        config = json.loads((model_dir / CONFIG_NAME).read_text())
        add_services_path(config.get("services"))
        _model = PeerModel(config["arch"], config["num_classes"], model_dir / config["state_dict"],
                           threads=config["threads"], preset=config["preset"], top_k=config["top_k"])
        # One warm-up pass at the largest batch, as the service warms its engine before it says SERVING.
        _model.infer(np.zeros((config["batch_size"], 3, _model.preset.crop_size, _model.preset.crop_size), np.float32))
        log.info("vision_peer: torch threads %d", _model._torch.get_num_threads())
    if data is None:
        return None
    _counts[0] += 1
    _counts[1] += len(data)
    if _counts[0] % LOG_EVERY == 0:
        log.info("vision_peer: batches %d images %d", *_counts)
    return [json.dumps(row) for row in _model([request_bytes(r) for r in data])]
