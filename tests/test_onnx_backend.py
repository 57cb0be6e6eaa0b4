"""ONNX export and the ONNX Runtime backend: same answers as torch, cached exports, bad files refused."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import photo
from vision.backends.onnx_backend import OnnxRuntimeBackend
from vision.backends.torch_backend import TorchBackend, run_on_torch_thread
from vision.core.errors import ConfigurationError
from vision.models.export import PARITY_TOLERANCE, export_onnx
from vision.media.imaging import PRESETS, preprocess
from vision.serving.loading import load_model
from vision.models import InputGeometry, create_model, get_architecture, with_outputs
from vision.serving.repository import ModelRepository
from vision.config.settings import ModelConfig, ServeSettings


def signature_of(arch: str, num_classes: int, crop: int = 224):
    sig = get_architecture(arch).signature(num_classes)
    return replace(sig, geometry=InputGeometry(crop_size=crop))


def exported(arch: str, path, num_classes: int = 1000, crop: int = 224, **kwargs):
    """(module with every output, its signature, the verified export)."""
    sig = signature_of(arch, num_classes, crop)

    def build():
        module = with_outputs(arch, create_model(arch, num_classes=num_classes, **kwargs), num_classes)
        return module, export_onnx(module, path, signature=sig)

    module, export = run_on_torch_thread(build)
    return module, sig, export


def real_batch() -> np.ndarray:
    preset = PRESETS["torchvision"]
    return np.stack([preprocess(photo(n), preset) for n in ("coffee.png", "chelsea.png", "rocket.jpg")])


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet50"])
def test_onnxruntime_matches_torch_on_real_photos_for_every_output(arch, tmp_path):
    module, sig, export = exported(arch, tmp_path / "m.onnx", pretrained=arch == "efficientnet_lite0")
    assert export.max_abs_diff <= PARITY_TOLERANCE
    assert export.output_names == sig.outputs and sig.outputs[:2] == ("logits", "embedding")
    batch = real_batch()
    ort = OnnxRuntimeBackend(export.path, threads=2).forward(batch, sig.outputs)
    eager = run_on_torch_thread(TorchBackend(module, output_names=sig.outputs).forward, batch, sig.outputs)
    for name in sig.outputs:
        assert ort[name].shape == (3, *sig.output_shape(name, 224, 224))
        scale = max(1.0, float(np.abs(eager[name]).max()))
        assert np.abs(ort[name] - eager[name]).max() / scale <= 1e-4, name
    if arch == "efficientnet_lite0":
        assert ort["logits"][0].argmax() == 967 and ort["logits"][2].argmax() == 657


def test_variable_geometry_export_takes_any_height_and_width(tmp_path):
    _, sig, export = exported("efficientnet_lite0", tmp_path / "v.onnx")
    backend = OnnxRuntimeBackend(export.path, threads=2)
    for height, width in ((224, 224), (200, 333), (97, 64)):
        x = np.random.default_rng(height).standard_normal((2, 3, height, width)).astype(np.float32)
        out = backend.forward(x, sig.outputs)
        for name in sig.outputs:
            assert sig.check(name, out[name][:1].shape, height, width) is None


def test_a_caller_gets_only_the_outputs_it_asks_for(tmp_path):
    _, sig, export = exported("resnet50", tmp_path / "r.onnx", num_classes=4, crop=64)
    backend = OnnxRuntimeBackend(export.path, threads=2)
    x = np.zeros((1, 3, 64, 64), np.float32)
    assert set(backend.forward(x, ("embedding",))) == {"embedding"}
    assert set(backend.forward(x)) == {"logits"}


def test_dynamic_batch_axis_and_batching(tmp_path):
    _, _, export = exported("resnet50", tmp_path / "r.onnx", num_classes=4, crop=64)
    sizes: list[int] = []
    backend = OnnxRuntimeBackend(export.path, threads=2, on_batch=lambda s: sizes.append(s.size))
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
    settings = ServeSettings(onnx_cache=tmp_path / "cache", models=[ModelConfig(arch="resnet50", weights=weights, num_classes=3)])
    config = ModelConfig(arch="resnet50", weights=weights, labels=str(_labels(tmp_path, 3)))
    load_model(config, settings)
    (cached,) = list((tmp_path / "cache").glob("*.onnx"))
    stamp = cached.stat().st_mtime_ns
    load_model(config, settings)
    assert cached.stat().st_mtime_ns == stamp, "second start re-exported instead of using the cache"


def test_random_weights_are_seeded_and_exported_into_the_cache_only(tmp_path, monkeypatch):
    """Defect 9: an uncached export went to a fresh vision-onnx-* temp folder on every start, never deleted."""
    import tempfile

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    settings = ServeSettings(onnx_cache=tmp_path / "cache")
    config = ModelConfig(arch="resnet50", weights="random", num_classes=3, labels=str(_labels(tmp_path, 3)))
    first = load_model(config, settings)
    load_model(config, settings)
    assert len(list((tmp_path / "cache").glob("*.onnx"))) == 1, "seeded random weights must hit the cache"
    assert list(temp.iterdir()) == [], "nothing may be left in the temp directory"
    assert first.card.random_weights and first.card.weights_sha256 == ""


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
    _, _, export = exported("resnet50", tmp_path / "five.onnx", num_classes=5)
    labels = _labels(tmp_path, 3)
    settings = ServeSettings(onnx_cache=tmp_path / "cache")
    config = ModelConfig(arch="resnet50", labels=str(labels), onnx=export.path, weights="random")
    repository = ModelRepository([load_model(config, settings)])
    with pytest.raises(ConfigurationError, match=r"'logits' has shape \(1, 5\).*\(1, 3\)"):
        asyncio.run(repository.start())
    asyncio.run(repository.close())
