"""INT8 quantization end to end: `vision sample-photos` and `vision quantize` on the real EfficientNet-Lite0
weights, the int8 model served next to its fp32 model through the same gRPC contract, and the registry's
promotion gate accepting a good int8 export and refusing one calibrated on black images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServerProcess, classify_request
from test_registry_helpers import ARCH, exported, spec  # noqa: F401
from vision.config.settings import ModelConfig
from vision.core.errors import ConfigurationError
from vision.evaluation.agreement import agreement
from vision.models.precision import precision_of
from vision.registry.golden import Golden
from vision.registry.store import RegistryStore
from vision.v1 import classification_pb2_grpc, common_pb2

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _vision(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vision.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("int8-sets")
    for split, count in (("calibration", 24), ("held-out", 40)):
        result = _vision("sample-photos", "--split", split, "--count", str(count), "--out", str(root / split))
        assert result.returncode == 0, result.stderr
    return {"calibration": root / "calibration", "held-out": root / "held-out", "root": root}


@pytest.fixture(scope="module")
def quantized(sets, exported) -> dict:  # noqa: F811 - pytest fixture
    """The real weights quantized through the CLI, with its JSON report."""
    out = sets["root"] / "lite0-int8.onnx"
    result = _vision("quantize", "--model", spec("real", exported), "--calibration", str(sets["calibration"]),
                     "--held-out", str(sets["held-out"]), "--out", str(out), "--speed-seconds", "0.3", "--json")
    assert result.returncode == 0, result.stderr
    return {"path": out, "report": json.loads(result.stdout)}


def test_sample_photo_splits_share_no_source_photo_and_are_deterministic(sets, tmp_path):
    sources = {split: {p.stem.split("-", 1)[1] for p in sets[split].iterdir()} for split in ("calibration", "held-out")}
    assert sources["calibration"] and sources["held-out"]
    assert not sources["calibration"] & sources["held-out"]
    assert {"coffee", "chelsea"} <= sources["held-out"]
    again = _vision("sample-photos", "--split", "held-out", "--count", "3", "--out", str(tmp_path))
    assert again.returncode == 0
    for path in sorted(tmp_path.iterdir()):
        assert path.read_bytes() == (sets["held-out"] / path.name).read_bytes()


def test_the_report_is_measured_on_the_held_out_images(quantized):
    report = quantized["report"]
    held = report["held_out"]
    assert held["images"] == 40
    assert 0.5 < held["top1_agreement"] <= 1.0 and 0.5 < held["top5_overlap"] <= 1.0
    # int8 changes the numbers: the divergence is measured, never zero.
    assert held["mean_kl"] > 0
    assert len(held["changed"]) == round((1 - held["top1_agreement"]) * 40)
    assert report["confident"]["images"] <= 40 and report["noise_floor"]["images"] == 40
    assert report["excluded"] == ["/conv_stem/Conv", "/classifier/Gemm"], "stem and classifier stay float by default"
    assert report["forward"]["fp32_img_s"] > 0 and report["forward"]["int8_img_s"] > 0
    assert precision_of(quantized["path"]) == "int8"


def test_agreement_counts_what_it_says():
    reference = np.array([[5.0, 1, 0, 0, 0, 0], [0, 5, 1, 0, 0, 0], [0, 0, 5, 1, 0, 0], [0, 0, 0, 5, 1, 0]])
    same = agreement(reference, reference)
    assert (same.top1_agreement, same.top5_overlap, same.mean_kl, same.changed) == (1.0, 1.0, 0.0, [])
    swapped = reference.copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]  # image 0's top-1 becomes class 1
    swapped[3, 5] = 9.0  # image 3: top-1 becomes class 5, which was outside its top-5
    result = agreement(reference, swapped, ["a", "b", "c", "d"])
    assert result.top1_agreement == 0.5 and result.changed == [("a", 0, 1), ("d", 3, 5)]
    assert result.top5_overlap == pytest.approx((5 + 5 + 5 + 4) / 20)
    assert result.mean_kl > 0


def test_quantized_model_keeps_real_answers(quantized, photos):
    from vision.backends.onnx_backend import open_session
    from vision.media.imaging import PRESETS, load_image

    images = photos
    batch = np.stack([load_image(images[name], PRESETS["torchvision"]) for name in ("coffee.jpg", "chelsea.png")])
    logits = open_session(quantized["path"]).run(["logits"], {"images": batch})[0]
    assert int(logits[0].argmax()) == 967, "espresso"
    assert int(logits[1].argmax()) in CAT_CLASSES


def test_bad_quantize_input_is_refused_clearly(sets, quantized, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _vision("quantize", "--model", ARCH, "--calibration", str(empty), "--out", str(tmp_path / "x.onnx"))
    assert result.returncode == 2 and "no images" in result.stderr
    result = _vision("quantize", "--model", ARCH, "--calibration", str(sets["calibration"]), "--held-out",
                     str(sets["calibration"]), "--out", str(tmp_path / "x.onnx"))
    assert result.returncode == 2 and "shares images" in result.stderr
    result = _vision("quantize", "--model", f"arch={ARCH},onnx={quantized['path']}", "--calibration",
                     str(sets["calibration"]), "--out", str(tmp_path / "x.onnx"))
    assert result.returncode == 2 and "already int8" in result.stderr
    result = _vision("quantize", "--model", ARCH, "--calibration", str(sets["calibration"]), "--exclude", "no_such_node",
                     "--out", str(tmp_path / "x.onnx"))
    assert result.returncode == 2 and "no such node" in result.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_json_report_stays_parseable_with_a_histogram_method(sets, tmp_path):
    """The histogram calibrators print progress; `--json` output must still be one JSON document."""
    out = tmp_path / "p.onnx"
    result = _vision("quantize", "--model", ARCH, "--calibration", str(sets["calibration"]), "--out", str(out),
                     "--method", "percentile", "--speed-seconds", "0", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["method"] == "percentile" and report["held_out"] is None and precision_of(out) == "int8"


def test_torch_backend_refuses_an_int8_file(quantized):
    from vision.config.settings import ServeSettings
    from vision.serving.loading import model_card

    config = ModelConfig.parse_spec(f"arch={ARCH},onnx={quantized['path']},backend=torch")
    with pytest.raises(ConfigurationError, match="int8 ONNX model"):
        model_card(config, ServeSettings(models=[config]))


@pytest.fixture(scope="module")
def both(quantized, exported, tmp_path_factory):  # noqa: F811 - pytest fixture
    server = ServerProcess(
        ["--services", "classification", "--model", spec("real", exported),
         "--model", f"arch={ARCH},name=lite_int8,onnx={quantized['path']}"],
        tmp_path_factory.mktemp("int8-serve") / "serve.log",
    ).wait_ready()
    yield server
    server.stop()


def test_int8_serves_next_to_fp32_through_the_same_contract(both, photos):
    images = photos
    with grpc.insecure_channel(both.address) as channel:
        stub = classification_pb2_grpc.ClassificationStub(channel)
        listed = {m.name: m for m in stub.ListModels(common_pb2.ListModelsRequest(), timeout=30).models}
        assert listed[ARCH].precision == "fp32" and listed["lite_int8"].precision == "int8"
        assert listed["lite_int8"].num_labels == 1000 and listed["lite_int8"].backend == "onnxruntime"
        answers = {}
        for model in (ARCH, "lite_int8"):
            response = stub.Classify(classify_request(images["coffee.jpg"], images["chelsea.png"], model=model), timeout=30)
            assert response.model.name == model
            answers[model] = [r.predictions[0].index for r in response.results]
        assert answers["lite_int8"][0] == answers[ARCH][0] == 967
        assert answers["lite_int8"][1] in CAT_CLASSES and answers[ARCH][1] in CAT_CLASSES
        # A bad image gets the same clear error from the int8 model, which keeps serving.
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(classify_request(b"not an image", model="lite_int8"), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        again = stub.Classify(classify_request(images["coffee.jpg"], model="lite_int8"), timeout=30)
        assert again.results[0].predictions[0].index == 967
    listing = _vision("models", "--target", both.address)
    assert "lite_int8:1" in listing.stdout and "precision=int8" in listing.stdout


def test_registry_gate_accepts_int8_and_refuses_a_bad_calibration(quantized, exported, sets, tmp_path):  # noqa: F811
    store_args = ["registry", "--registry-uri", f"sqlite:///{tmp_path / 'registry.db'}", "--artifact-root", str(tmp_path / "artifacts")]
    assert _vision(*store_args, "register", "lite", "--model", spec("real", exported)).returncode == 0
    # Without a float version to agree with, an int8 model is refused at registration.
    alone = _vision(*store_args, "register", "lite", "--model", f"arch={ARCH},onnx={quantized['path']}")
    assert alone.returncode != 0 and "--expect-like" in alone.stderr
    good = _vision(*store_args, "register", "lite", "--model", f"arch={ARCH},onnx={quantized['path']}", "--expect-like", "1")
    assert good.returncode == 0, good.stderr
    promoted = _vision(*store_args, "promote", "lite", "2", "--alias", "production")
    assert promoted.returncode == 0, promoted.stderr

    # Calibrated on black images with every node quantized: the input's range collapses to one value and
    # the answers go wrong. (With the stem in float the same black calibration is nearly harmless: Lite0's
    # ReLU6 activations have fixed ranges; docs/int8.md.)
    black = tmp_path / "black"
    black.mkdir()
    from PIL import Image

    for i in range(8):
        Image.new("RGB", (300, 300)).save(black / f"{i}.png")
    bad = tmp_path / "bad-int8.onnx"
    made = _vision("quantize", "--model", spec("real", exported), "--calibration", str(black), "--out", str(bad),
                   "--exclude", "", "--speed-seconds", "0")
    assert made.returncode == 0, made.stderr
    registered = _vision(*store_args, "register", "lite", "--model", f"arch={ARCH},onnx={bad}", "--expect-like", "1")
    assert registered.returncode == 0, registered.stderr
    refused = _vision(*store_args, "promote", "lite", "3", "--alias", "production")
    assert refused.returncode == 1 and "top-1 agreement" in refused.stderr and "below the required 99%" in refused.stderr
    store = RegistryStore(f"sqlite:///{tmp_path / 'registry.db'}", str(tmp_path / "artifacts"))
    assert store.resolve("models:/lite@production") == "2", "the alias stays on the good int8 version"
    package = store.download("lite", "2", tmp_path / "v2")
    assert package.card["precision"] == "int8" and Golden.load(package.root).min_top1_agreement == 0.99


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tritonserver binary is Linux-only")
def test_int8_runs_behind_triton_like_in_process(quantized, photos, tmp_path):
    """`vision export-triton` writes the int8 file as it is; Triton's answers equal the in-process int8 engine's."""
    import tritonclient.grpc as triton_grpc
    from vision.backends.onnx_backend import open_session
    from vision.media.imaging import PRESETS, load_image
    from vision.triton import TritonProcess, setup_runtime

    repository = tmp_path / "repository"
    repository.mkdir()
    spec_int8 = f"arch={ARCH},name=lite_int8,onnx={quantized['path']}"
    export = _vision("export-triton", "--model", spec_int8, "--repository", str(repository))
    assert export.returncode == 0, export.stderr
    assert (repository / "lite_int8" / "1" / "model.onnx").read_bytes() == quantized["path"].read_bytes()
    triton = TritonProcess(repository, runtime=setup_runtime(), log_path=tmp_path / "triton.log").start()
    service = None
    try:
        batch = np.stack([load_image(photos[n], PRESETS["torchvision"]) for n in ("coffee.jpg", "chelsea.png")])
        client = triton_grpc.InferenceServerClient(triton.grpc_address)
        tensor = triton_grpc.InferInput("images", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        remote = client.infer("lite_int8", [tensor], outputs=[triton_grpc.InferRequestedOutput("logits")]).as_numpy("logits")
        local = open_session(quantized["path"]).run(["logits"], {"images": batch})[0]
        assert np.abs(remote - local).max() <= 1e-4
        service = ServerProcess(["--services", "classification", "--triton-url", triton.grpc_address,
                                 "--model", f"{spec_int8},backend=triton"], tmp_path / "serve.log").wait_ready()
        with grpc.insecure_channel(service.address) as channel:
            stub = classification_pb2_grpc.ClassificationStub(channel)
            (info,) = stub.ListModels(common_pb2.ListModelsRequest(), timeout=30).models
            assert (info.backend, info.precision) == ("triton", "int8")
            response = stub.Classify(classify_request(photos["coffee.jpg"], model="lite_int8"), timeout=60)
            assert response.results[0].predictions[0].index == 967
    finally:
        if service is not None:
            service.stop()
        triton.stop()
