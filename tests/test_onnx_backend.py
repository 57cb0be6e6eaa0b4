"""ONNX export and the ONNX Runtime backend: same answers as torch, cached exports, bad files refused."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from conftest import photo
from vision.backends.onnx_backend import OnnxRuntimeBackend
from vision.backends.torch_backend import TorchBackend, run_on_torch_thread
from vision.errors import ConfigurationError
from vision.export import PARITY_TOLERANCE, export_onnx
from vision.imaging import PRESETS, preprocess
from vision.models import create_model
from vision.repository import load_model
from vision.settings import ModelConfig, ServeSettings


def real_batch() -> np.ndarray:
    preset = PRESETS["torchvision"]
    return np.stack([preprocess(photo(n), preset) for n in ("coffee.png", "chelsea.png", "rocket.jpg")])


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet50"])
def test_onnxruntime_matches_torch_on_real_photos(arch, tmp_path):
    module = run_on_torch_thread(create_model, arch)
    exported = run_on_torch_thread(lambda: export_onnx(module, tmp_path / "m.onnx", crop_size=224))
    assert exported.max_abs_diff <= PARITY_TOLERANCE
    batch = real_batch()
    ort_logits = OnnxRuntimeBackend(exported.path, threads=2).forward(batch)["logits"]
    torch_logits = run_on_torch_thread(TorchBackend(module).forward, batch)["logits"]
    assert ort_logits.shape == (3, 1000)
    assert np.abs(ort_logits - torch_logits).max() <= 1e-4
    if arch == "efficientnet_lite0":
        assert ort_logits[0].argmax() == 967 and ort_logits[2].argmax() == 657


def test_dynamic_batch_axis_and_batching(tmp_path):
    module = run_on_torch_thread(create_model, "resnet50", num_classes=4)
    exported = run_on_torch_thread(lambda: export_onnx(module, tmp_path / "r.onnx", crop_size=64))
    sizes: list[int] = []
    backend = OnnxRuntimeBackend(exported.path, threads=2, on_batch=lambda s: sizes.append(s.size))
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1 + i % 3, 3, 64, 64)).astype(np.float32) for i in range(12)]

    async def run():
        await backend.start()
        outs = await asyncio.gather(*(backend.infer(x) for x in inputs))
        await backend.close()
        return outs

    outs = asyncio.run(run())
    for x, out in zip(inputs, outs, strict=True):
        np.testing.assert_allclose(out["logits"], backend.forward(x)["logits"], atol=1e-4)
    assert max(sizes) > 3  # requests from different callers shared a forward pass


def test_export_is_cached_by_weights_digest(tmp_path):
    weights = tmp_path / "w.pt"
    torch.save(create_model("resnet50", num_classes=3).state_dict(), weights)
    settings = ServeSettings(onnx_cache=tmp_path / "cache", models=[ModelConfig(arch="resnet50", weights=weights, num_classes=3, labels=None)])
    config = ModelConfig(arch="resnet50", weights=weights, labels=str(_labels(tmp_path, 3)))
    run_on_torch_thread(load_model, config, settings)
    (cached,) = list((tmp_path / "cache").glob("*.onnx"))
    stamp = cached.stat().st_mtime_ns
    run_on_torch_thread(load_model, config, settings)
    assert cached.stat().st_mtime_ns == stamp, "second start re-exported instead of using the cache"


def _labels(tmp_path, n: int):
    path = tmp_path / "labels.txt"
    path.write_text("".join(f"{i}\tlabel {i}\n" for i in range(n)))
    return path


def test_corrupt_onnx_file_is_refused(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(ConfigurationError, match="ONNX Runtime cannot load"):
        OnnxRuntimeBackend(bad)


def test_onnx_file_that_does_not_fit_the_labels_is_a_startup_error(tmp_path):
    module = run_on_torch_thread(create_model, "resnet50", num_classes=5)
    onnx = run_on_torch_thread(lambda: export_onnx(module, tmp_path / "five.onnx", crop_size=224)).path
    labels = _labels(tmp_path, 3)
    settings = ServeSettings(onnx_cache=tmp_path / "cache")
    config = ModelConfig(arch="resnet50", labels=str(labels), onnx=onnx)
    with pytest.raises(ConfigurationError, match=r"shape \(1, 5\).*\(1, 3\)"):
        run_on_torch_thread(load_model, config, settings)
