"""What a `vision serve` process hosts, through real server processes: `--services`, health per service,
a backend per model, reflection v1 and v1alpha, explicit random weights, the concurrent-RPC limit."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from conftest import ServerProcess, classify_request, metric_value, scrape
from vision.v1 import classification_pb2_grpc, common_pb2, tagging_pb2, tagging_pb2_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(channel: grpc.Channel, service: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _reflected_services(channel: grpc.Channel, package: str) -> list[str]:
    """list_services over reflection `package` (v1 and v1alpha are the same messages on the wire)."""
    call = channel.stream_stream(
        f"/{package}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    (reply,) = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    return sorted(s.name for s in reply.list_services_response.service)


@pytest.fixture(scope="module")
def classification_only(tmp_path_factory):
    """Classification only; the default model on ONNX Runtime and a second one on torch (backend=torch)."""
    root = tmp_path_factory.mktemp("hosting")
    proc = ServerProcess(
        ["--services", "classification", "--model", "efficientnet_lite0",
         "--model", "arch=efficientnet_lite0,name=lite-torch,backend=torch"],
        root / "serve.log",
    ).wait_ready()
    yield proc
    proc.stop()


def test_only_the_named_services_are_hosted(classification_only, photos):
    with grpc.insecure_channel(classification_only.address) as channel:
        hosted = ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                  "grpc.reflection.v1alpha.ServerReflection", "vision.v1.Classification"]
        assert _reflected_services(channel, "grpc.reflection.v1") == hosted
        assert _reflected_services(channel, "grpc.reflection.v1alpha") == hosted
        assert _health(channel, "vision.v1.Classification") == SERVING
        assert _health(channel, "") == SERVING
        with pytest.raises(grpc.RpcError) as info:
            _health(channel, "vision.v1.Tagging")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            tagging_pb2_grpc.TaggingStub(channel).Tag(
                tagging_pb2.TagRequest(images=[common_pb2.Image(content=photos["coffee.jpg"])]), timeout=10
            )
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_each_model_runs_on_its_own_backend_with_the_same_answers(classification_only, photos):
    with grpc.insecure_channel(classification_only.address) as channel:
        stub = classification_pb2_grpc.ClassificationStub(channel)
        models = {m.name: m for m in stub.ListModels(common_pb2.ListModelsRequest(), timeout=10).models}
        assert (models["efficientnet_lite0"].backend, models["lite-torch"].backend) == ("onnxruntime", "torch")
        lite = models["efficientnet_lite0"]
        assert [o.name for o in lite.outputs] == ["logits", "embedding", "blocks.4", "blocks.6", "conv_head"]
        assert (lite.outputs[1].channels, lite.outputs[2].stride) == (1280, 16)
        assert lite.input_geometry.crop_size == 224 and lite.input_geometry.variable
        assert not lite.random_weights and lite.metrics["imagenet_top1"] == pytest.approx(75.1)
        answers = {}
        for name in models:
            reply = stub.Classify(classify_request(photos["coffee.jpg"], photos["rocket.jpg"], top_k=3, model=name), timeout=60)
            answers[name] = [[(p.index, p.score) for p in r.predictions] for r in reply.results]
        for onnx_row, torch_row in zip(answers["efficientnet_lite0"], answers["lite-torch"], strict=True):
            assert [i for i, _ in onnx_row] == [i for i, _ in torch_row]
            assert [s for _, s in onnx_row] == pytest.approx([s for _, s in torch_row], abs=1e-4)
        assert answers["efficientnet_lite0"][0][0][0] == 967 and answers["efficientnet_lite0"][1][0][0] == 657


def test_a_model_that_is_down_takes_only_its_own_services_out_of_rotation(tmp_path, photos):
    """Tagging's default model is remote and its Triton is unreachable; Classification's model is local."""
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{i}\tconcept {i}\n" for i in range(10)))
    proc = ServerProcess(
        ["--triton-url", f"127.0.0.1:{_closed_port()}", "--triton-retries", "0", "--triton-timeout-s", "2",
         "--model", f"arch=resnext50_32x4d_multilabel,name=remote,labels={labels},backend=triton",
         "--model", "efficientnet_lite0"],
        tmp_path / "serve.log",
    ).wait_ready()
    try:
        with grpc.insecure_channel(proc.address) as channel:
            assert _health(channel, "vision.v1.Classification") == SERVING
            assert _health(channel, "vision.v1.Tagging") == NOT_SERVING
            assert _health(channel, "") == NOT_SERVING  # not every hosted service can answer
            assert _health(channel, "vision.liveness") == SERVING  # but the process is alive: no restart
            reply = classification_pb2_grpc.ClassificationStub(channel).Classify(classify_request(photos["coffee.jpg"]), timeout=60)
            assert reply.results[0].predictions[0].index == 967
            with pytest.raises(grpc.RpcError) as info:
                tagging_pb2_grpc.TaggingStub(channel).Tag(
                    tagging_pb2.TagRequest(images=[common_pb2.Image(content=photos["coffee.jpg"])]), timeout=30
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.stop()


def test_random_weights_only_on_request(tmp_path, photos):
    """Defect 2: an architecture without bundled weights used to serve random weights with ImageNet labels."""
    refused = subprocess.run(
        [sys.executable, "-m", "vision.cli", "serve", "--port", "0", "--metrics-port", "0", "--model", "resnet50"],
        capture_output=True, text=True, timeout=120,
    )
    assert refused.returncode == 1
    assert "'resnet50' has no bundled weights" in refused.stderr and "weights=random" in refused.stderr
    proc = ServerProcess(["--model", "arch=efficientnet_lite0,name=noise,weights=random"], tmp_path / "serve.log").wait_ready()
    try:
        with grpc.insecure_channel(proc.address) as channel:
            (model,) = classification_pb2_grpc.ClassificationStub(channel).ListModels(common_pb2.ListModelsRequest(), timeout=10).models
            assert model.random_weights and model.weights_sha256 == "" and not model.metrics
        assert metric_value(scrape(proc.metrics_url), "vision_model_info", model="noise", weights_sha256="random") == 1
    finally:
        proc.stop()


def test_concurrent_rpcs_over_the_limit_are_refused_and_the_server_keeps_serving(tmp_path, photos):
    """Defect 7: --max-concurrent-rpcs had no test."""
    proc = ServerProcess(["--max-concurrent-rpcs", "2", "--max-images-per-request", "64"], tmp_path / "serve.log").wait_ready()
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def call() -> None:
        with grpc.insecure_channel(proc.address) as channel:
            try:
                classification_pb2_grpc.ClassificationStub(channel).Classify(
                    classify_request(*[photos["chelsea.jpg"]] * 24), timeout=120
                )
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
        with lock:
            codes.append(code)

    try:
        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert codes.count(grpc.StatusCode.OK) >= 2
        with grpc.insecure_channel(proc.address) as channel:
            reply = classification_pb2_grpc.ClassificationStub(channel).Classify(classify_request(photos["coffee.jpg"]), timeout=60)
        assert reply.results[0].predictions[0].index == 967
    finally:
        proc.stop()


def test_services_flag_is_validated(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vision.cli", "serve", "--services", "classification,bogus"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "services" in result.stderr and "bogus" in result.stderr
