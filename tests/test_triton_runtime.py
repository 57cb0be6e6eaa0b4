"""A real Triton Inference Server (nvidia-pytriton's tritonserver 2.51) serving our ONNX models on the CPU.

The module fixture sets the Triton venv up (idempotent: about 20 s the first time on a fresh machine, from
the package registry alone) and starts ONE tritonserver on 127.0.0.1 against a repository written by
vision.triton.repository; every test that needs a server adds its models to that repository and loads them
(explicit model control). The models: a tiny conv net exported here (outputs logits, embedding and a
feature map "conv", like a registry model's signature) and, for the parity tests, EfficientNet-Lite0 with a
10-class head and seeded random weights, exported by vision.triton.export.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
import threading
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
from conftest import ROOT, metric_value, scrape
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException
from vision.backends.triton_backend import TritonBackend
from vision.core.errors import ConfigurationError, FailedPrecondition, ResourceExhausted, Unavailable, VisionError
from vision.models.signature import FeatureLayer, InputGeometry, Signature
from vision.triton.admin import TritonAdmin
from vision.triton.errors import TritonAdminError, TritonModelLoadError, TritonStartError
from vision.triton.process import TritonProcess
from vision.triton.repository import (
    PYTHON_MODEL,
    TensorSpec,
    add_version,
    read_config,
    render_config,
    retire_version,
    served_versions,
    write_model,
)
from vision.triton.runtime import TritonRuntime, TritonRuntimeMissing, TritonSetupError, find_runtime, setup_runtime

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="nvidia-pytriton's tritonserver is Linux-only"
)

SIGNATURE = Signature(
    num_classes=5,
    embedding_dim=8,
    layers=(FeatureLayer("conv", 8, 1),),
    geometry=InputGeometry(crop_size=32, variable=False),
)
NAMES = list(SIGNATURE.outputs)  # logits, embedding, conv
INPUTS = [TensorSpec("images", "TYPE_FP32", (3, 32, 32))]
OUTPUTS = [
    TensorSpec("logits", "TYPE_FP32", (5,)),
    TensorSpec("embedding", "TYPE_FP32", (8,)),
    TensorSpec("conv", "TYPE_FP32", (8, 32, 32)),
]
BATCHING: dict[str, Any] = {
    "max_batch_size": 8,
    "preferred_batch_sizes": [4, 8],
    "max_queue_delay_us": 10_000,
    "instances": 1,
}
TINY: dict[str, Any] = {"inputs": INPUTS, "outputs": OUTPUTS, "flavour": "cpu-python", "intra_op_threads": 1, **BATCHING}
# pip's words when the registry cannot be reached or lacks the package: the only reasons to skip.
OFFLINE_MARKERS = (
    "No matching distribution",
    "Could not find a version",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
)


def export_tiny(path: Path, seed: int = 0, num_classes: int = 5) -> Path:
    """conv ("conv", 8 x H x W) -> relu -> global average pool ("embedding", 8) -> linear ("logits");
    dynamic batch, opset 17. Different seeds give different weights, hence distinguishable versions."""
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            conv = self.conv(x)
            embedding = torch.relu(conv).mean(dim=(2, 3))
            return self.fc(embedding), embedding, conv

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # The TorchScript exporter's deprecation notice; see vision/models/export.py for why it is used.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            Tiny().eval(),
            (torch.randn(2, 3, 32, 32),),
            str(path),
            input_names=["images"],
            output_names=NAMES,
            dynamic_axes={name: {0: "batch"} for name in ["images", *NAMES]},
            opset_version=17,
            dynamo=False,
        )
    return path


@pytest.fixture(scope="module")
def triton_runtime() -> TritonRuntime:
    try:
        return setup_runtime()
    except TritonSetupError as exc:
        if any(marker in str(exc) for marker in OFFLINE_MARKERS):
            pytest.skip(f"the Triton runtime cannot be set up from this machine's package registry: {exc}")
        raise


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def tiny_onnx(onnx_dir: Path) -> Path:
    return export_tiny(onnx_dir / "tiny.onnx")


@pytest.fixture(scope="module")
def tiny_v2_onnx(onnx_dir: Path) -> Path:
    return export_tiny(onnx_dir / "tiny_v2.onnx", seed=1)


@pytest.fixture(scope="module")
def reference(tiny_onnx: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def triton(
    triton_runtime: TritonRuntime, tiny_onnx: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonProcess]:
    repo = tmp_path_factory.mktemp("triton") / "repository"
    write_model(repo, "tiny", 1, tiny_onnx, **TINY)
    # Same graph, variable spatial dims in the config: the graph's static 32x32 is enforced per request.
    write_model(repo, "tiny_flex", 1, tiny_onnx, **{**TINY, "inputs": [TensorSpec("images", "TYPE_FP32", (3, -1, -1))]})
    server = TritonProcess(repo, runtime=triton_runtime, log_path=repo.parent / "tritonserver.log")
    server.start(timeout=120)
    yield server
    assert server.stop() == 0, server.log_text()[-3000:]
    assert server.proc is not None and server.proc.poll() is not None


def images(n: int, seed: int = 0, size: int = 32, width: int | None = None) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, width or size)).astype(np.float32)


def infer_input(x: np.ndarray, module: types.ModuleType = grpcclient) -> object:
    tensor = module.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def requested(module: types.ModuleType = grpcclient, names: tuple[str, ...] = ("logits", "embedding")) -> list[object]:
    return [module.InferRequestedOutput(name) for name in names]


def run(onnx_path: Path, x: np.ndarray, names: list[str] | None = None) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = names or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"images": x})))


def wait_until(condition: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met after {timeout} s"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- the server


def test_model_is_ready_with_the_written_config(triton: TritonProcess) -> None:
    admin = triton.admin
    assert admin.server_metadata()["version"] == "2.51.0"
    assert admin.is_model_ready("tiny") and admin.is_model_ready("tiny", 1)
    index = {m["name"]: m for m in admin.repository_index()}
    assert index["tiny"]["state"] == "READY" and index["tiny_flex"]["state"] == "READY"

    config = admin.model_config("tiny")
    assert config["backend"] == "python" and config["max_batch_size"] == 8
    assert config["version_policy"] == {"specific": {"versions": [1]}}
    assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config["input"]] == [
        ("images", "TYPE_FP32", [3, 32, 32])
    ]
    assert [(t["name"], [int(d) for d in t["dims"]]) for t in config["output"]] == [
        ("logits", [5]),
        ("embedding", [8]),
        ("conv", [8, 32, 32]),
    ]
    assert [int(b) for b in config["dynamic_batching"]["preferred_batch_size"]] == [4, 8]
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == 10_000
    assert config["instance_group"][0]["kind"] == "KIND_CPU" and config["instance_group"][0]["count"] == 1
    assert admin.model_metadata("tiny")["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]


def test_admin_errors_carry_tritons_status_and_reason(triton: TritonProcess, tmp_path: Path) -> None:
    with pytest.raises(TritonModelLoadError) as info:
        triton.admin.load_model("no_such_model")
    # Triton 2.51 answers a load it cannot do with HTTP 500, an unknown model's config with 404.
    assert info.value.status == "500" and "failed to load 'no_such_model'" in info.value.reason
    with pytest.raises(TritonAdminError) as config_info:
        triton.admin.model_config("no_such_model")
    assert config_info.value.status == "404" and "'no_such_model' is not found" in config_info.value.detail
    nobody = TritonAdmin("127.0.0.1:9", timeout_s=1)  # discard port: nothing listens
    assert not nobody.server_ready() and not nobody.is_model_ready("tiny")
    with pytest.raises(TritonAdminError) as down:
        nobody.server_metadata()
    assert down.value.status == ""


def test_grpc_inference_matches_in_process_onnxruntime(
    triton: TritonProcess, reference: ort.InferenceSession
) -> None:
    with grpcclient.InferenceServerClient(triton.grpc_address) as client:
        for x in (images(1, seed=1), images(3, seed=2)):
            result = client.infer("tiny", [infer_input(x)], outputs=requested(names=tuple(NAMES)))
            expected = reference.run(NAMES, {"images": x})
            assert result.as_numpy("logits").shape == (len(x), 5)
            for name, want in zip(NAMES, expected):
                assert np.abs(result.as_numpy(name) - want).max() < 1e-5, name


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
        inferences = int(after["inference_count"]) - int(before.get("inference_count", 0))
        executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
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

    order = [("good", 0), ("bad", 0), ("good", 1), ("good", 2), ("bad", 1), ("good", 3), ("good", 4), ("good", 5)]
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
    write_model(repo, "tiny_broken", 1, tiny_onnx, validate=False,
                **{**TINY, "inputs": [TensorSpec("images", "TYPE_FP32", (3, 64, 64))]})  # fmt: skip
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
    write_model(repo, "wrong_output", 1, tiny_onnx, validate=False,
                **{**TINY, "outputs": [TensorSpec("logits", "TYPE_FP32", (7,))]})  # fmt: skip
    server = TritonProcess(repo, runtime=triton_runtime, log_path=tmp_path / "tritonserver.log")
    with pytest.raises(TritonStartError) as info:
        server.start(timeout=60)
    message = str(info.value)
    assert "wrong_output" in message
    assert "output 'logits' has dims [7] in the config but [5] in the graph" in message
    assert server.proc is not None and server.proc.poll() is not None


def test_prometheus_metrics_port_serves_inference_counters(triton: TritonProcess) -> None:
    with grpcclient.InferenceServerClient(triton.grpc_address) as client:
        client.infer("tiny", [infer_input(images(1))], outputs=requested())
    assert triton.metrics_url.startswith("http://127.0.0.1:")
    text = scrape(triton.metrics_url)
    assert metric_value(text, "nv_inference_request_success", model="tiny", version="1") >= 1
    assert metric_value(text, "nv_inference_exec_count", model="tiny", version="1") >= 1


# ------------------------------------------------------------------------------------ version lifecycle


class _Traffic:
    """Requests to one version in a loop on a thread, each answer checked against that version's graph."""

    def __init__(self, address: str, model: str, version: int, onnx_path: Path) -> None:
        self.x = images(1, seed=version)
        self.expected = run(onnx_path, self.x, ["logits"])["logits"]
        self.address, self.model, self.version = address, model, version
        self.answers = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with grpcclient.InferenceServerClient(self.address) as client:
            while not self._stop.is_set():
                try:
                    result = client.infer(self.model, [infer_input(self.x)], model_version=str(self.version),
                                          outputs=requested(names=("logits",)))  # fmt: skip
                except InferenceServerException as exc:
                    self.failures.append(f"{exc.status()}: {exc.message()}")
                    continue
                if np.abs(result.as_numpy("logits") - self.expected).max() > 1e-5:
                    self.failures.append("an answer that is not this version's")
                self.answers += 1
                time.sleep(0.005)

    def __enter__(self) -> _Traffic:
        self._thread.start()
        wait_until(lambda: self.answers > 0 or self.failures, what="a first answer")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_publishing_a_version_keeps_the_one_in_use_serving_until_it_is_retired(
    triton: TritonProcess, tiny_onnx: Path, tiny_v2_onnx: Path
) -> None:
    repo, admin = triton.repository, triton.admin
    write_model(repo, "tiny_pub", 1, tiny_onnx, **TINY)
    admin.load_model("tiny_pub")
    with _Traffic(triton.grpc_address, "tiny_pub", 1, tiny_onnx) as v1:
        # Triton's default policy would serve only version 2 after this load and unload version 1 under
        # the traffic; the explicit policy keeps both.
        add_version(repo, "tiny_pub", 2, tiny_v2_onnx, admin=admin)
        assert admin.is_model_ready("tiny_pub", 1) and admin.is_model_ready("tiny_pub", 2)
        answered_before = v1.answers
        wait_until(lambda: v1.answers > answered_before + 5, what="version 1 answering after the publish")
    assert v1.failures == [], v1.failures[:3]
    assert served_versions(repo / "tiny_pub") == [1, 2]
    assert read_config(repo / "tiny_pub").version_policy.specific.versions == [1, 2]

    with _Traffic(triton.grpc_address, "tiny_pub", 2, tiny_v2_onnx) as v2:
        retire_version(repo, "tiny_pub", 1, admin=admin)
        assert not admin.is_model_ready("tiny_pub", 1) and admin.is_model_ready("tiny_pub", 2)
        answered_before = v2.answers
        wait_until(lambda: v2.answers > answered_before + 5, what="version 2 answering after the retirement")
    assert v2.failures == [], v2.failures[:3]
    assert not (repo / "tiny_pub" / "1").exists() and (repo / "tiny_pub" / "2" / "model.onnx").is_file()
    assert served_versions(repo / "tiny_pub") == [2]
    with grpcclient.InferenceServerClient(triton.grpc_address) as client:
        with pytest.raises(InferenceServerException) as gone:
            client.infer("tiny_pub", [infer_input(images(1))], model_version="1", outputs=requested())
        result = client.infer("tiny_pub", [infer_input(images(1))], outputs=requested())  # no version: v2
    assert gone.value.status() == "StatusCode.UNAVAILABLE"  # Triton's word for "not at ready state"
    assert result.get_response().model_version == "2"
    # Idempotent, and the last version is never retired by accident.
    retire_version(repo, "tiny_pub", 1, admin=admin)
    with pytest.raises(ValueError, match="only version"):
        retire_version(repo, "tiny_pub", 2, admin=admin)
    # Nothing but models at the repository root; the staging area beside it is left empty.
    assert not list(repo.glob(".*")) and list((repo.parent / f".{repo.name}.staging").iterdir()) == []
    admin.unload_model("tiny_pub")


def test_a_version_triton_refuses_is_rolled_back_and_the_served_one_stays(
    triton: TritonProcess, tiny_onnx: Path, onnx_dir: Path
) -> None:
    repo, admin = triton.repository, triton.admin
    write_model(repo, "tiny_rb", 1, tiny_onnx, **TINY)
    admin.load_model("tiny_rb")
    seven = export_tiny(onnx_dir / "tiny_7.onnx", num_classes=7)  # contradicts the config's logits (5,)
    with _Traffic(triton.grpc_address, "tiny_rb", 1, tiny_onnx) as v1:
        with pytest.raises(TritonModelLoadError) as info:
            add_version(repo, "tiny_rb", 2, seven, admin=admin, validate=False)
    assert "output 'logits' has dims [5] in the config but [7] in the graph" in info.value.reason
    assert v1.failures == [], v1.failures[:3]
    assert admin.is_model_ready("tiny_rb", 1) and not admin.is_model_ready("tiny_rb", 2)
    assert served_versions(repo / "tiny_rb") == [1] and not (repo / "tiny_rb" / "2").exists()
    # validate=True catches the same contradiction before anything is written.
    with pytest.raises(ValueError, match="axis 1 is 5 in the config, 7 in the graph"):
        add_version(repo, "tiny_rb", 2, seven, admin=admin)
    admin.unload_model("tiny_rb")


# ----------------------------------------------------------------------------------- TritonBackend


async def test_backend_returns_exactly_the_requested_outputs(
    triton: TritonProcess, reference: ort.InferenceSession
) -> None:
    backend = TritonBackend(triton.grpc_address, "tiny", "1", signature=SIGNATURE)
    await backend.start()
    try:
        assert backend.is_ready() and backend.output_names == ("logits", "embedding", "conv")
        x = images(3, seed=11)
        expected = dict(zip(NAMES, reference.run(NAMES, {"images": x})))
        for wanted in (("logits",), ("embedding",), ("conv", "logits"), tuple(NAMES)):
            outputs = await backend.infer(x, wanted)
            assert tuple(outputs) == wanted
            for name in wanted:
                assert np.abs(outputs[name] - expected[name]).max() < 1e-5, name
        default = await backend.infer(x)
        assert list(default) == ["logits"]
        big = images(19, seed=12)  # > max_batch_size 8: split into chunks, reassembled in order
        outputs = await backend.infer(big, ("embedding",))
        assert np.abs(outputs["embedding"] - reference.run(["embedding"], {"images": big})[0]).max() < 1e-5
        with pytest.raises(FailedPrecondition, match="not in the served model's signature"):
            await backend.infer(x, ("blocks.4",))
    finally:
        await backend.close()


async def test_backend_refuses_to_start_on_a_model_that_does_not_fit_its_signature(triton: TritonProcess) -> None:
    wider = Signature(num_classes=12, embedding_dim=8, layers=SIGNATURE.layers, geometry=SIGNATURE.geometry)
    backend = TritonBackend(triton.grpc_address, "tiny", "1", signature=wider)
    with pytest.raises(ConfigurationError) as info:
        await backend.start()
    message = str(info.value)
    assert "'tiny' version 1" in message
    assert "output 'logits' has shape (1, 5) for one 32x32 image, expected (1, 12)" in message
    # An output the model does not have at all.
    extra = Signature(num_classes=5, embedding_dim=8, layers=(*SIGNATURE.layers, FeatureLayer("deeper", 8, 2)),
                      geometry=SIGNATURE.geometry)  # fmt: skip
    with pytest.raises(ConfigurationError, match="unexpected inference output 'deeper'"):
        await TritonBackend(triton.grpc_address, "tiny", "1", signature=extra).start()


async def test_a_mismatched_version_loaded_later_keeps_the_backend_not_ready(
    triton: TritonProcess, onnx_dir: Path
) -> None:
    """Started while its model is not loaded, the backend waits; when Triton loads a model that does not fit
    (here 7 classes for a 5-class signature), health must not turn SERVING and requests fail with the reason."""
    seven = export_tiny(onnx_dir / "tiny_late.onnx", num_classes=7)
    write_model(triton.repository, "tiny_late", 1, seven,
                **{**TINY, "outputs": [TensorSpec("logits", "TYPE_FP32", (7,)), *OUTPUTS[1:]]})  # fmt: skip
    backend = TritonBackend(triton.grpc_address, "tiny_late", "1", signature=SIGNATURE, health_interval_s=0.1)
    await backend.start()  # not loaded (explicit model control): a warning, not an error
    try:
        assert not backend.is_ready()
        await asyncio.to_thread(triton.admin.load_model, "tiny_late")
        deadline = time.monotonic() + 10
        while backend._mismatch is None:  # the monitor's next probe checks the newly ready version
            assert time.monotonic() < deadline, "the monitor never checked the loaded version"
            await asyncio.sleep(0.05)
        assert not backend.is_ready()
        await asyncio.sleep(0.3)  # later probes keep it not ready
        assert not backend.is_ready()
        with pytest.raises(FailedPrecondition) as info:
            await backend.infer(images(1), ("logits",))
        assert "'tiny_late' version 1" in str(info.value) and "expected (1, 5)" in str(info.value)
    finally:
        await backend.close()
        await asyncio.to_thread(triton.admin.unload_model, "tiny_late")


async def test_two_versions_with_shared_memory_get_their_own_answers(
    triton: TritonProcess, tiny_onnx: Path, tiny_v2_onnx: Path
) -> None:
    """Regression: regions were named per process and model only and opened without create_only, so the
    backends of versions 1 and 2 wrote their inputs into the same regions and could read each other's."""
    repo = triton.repository
    write_model(repo, "tiny_shm", 1, tiny_onnx, **TINY)
    add_version(repo, "tiny_shm", 2, tiny_v2_onnx, admin=triton.admin)
    backends = {
        version: TritonBackend(triton.grpc_address, "tiny_shm", str(version), signature=SIGNATURE,
                               shared_memory_bytes=64 * 1024, shared_memory_regions=2)  # fmt: skip
        for version in (1, 2)
    }
    for backend in backends.values():
        await backend.start()
    try:
        names = {v: set(b._shm.names) for v, b in backends.items()}  # type: ignore[union-attr]
        assert not names[1] & names[2]
        assert all("tiny_shm_v1_" in n for n in names[1]) and all("tiny_shm_v2_" in n for n in names[2])
        registered = {r["name"] for r in await asyncio.to_thread(triton.admin.shared_memory_status)}
        assert names[1] | names[2] <= registered
        x = images(24, seed=21)
        expected = {1: run(tiny_onnx, x)["logits"], 2: run(tiny_v2_onnx, x)["logits"]}
        assert np.abs(expected[1] - expected[2]).min() > 1e-3  # the versions are told apart by every answer
        calls = [(version, i) for i in range(len(x)) for version in (1, 2)]
        answers = await asyncio.gather(*(backends[v].infer(x[i : i + 1], ("logits",)) for v, i in calls))
        for (version, i), answer in zip(calls, answers):
            assert np.abs(answer["logits"][0] - expected[version][i]).max() < 1e-5, (version, i)
    finally:
        for backend in backends.values():
            await backend.close()
    registered = {r["name"] for r in await asyncio.to_thread(triton.admin.shared_memory_status)}
    assert not (names[1] | names[2]) & registered, "regions were not unregistered at close"
    assert not [p for p in Path("/dev/shm").iterdir() if "tiny_shm" in p.name], "regions were not destroyed"
    triton.admin.unload_model("tiny_shm")


def test_backend_errors_are_classified_by_status_code() -> None:
    backend = TritonBackend("127.0.0.1:1", "m", "3", signature=SIGNATURE)
    later = time.monotonic() + 60

    def translate(status: str, message: str = "boom") -> VisionError:
        return backend._translate(InferenceServerException(msg=message, status=status), later)

    assert isinstance(translate("StatusCode.UNAVAILABLE", "failed to connect to all addresses"), Unavailable)
    assert isinstance(translate("StatusCode.UNAVAILABLE", "Request for unknown model: 'm' version 3 is not at ready state"), Unavailable)
    assert isinstance(translate("StatusCode.RESOURCE_EXHAUSTED"), ResourceExhausted)
    assert isinstance(translate("StatusCode.NOT_FOUND", "Request for unknown model: 'm' is not found"), FailedPrecondition)
    lost = translate("StatusCode.NOT_FOUND", "Unable to find shared memory region: 'vision_1_m_v3_x_0'")
    assert isinstance(lost, Unavailable) and "shared-memory" in str(lost)
    timed_out = translate("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded")
    assert isinstance(timed_out, Unavailable) and "--triton-timeout-s" in str(timed_out)
    # Text that merely mentions a status does not decide it: the status does.
    internal = translate("StatusCode.INTERNAL", "model said: deadline exceeded, not ready, failed to connect")
    assert type(internal) is VisionError and "'m' version 3" in str(internal)


def test_serving_through_triton_does_not_import_torch(triton: TritonProcess) -> None:
    code = f"""
import asyncio, sys
import numpy as np
from vision.backends.triton_backend import TritonBackend
from vision.models.signature import FeatureLayer, InputGeometry, Signature
sig = Signature(5, 8, (FeatureLayer("conv", 8, 1),), InputGeometry(32, False))
async def main():
    backend = TritonBackend({triton.grpc_address!r}, "tiny", "1", signature=sig, shared_memory_bytes=1 << 16)
    await backend.start()
    out = await backend.infer(np.zeros((2, 3, 32, 32), np.float32), ("logits", "conv"))
    await backend.close()
    return out["conv"].shape
print(asyncio.run(main()), "torch" in sys.modules, "gevent" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["(2,", "8,", "32,", "32)", "False", "False"], done.stdout


# ------------------------------------------------- a registry model exported with every output: parity


@pytest.fixture(scope="module")
def effnet(triton: TritonProcess, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """EfficientNet-Lite0 with a 10-class head and seeded random weights saved to a file, exported by
    vision.triton.export into the module's Triton and loaded there."""
    import torch

    from vision.backends.torch_backend import run_on_torch_thread
    from vision.models import create_model, get_architecture
    from vision.triton.export import export_model

    weights = tmp_path_factory.mktemp("effnet") / "weights.pt"

    def save() -> None:
        torch.manual_seed(1234)
        torch.save(create_model("efficientnet_lite0", num_classes=10, pretrained=False).state_dict(), weights)

    run_on_torch_thread(save)
    export_model(triton.repository, "effnet", 1, arch="efficientnet_lite0", num_classes=10, weights=weights,
                 max_batch_size=4, preferred_batch_sizes=(), max_queue_delay_us=0, intra_op_threads=1)  # fmt: skip
    triton.admin.load_model("effnet")
    signature = get_architecture("efficientnet_lite0").signature(10)
    return {"weights": weights, "signature": signature, "onnx": triton.repository / "effnet" / "1" / "model.onnx"}


def test_export_declares_every_output_with_variable_spatial_dims(triton: TritonProcess, effnet: dict[str, Any]) -> None:
    config = triton.admin.model_config("effnet")
    assert [(t["name"], [int(d) for d in t["dims"]]) for t in config["input"]] == [("images", [3, -1, -1])]
    assert [(t["name"], [int(d) for d in t["dims"]]) for t in config["output"]] == [
        ("logits", [10]), ("embedding", [1280]), ("blocks.4", [112, -1, -1]), ("blocks.6", [320, -1, -1]),
        ("conv_head", [1280, -1, -1]),
    ]  # fmt: skip
    from vision.triton.export import triton_specs

    fixed = Signature(10, 1280, effnet["signature"].layers, InputGeometry(crop_size=224, variable=False))
    inputs, outputs = triton_specs(fixed)
    assert inputs[0].dims == (3, 224, 224)
    assert [o.dims for o in outputs] == [(10,), (1280,), (112, 14, 14), (320, 7, 7), (1280, 7, 7)]


async def test_one_triton_model_serves_two_input_sizes_at_once(triton: TritonProcess, effnet: dict[str, Any]) -> None:
    """model.py batches per shape: concurrent 224x224 and 256x192 requests each get their own maps."""
    signature = effnet["signature"]
    backend = TritonBackend(triton.grpc_address, "effnet", "1", signature=signature)
    await backend.start()
    try:
        before = await asyncio.to_thread(triton.model_stats, "effnet")
        sizes = [(224, 224), (256, 192)] * 3
        batches = [images(1, seed=30 + i, size=h, width=w) for i, (h, w) in enumerate(sizes)]
        answers = await asyncio.gather(*(backend.infer(b, ("blocks.4", "logits")) for b in batches))
        for (h, w), batch, answer in zip(sizes, batches, answers):
            assert answer["blocks.4"].shape == (1, *signature.output_shape("blocks.4", h, w))
            expected = run(effnet["onnx"], batch, ["logits", "blocks.4"])
            assert np.abs(answer["logits"] - expected["logits"]).max() < 1e-4
            assert np.abs(answer["blocks.4"] - expected["blocks.4"]).max() < 1e-4
        after = await asyncio.to_thread(triton.model_stats, "effnet")
        assert int(after["inference_count"]) - int(before.get("inference_count", 0)) >= len(sizes)
    finally:
        await backend.close()


async def test_onnxruntime_torch_and_triton_agree_on_every_output(effnet: dict[str, Any], triton: TritonProcess) -> None:
    from conftest import photo

    from vision.backends.onnx_backend import OnnxRuntimeBackend
    from vision.backends.torch_backend import TorchBackend, run_on_torch_thread
    from vision.media.imaging import PRESETS, preprocess
    from vision.models import create_model, with_outputs

    signature = effnet["signature"]

    def build_torch() -> TorchBackend:
        module = create_model("efficientnet_lite0", num_classes=10, weights=effnet["weights"], pretrained=False)
        return TorchBackend(with_outputs("efficientnet_lite0", module, 10), output_names=signature.outputs)

    preset = PRESETS["torchvision"]
    batch = np.stack([preprocess(photo(name), preset) for name in ("coffee.png", "chelsea.png")])
    wanted = ("logits", "embedding", "blocks.6")
    engines = {
        "onnxruntime": OnnxRuntimeBackend(effnet["onnx"], threads=1),
        "torch": run_on_torch_thread(build_torch),
        "triton": TritonBackend(triton.grpc_address, "effnet", "1", signature=signature),
    }
    results = {}
    for kind, backend in engines.items():
        await backend.start()
        try:
            results[kind] = await backend.infer(batch, wanted)
        finally:
            await backend.close()
    for kind in ("torch", "triton"):
        for name in wanted:
            got, want = results[kind][name], results["onnxruntime"][name]
            assert got.shape == want.shape, (kind, name)
            diff = float(np.abs(got - want).max())
            assert diff <= 1e-4, f"{kind} {name}: max abs diff {diff:.2e} against ONNX Runtime"
    assert results["triton"]["blocks.6"].shape == (2, 320, 7, 7)
    assert np.abs(results["triton"]["logits"] - results["onnxruntime"]["logits"]).max() == 0.0  # same ORT build


# ------------------------------------------------------------------------------------- without the server


def test_missing_runtime_says_how_to_set_it_up(tmp_path: Path) -> None:
    with pytest.raises(TritonRuntimeMissing) as info:
        find_runtime(tmp_path / "no-venv")
    assert "-m vision.triton --setup-only --venv" in str(info.value)


def test_configs_are_valid_model_config_text(tmp_path: Path) -> None:
    cpu = render_config(
        "m", inputs=INPUTS, outputs=OUTPUTS, flavour="cpu-python", intra_op_threads=2, versions=[3, 1], **BATCHING
    )
    parsed = text_format.Parse(cpu, model_config_pb2.ModelConfig())
    assert parsed.backend == "python" and parsed.max_batch_size == 8
    assert list(parsed.version_policy.specific.versions) == [1, 3]
    assert (
        list(parsed.input[0].dims) == [3, 32, 32] and parsed.input[0].data_type == model_config_pb2.TYPE_FP32
    )
    assert list(parsed.dynamic_batching.preferred_batch_size) == [4, 8]
    assert parsed.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert parsed.parameters["intra_op_thread_count"].string_value == "2"

    gpu = render_config("m", inputs=INPUTS, outputs=OUTPUTS, flavour="gpu-onnxruntime", tensorrt=True, versions=[1],
                        tensorrt_cache_dir="/cache/trt", gpus=[0], **{**BATCHING, "instances": 2})  # fmt: skip
    parsed = text_format.Parse(gpu, model_config_pb2.ModelConfig())
    assert parsed.backend == "onnxruntime"
    assert parsed.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert parsed.instance_group[0].count == 2 and list(parsed.instance_group[0].gpus) == [0]
    (trt,) = parsed.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
    assert trt.parameters["trt_engine_cache_path"] == "/cache/trt"

    # Names that string formatting would have had to escape are plain data to the protobuf.
    odd = render_config("m", inputs=[TensorSpec('im"ages\\', "TYPE_FP32", (3, 32, 32))], outputs=OUTPUTS,
                        flavour="cpu-python", versions=[1], **BATCHING)  # fmt: skip
    assert text_format.Parse(odd, model_config_pb2.ModelConfig()).input[0].name == 'im"ages\\'

    with pytest.raises(ValueError, match="gpu-onnxruntime"):
        render_config("m", inputs=INPUTS, outputs=OUTPUTS, flavour="cpu-python", tensorrt=True, versions=[1], **BATCHING)
    with pytest.raises(ValueError, match="preferred_batch_sizes"):
        render_config("m", inputs=INPUTS, outputs=OUTPUTS, flavour="cpu-python", max_batch_size=4,
                      preferred_batch_sizes=[8], versions=[1])  # fmt: skip
    with pytest.raises(ValueError, match="at least one version"):
        render_config("m", inputs=INPUTS, outputs=OUTPUTS, flavour="cpu-python", versions=[], **BATCHING)


def test_repository_writes_are_whole_and_versions_immutable(tiny_onnx: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repository"
    kwargs: dict[str, Any] = {"inputs": INPUTS, "outputs": OUTPUTS, "flavour": "cpu-python", **BATCHING}
    model_dir = write_model(repo, "m", 1, tiny_onnx, **kwargs)
    assert model_dir == repo / "m"
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")) == [
        "m", "m/1", "m/1/model.onnx", "m/1/model.py", "m/config.pbtxt"
    ]  # fmt: skip
    assert (repo / "m/1/model.py").read_bytes() == PYTHON_MODEL.read_bytes()
    assert served_versions(repo / "m") == [1]
    write_model(repo, "m", 2, tiny_onnx, **kwargs)
    assert (repo / "m/2/model.onnx").read_bytes() == tiny_onnx.read_bytes()
    assert "version 2 = tiny.onnx" in (repo / "m/config.pbtxt").read_text()
    assert served_versions(repo / "m") == [1, 2]  # the version in use stays in the policy
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
    # add_version keeps the model's config and appends to its policy; retire_version without a server
    # edits the policy and deletes the folder.
    before = read_config(repo / "m")
    add_version(repo, "m", 5, tiny_onnx)
    after = read_config(repo / "m")
    assert list(after.version_policy.specific.versions) == [1, 2, 5]
    after.version_policy.specific.versions[:] = before.version_policy.specific.versions
    assert after == before
    assert (repo / "m/5/model.py").is_file()
    with pytest.raises(FileExistsError):
        add_version(repo, "m", 5, tiny_onnx)
    with pytest.raises(FileNotFoundError, match="write_model"):
        add_version(repo, "nope", 1, tiny_onnx)
    retire_version(repo, "m", 1)
    assert served_versions(repo / "m") == [2, 5] and not (repo / "m/1").exists()
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["2", "5", "config.pbtxt"]


def test_a_config_without_a_policy_is_read_as_tritons_default(tiny_onnx: Path, tmp_path: Path) -> None:
    """Configs written before explicit policies served only their newest version; adding one keeps that
    version and adds the new one, instead of loading every old folder again."""
    repo = tmp_path / "repository"
    write_model(repo, "old", 1, tiny_onnx, **TINY)
    write_model(repo, "old", 2, tiny_onnx, **TINY)
    config = read_config(repo / "old")
    config.ClearField("version_policy")
    (repo / "old/config.pbtxt").write_text(text_format.MessageToString(config))
    assert served_versions(repo / "old") == [2]
    add_version(repo, "old", 3, tiny_onnx)
    assert served_versions(repo / "old") == [2, 3]


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


def _load_python_model(monkeypatch: pytest.MonkeyPatch, repo: Path, name: str, onnx_path: Path, **options: Any) -> Any:
    """model.py as Triton's python stub runs it: written by write_model, initialised with the config as JSON."""
    from google.protobuf.json_format import MessageToDict

    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor = _FakeTensor  # type: ignore[attr-defined]
    fake.TritonError = _FakeError  # type: ignore[attr-defined]
    fake.InferenceResponse = _FakeResponse  # type: ignore[attr-defined]
    fake.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)  # type: ignore[attr-defined]
    fake.triton_string_to_numpy = lambda t: {"TYPE_FP32": np.float32}[t]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    write_model(repo, name, 1, onnx_path, **options)
    spec = importlib.util.spec_from_file_location(f"triton_model_under_test_{name}", repo / name / "1/model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config_json = MessageToDict(read_config(repo / name), preserving_proto_field_name=True)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config_json), "model_repository": str(repo / name),
                      "model_version": "1", "model_name": name})  # fmt: skip
    return model


@pytest.fixture
def python_model(monkeypatch: pytest.MonkeyPatch, tiny_onnx: Path, tmp_path: Path) -> Any:
    flex = [TensorSpec("images", "TYPE_FP32", (3, -1, -1))]
    return _load_python_model(monkeypatch, tmp_path / "repository", "tiny_flex", tiny_onnx, **{**TINY, "inputs": flex})


def test_python_model_batches_per_input_size(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With variable dims in the config and the graph, requests of different sizes are each answered, in
    one forward pass per size."""
    import torch

    path = tmp_path / "flex.onnx"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(torch.nn.Conv2d(3, 2, 3, padding=1).eval(), (torch.randn(1, 3, 8, 8),), str(path),
                          input_names=["images"], output_names=["conv"], opset_version=17, dynamo=False,
                          dynamic_axes={"images": {0: "b", 2: "h", 3: "w"}, "conv": {0: "b", 2: "h", 3: "w"}})  # fmt: skip
    model = _load_python_model(
        monkeypatch, tmp_path / "repository", "flex", path, inputs=[TensorSpec("images", "TYPE_FP32", (3, -1, -1))],
        outputs=[TensorSpec("conv", "TYPE_FP32", (2, -1, -1))], flavour="cpu-python", max_batch_size=8,
    )  # fmt: skip
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sizes = [(8, 8), (12, 6), (8, 8), (12, 6), (5, 9)]
    xs = [images(1, seed=40 + i, size=h, width=w) for i, (h, w) in enumerate(sizes)]
    responses = model.execute([_FakeRequest(images=x) for x in xs])
    assert model.executions == 3  # one pass per distinct size
    for x, response in zip(xs, responses):
        assert response.error is None
        assert response.outputs["conv"].shape == (1, 2, *x.shape[2:])
        assert np.abs(response.outputs["conv"] - reference.run(["conv"], {"images": x})[0]).max() < 1e-6


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
    logits, embedding, conv = reference.run(NAMES, {"images": x[:3]})
    assert responses[0].error is None and responses[2].error is None
    assert np.abs(responses[0].outputs["logits"] - logits[0:2]).max() < 1e-5
    assert np.abs(responses[2].outputs["embedding"] - embedding[2:3]).max() < 1e-5
    assert np.abs(responses[2].outputs["conv"] - conv[2:3]).max() < 1e-5
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
