"""A real Triton Inference Server (nvidia-pytriton's tritonserver 2.51) serving our ONNX models on the CPU.

The session fixture sets the Triton venv up (idempotent: about 20 s the first time on a fresh machine, from
the package registry alone) and starts tritonserver on 127.0.0.1 against a repository written by
vision.triton.repository, holding a tiny conv net exported to ONNX here (two outputs: logits, features).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aiogrpcclient
from conftest import metric_value, scrape
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException
from vision.triton.repository import PYTHON_MODEL, TensorSpec, render_config, write_model
from vision.triton.runtime import (
    TritonModelLoadError,
    TritonProcess,
    TritonRuntime,
    TritonRuntimeMissing,
    TritonSetupError,
    TritonStartError,
    find_runtime,
    setup_runtime,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="nvidia-pytriton's tritonserver is Linux-only"
)

INPUTS = [TensorSpec("images", "TYPE_FP32", (3, 32, 32))]
OUTPUTS = [TensorSpec("logits", "TYPE_FP32", (5,)), TensorSpec("features", "TYPE_FP32", (8,))]
BATCHING: dict[str, Any] = {
    "max_batch_size": 8,
    "preferred_batch_sizes": [4, 8],
    "max_queue_delay_us": 10_000,
    "instances": 1,
}
# pip's words when the registry cannot be reached or lacks the package: the only reasons to skip.
OFFLINE_MARKERS = (
    "No matching distribution",
    "Could not find a version",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
)


def export_tiny(path: Path, seed: int = 0) -> Path:
    """conv -> relu -> global average pool ("features", 8) -> linear ("logits", 5); dynamic batch, opset 17."""
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = torch.relu(self.conv(x)).mean(dim=(2, 3))
            return self.fc(features), features

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", DeprecationWarning
        )  # the TorchScript exporter's notice; see vision/export.py
        torch.onnx.export(
            Tiny().eval(),
            (torch.randn(2, 3, 32, 32),),
            str(path),
            input_names=["images"],
            output_names=["logits", "features"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return path


@pytest.fixture(scope="session")
def triton_runtime() -> TritonRuntime:
    try:
        return setup_runtime()
    except TritonSetupError as exc:
        if any(marker in str(exc) for marker in OFFLINE_MARKERS):
            pytest.skip(f"the Triton runtime cannot be set up from this machine's package registry: {exc}")
        raise


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="session")
def reference(tiny_onnx: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def triton(
    triton_runtime: TritonRuntime, tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonProcess]:
    repo = tmp_path_factory.mktemp("triton") / "repository"
    write_model(repo, "tiny", 1, tiny_onnx, inputs=INPUTS, outputs=OUTPUTS, flavour="cpu-python",
                intra_op_threads=1, **BATCHING)  # fmt: skip
    # Same graph, variable spatial dims in the config: the graph's static 32x32 is enforced per request.
    write_model(repo, "tiny_flex", 1, tiny_onnx, inputs=[TensorSpec("images", "TYPE_FP32", (3, -1, -1))],
                outputs=OUTPUTS, flavour="cpu-python", intra_op_threads=1, **BATCHING)  # fmt: skip
    server = TritonProcess(repo, runtime=triton_runtime, log_path=repo.parent / "tritonserver.log")
    server.start(timeout=120)
    yield server
    assert server.stop() == 0, server.log_text()[-3000:]
    assert server.proc is not None and server.proc.poll() is not None


def images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def infer_input(x: np.ndarray, module: types.ModuleType = grpcclient) -> object:
    tensor = module.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def requested(module: types.ModuleType = grpcclient) -> list[object]:
    return [module.InferRequestedOutput("logits"), module.InferRequestedOutput("features")]


# ---------------------------------------------------------------------------------------------- the server


def test_model_is_ready_with_the_written_config(triton: TritonProcess) -> None:
    assert triton.server_metadata()["version"] == "2.51.0"
    assert triton.is_model_ready("tiny") and triton.is_model_ready("tiny", 1)
    index = {m["name"]: m for m in triton.repository_index()}
    assert index["tiny"]["state"] == "READY" and index["tiny_flex"]["state"] == "READY"

    config = triton.model_config("tiny")
    assert config["backend"] == "python" and config["max_batch_size"] == 8
    assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config["input"]] == [
        ("images", "TYPE_FP32", [3, 32, 32])
    ]
    assert [(t["name"], [int(d) for d in t["dims"]]) for t in config["output"]] == [
        ("logits", [5]),
        ("features", [8]),
    ]
    assert [int(b) for b in config["dynamic_batching"]["preferred_batch_size"]] == [4, 8]
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == 10_000
    assert config["instance_group"][0]["kind"] == "KIND_CPU" and config["instance_group"][0]["count"] == 1

    with grpcclient.InferenceServerClient(triton.grpc_address) as client:
        meta = client.get_model_metadata("tiny", as_json=True)
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": ["-1", "3", "32", "32"]}]


def test_grpc_inference_matches_in_process_onnxruntime(
    triton: TritonProcess, reference: ort.InferenceSession
) -> None:
    with grpcclient.InferenceServerClient(triton.grpc_address) as client:
        for x in (images(1, seed=1), images(3, seed=2)):
            result = client.infer("tiny", [infer_input(x)], outputs=requested())
            logits, features = reference.run(["logits", "features"], {"images": x})
            assert result.as_numpy("logits").shape == (len(x), 5)
            assert np.abs(result.as_numpy("logits") - logits).max() < 1e-5
            assert np.abs(result.as_numpy("features") - features).max() < 1e-5


async def test_concurrent_requests_are_batched_by_triton(
    triton: TritonProcess, reference: ort.InferenceSession
) -> None:
    """16 concurrent single-image requests over the asyncio gRPC client run in fewer forward passes."""
    before = triton.model_stats("tiny")
    x = images(16, seed=3)
    async with aiogrpcclient.InferenceServerClient(triton.grpc_address) as client:
        results = await asyncio.gather(
            *(client.infer("tiny", [infer_input(x[i : i + 1], aiogrpcclient)], outputs=requested(aiogrpcclient))
              for i in range(16))
        )  # fmt: skip
    logits = reference.run(["logits"], {"images": x})[0]
    for i, result in enumerate(results):  # each answer is its own image's, not a neighbour's
        assert np.abs(result.as_numpy("logits")[0] - logits[i]).max() < 1e-5
    # Triton records statistics after the responses are sent, so the counters can trail the answers briefly.
    deadline = time.monotonic() + 10
    while True:
        after = triton.model_stats("tiny")
        inferences = int(after["inference_count"]) - int(before["inference_count"])
        executions = int(after["execution_count"]) - int(before["execution_count"])
        if inferences >= 16 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert inferences == 16
    assert executions < inferences, after["batch_stats"]


def test_a_malformed_request_fails_alone(triton: TritonProcess, reference: ort.InferenceSession) -> None:
    """tiny_flex accepts [3, -1, -1] at Triton's door; model.py rejects 16x16 for that request only."""
    from concurrent.futures import ThreadPoolExecutor

    good, bad = images(6, seed=4), images(2, seed=5, size=16)

    def call(x: np.ndarray) -> object:
        with grpcclient.InferenceServerClient(triton.grpc_address) as client:
            try:
                return client.infer("tiny_flex", [infer_input(x)], outputs=requested())
            except InferenceServerException as exc:
                return exc

    order = [
        ("good", 0),
        ("bad", 0),
        ("good", 1),
        ("good", 2),
        ("bad", 1),
        ("good", 3),
        ("good", 4),
        ("good", 5),
    ]
    with ThreadPoolExecutor(len(order)) as pool:
        outcomes = list(pool.map(call, [(good if kind == "good" else bad)[i : i + 1] for kind, i in order]))
    logits = reference.run(["logits"], {"images": good})[0]
    for (kind, i), outcome in zip(order, outcomes):
        if kind == "good":
            assert not isinstance(outcome, Exception), outcome
            assert np.abs(outcome.as_numpy("logits")[0] - logits[i]).max() < 1e-5  # type: ignore[attr-defined]
        else:
            assert isinstance(outcome, InferenceServerException)
            assert outcome.status() == "StatusCode.INVALID_ARGUMENT"
            assert "[1, 3, 16, 16]" in outcome.message() and "[?, 3, 32, 32]" in outcome.message()


def test_a_config_that_contradicts_the_graph_is_refused_with_the_reason(
    triton: TritonProcess, tiny_onnx: Path
) -> None:
    repo = triton.repository
    write_model(repo, "tiny_broken", 1, tiny_onnx, inputs=[TensorSpec("images", "TYPE_FP32", (3, 64, 64))],
                outputs=OUTPUTS, flavour="cpu-python", validate=False, **BATCHING)  # fmt: skip
    with pytest.raises(TritonModelLoadError) as info:
        triton.load_model("tiny_broken")
    assert "config.pbtxt does not match" in info.value.reason
    assert (
        "input 'images' has dims [3, 64, 64] in the config but [3, 32, 32] in the graph" in info.value.reason
    )
    entry = next(m for m in triton.repository_index() if m["name"] == "tiny_broken")
    assert entry["state"] == "UNAVAILABLE" and "[3, 64, 64]" in entry["reason"]
    assert not triton.is_model_ready("tiny_broken")
    assert triton.is_model_ready("tiny")  # the others are untouched


def test_startup_fails_with_tritons_reason_when_a_model_cannot_load(
    triton_runtime: TritonRuntime, tiny_onnx: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repository"
    write_model(repo, "wrong_output", 1, tiny_onnx, inputs=INPUTS, outputs=[TensorSpec("logits", "TYPE_FP32", (7,))],
                flavour="cpu-python", validate=False, **BATCHING)  # fmt: skip
    server = TritonProcess(repo, runtime=triton_runtime, log_path=tmp_path / "tritonserver.log")
    with pytest.raises(TritonStartError) as info:
        server.start(timeout=60)
    message = str(info.value)
    assert "wrong_output" in message
    assert "output 'logits' has dims [7] in the config but [5] in the graph" in message
    assert server.proc is not None and server.proc.poll() is not None


def test_a_new_version_is_published_and_loaded_without_restart(
    triton: TritonProcess, tiny_onnx: Path, tmp_path: Path
) -> None:
    repo = triton.repository
    write_model(
        repo, "tiny_pub", 1, tiny_onnx, inputs=INPUTS, outputs=OUTPUTS, flavour="cpu-python", **BATCHING
    )
    triton.load_model("tiny_pub")
    v2 = export_tiny(tmp_path / "tiny_v2.onnx", seed=1)
    write_model(repo, "tiny_pub", 2, v2, inputs=INPUTS, outputs=OUTPUTS, flavour="cpu-python", **BATCHING)
    triton.load_model("tiny_pub")  # default version policy: the latest version is served
    assert triton.is_model_ready("tiny_pub", 2) and not triton.is_model_ready("tiny_pub", 1)
    x = images(2, seed=6)
    expected = ort.InferenceSession(str(v2), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"images": x}
    )[0]
    with grpcclient.InferenceServerClient(triton.grpc_address) as client:
        result = client.infer("tiny_pub", [infer_input(x)], outputs=requested())
    assert np.abs(result.as_numpy("logits") - expected).max() < 1e-5
    assert result.get_response().model_version == "2"
    triton.unload_model("tiny_pub")


def test_prometheus_metrics_port_serves_inference_counters(triton: TritonProcess) -> None:
    with grpcclient.InferenceServerClient(triton.grpc_address) as client:
        client.infer("tiny", [infer_input(images(1))], outputs=requested())
    assert triton.metrics_url.startswith("http://127.0.0.1:")
    text = scrape(triton.metrics_url)
    assert metric_value(text, "nv_inference_request_success", model="tiny", version="1") >= 1
    assert metric_value(text, "nv_inference_exec_count", model="tiny", version="1") >= 1


# ------------------------------------------------------------------------------------- without the server


def test_missing_runtime_says_how_to_set_it_up(tmp_path: Path) -> None:
    with pytest.raises(TritonRuntimeMissing) as info:
        find_runtime(tmp_path / "no-venv")
    assert "-m vision.triton --setup-only --venv" in str(info.value)


def test_configs_are_valid_model_config_text(tmp_path: Path) -> None:
    cpu = render_config(
        "m", inputs=INPUTS, outputs=OUTPUTS, flavour="cpu-python", intra_op_threads=2, **BATCHING
    )
    parsed = text_format.Parse(cpu, model_config_pb2.ModelConfig())
    assert parsed.backend == "python" and parsed.max_batch_size == 8
    assert (
        list(parsed.input[0].dims) == [3, 32, 32] and parsed.input[0].data_type == model_config_pb2.TYPE_FP32
    )
    assert list(parsed.dynamic_batching.preferred_batch_size) == [4, 8]
    assert parsed.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert parsed.parameters["intra_op_thread_count"].string_value == "2"

    gpu = render_config("m", inputs=INPUTS, outputs=OUTPUTS, flavour="gpu-onnxruntime", tensorrt=True,
                        tensorrt_cache_dir="/cache/trt", gpus=[0], **{**BATCHING, "instances": 2})  # fmt: skip
    parsed = text_format.Parse(gpu, model_config_pb2.ModelConfig())
    assert parsed.backend == "onnxruntime"
    assert parsed.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert parsed.instance_group[0].count == 2 and list(parsed.instance_group[0].gpus) == [0]
    (trt,) = parsed.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
    assert trt.parameters["trt_engine_cache_path"] == "/cache/trt"

    with pytest.raises(ValueError, match="gpu-onnxruntime"):
        render_config("m", inputs=INPUTS, outputs=OUTPUTS, flavour="cpu-python", tensorrt=True, **BATCHING)
    with pytest.raises(ValueError, match="preferred_batch_sizes"):
        render_config("m", inputs=INPUTS, outputs=OUTPUTS, flavour="cpu-python", max_batch_size=4,
                      preferred_batch_sizes=[8])  # fmt: skip


def test_repository_writes_are_whole_and_versions_immutable(tiny_onnx: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repository"
    kwargs: dict[str, Any] = {"inputs": INPUTS, "outputs": OUTPUTS, "flavour": "cpu-python", **BATCHING}
    model_dir = write_model(repo, "m", 1, tiny_onnx, **kwargs)
    assert model_dir == repo / "m"
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")) == [
        "m", "m/1", "m/1/model.onnx", "m/1/model.py", "m/config.pbtxt"
    ]  # fmt: skip
    assert (repo / "m/1/model.py").read_bytes() == PYTHON_MODEL.read_bytes()
    write_model(repo, "m", 2, tiny_onnx, **kwargs)
    assert (repo / "m/2/model.onnx").read_bytes() == tiny_onnx.read_bytes()
    assert "version 2 = tiny.onnx" in (repo / "m/config.pbtxt").read_text()
    with pytest.raises(FileExistsError):
        write_model(repo, "m", 2, tiny_onnx, **kwargs)
    write_model(repo, "m", 2, tiny_onnx, overwrite=True, **kwargs)
    gpu = write_model(repo, "g", 1, tiny_onnx, **{**kwargs, "flavour": "gpu-onnxruntime"})
    assert sorted(p.name for p in (gpu / "1").iterdir()) == ["model.onnx"]
    # Nothing but models at the repository root; the staging area beside it is left empty.
    assert sorted(p.name for p in repo.iterdir()) == ["g", "m"]
    assert list((tmp_path / ".repository.staging").iterdir()) == []
    # A spec that contradicts the graph is caught before anything is written.
    with pytest.raises(ValueError, match=r"axis 1 is 4 in the config, 3 in the graph"):
        write_model(
            repo,
            "bad",
            1,
            tiny_onnx,
            **{**kwargs, "inputs": [TensorSpec("images", "TYPE_FP32", (4, 32, 32))]},
        )
    assert not (repo / "bad").exists()
    with pytest.raises(ValueError, match="outside the repository"):
        write_model(repo, "m", 3, tiny_onnx, staging_dir=repo / ".staging", **kwargs)


# ------------------------------------------------- model.py in-process, with a stand-in for pb_utils


class _FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _FakeError:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message: str, code: str | None = None) -> None:
        self.message, self.code = message, code


class _FakeResponse:
    def __init__(
        self, output_tensors: list[_FakeTensor] | None = None, error: _FakeError | None = None
    ) -> None:
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors or []}
        self.error = error


class _FakeRequest:
    def __init__(self, **inputs: np.ndarray) -> None:
        self.inputs = {k: _FakeTensor(k, v) for k, v in inputs.items()}


@pytest.fixture
def python_model(monkeypatch: pytest.MonkeyPatch, tiny_onnx: Path, tmp_path: Path) -> Any:
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor = _FakeTensor  # type: ignore[attr-defined]
    fake.TritonError = _FakeError  # type: ignore[attr-defined]
    fake.InferenceResponse = _FakeResponse  # type: ignore[attr-defined]
    fake.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)  # type: ignore[attr-defined]
    fake.triton_string_to_numpy = lambda t: {"TYPE_FP32": np.float32}[t]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    repo = tmp_path / "repository"
    write_model(repo, "tiny_flex", 1, tiny_onnx, inputs=[TensorSpec("images", "TYPE_FP32", (3, -1, -1))],
                outputs=OUTPUTS, flavour="cpu-python", intra_op_threads=1, **BATCHING)  # fmt: skip
    spec = importlib.util.spec_from_file_location("triton_model_under_test", repo / "tiny_flex/1/model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = text_format.Parse((repo / "tiny_flex/config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    from google.protobuf.json_format import MessageToDict

    config_json = MessageToDict(config, preserving_proto_field_name=True)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config_json), "model_repository": str(repo / "tiny_flex"),
                      "model_version": "1", "model_name": "tiny_flex"})  # fmt: skip
    return model


def test_python_model_concatenates_requests_and_isolates_bad_ones(
    python_model: Any, reference: ort.InferenceSession
) -> None:
    model = python_model
    x = images(5, seed=7)
    requests = [
        _FakeRequest(images=x[0:2]),
        _FakeRequest(images=images(1, size=16)),  # wrong spatial size for the graph
        _FakeRequest(images=x[2:3]),
        _FakeRequest(images=x[3:5].astype(np.float64)),  # wrong dtype
        _FakeRequest(),  # missing input
    ]
    responses = model.execute(requests)
    assert len(responses) == len(requests)
    assert model.executions == 1  # the two good requests ran as one batch of 3
    logits, features = reference.run(["logits", "features"], {"images": x[:3]})
    assert responses[0].error is None and responses[2].error is None
    assert np.abs(responses[0].outputs["logits"] - logits[0:2]).max() < 1e-5
    assert np.abs(responses[2].outputs["features"] - features[2:3]).max() < 1e-5
    for bad, needle in ((1, "[1, 3, 16, 16]"), (3, "float64"), (4, "missing")):
        assert responses[bad].error is not None and responses[bad].error.code == "INVALID_ARG"
        assert needle in responses[bad].error.message


def test_python_model_reruns_a_failed_batch_request_by_request(python_model: Any) -> None:
    model = python_model
    session = model.session
    real_run = session.run

    class Poisoned:
        def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            if np.isnan(feeds["images"]).any():
                raise RuntimeError("poisoned input")
            return real_run(names, feeds)

    model.session = Poisoned()
    poisoned = images(1)
    poisoned[0, 0, 0, 0] = np.nan
    responses = model.execute([_FakeRequest(images=images(1, seed=8)), _FakeRequest(images=poisoned),
                               _FakeRequest(images=images(2, seed=9))])  # fmt: skip
    assert [r.error is None for r in responses] == [True, False, True]
    assert "poisoned input" in responses[1].error.message and responses[1].error.code == "INTERNAL"
    assert responses[2].outputs["logits"].shape == (2, 5)


def test_setup_is_idempotent_and_fast_the_second_time(triton_runtime: TritonRuntime) -> None:
    t0 = time.monotonic()
    again = setup_runtime(triton_runtime.venv)
    assert again == triton_runtime and time.monotonic() - t0 < 5
