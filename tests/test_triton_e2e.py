"""The Classification service with inference on a real Triton server (nvidia-pytriton's tritonserver 2.51).

EfficientNet-Lite0 is exported with `vision export-triton` (cpu-python flavour: Triton's python backend
running the ONNX file with onnxruntime), Triton is started on loopback, and `vision serve --backend triton`
is started against it. Faults: Triton stopped and started again under the running service; a served model
whose labels do not fit the model Triton serves.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ServerProcess, classify_request, photo
from vision.media.imaging import PRESETS, preprocess
from vision.v1 import classification_pb2_grpc, common_pb2

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tritonserver binary is Linux-only")

MODEL = "efficientnet_lite0"


@pytest.fixture(scope="module")
def triton_stack(tmp_path_factory):
    from vision.triton import TritonProcess, setup_runtime

    root = tmp_path_factory.mktemp("triton-e2e")
    runtime = setup_runtime()
    repository = root / "model_repository"
    repository.mkdir()
    export = subprocess.run(
        [sys.executable, "-m", "vision.cli", "export-triton", "--model", MODEL, "--repository", str(repository),
         "--max-batch-size", "16", "--preferred-batch-sizes", "4,8,16", "--max-queue-delay-us", "5000"],
        capture_output=True, text=True, timeout=300,
    )
    assert export.returncode == 0, export.stderr
    assert (repository / MODEL / "config.pbtxt").is_file() and (repository / MODEL / "1" / "model.onnx").is_file()
    triton = TritonProcess(repository, runtime=runtime, log_path=root / "triton.log").start()
    service = ServerProcess(
        ["--backend", "triton", "--triton-url", triton.grpc_address, "--triton-timeout-s", "5"], root / "serve.log"
    ).wait_ready()
    stack = {"triton": triton, "service": service, "repository": repository, "runtime": runtime, "root": root}
    yield stack
    service.stop()
    stack["triton"].stop()  # the outage test replaces the process with a restarted one


def _stub(address: str) -> classification_pb2_grpc.ClassificationStub:
    return classification_pb2_grpc.ClassificationStub(grpc.insecure_channel(address))


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="vision.v1.Classification"), timeout=5
        ).status


def _stats(triton) -> dict:
    return triton.admin.model_stats(MODEL)


def test_classification_through_triton(triton_stack, photos):
    stub = _stub(triton_stack["service"].address)
    response = stub.Classify(classify_request(photos["coffee.jpg"], photos["chelsea.png"], top_k=3), timeout=60)
    assert (response.model.name, response.model.version) == (MODEL, "1")
    assert response.results[0].predictions[0].index == 967
    assert response.results[1].predictions[0].index in range(281, 286)
    (info,) = stub.ListModels(common_pb2.ListModelsRequest(), timeout=10).models
    assert info.backend == "triton"


@pytest.mark.parametrize("recipe", ["center", "ten_crop", "gem", "rmac"])
def test_features_through_triton_equal_the_embedded_engine(triton_stack, features_stub, photos, recipe):
    """The same Extract request through Triton and through the session's ONNX Runtime server."""
    from vision.api.codec import decode_descriptor
    from vision.v1 import features_pb2, features_pb2_grpc

    request = features_pb2.ExtractRequest(
        images=[common_pb2.Image(content=photos["coffee.jpg"]), common_pb2.Image(content=photos["rocket.jpg"])],
        recipe=recipe,
    )
    with grpc.insecure_channel(triton_stack["service"].address) as channel:
        remote = features_pb2_grpc.FeaturesStub(channel).Extract(request, timeout=120)
    local = features_stub.Extract(request, timeout=120)
    assert remote.model.version == "1" and remote.dim == local.dim
    for r, l in zip(remote.descriptors, local.descriptors, strict=True):
        np.testing.assert_allclose(decode_descriptor(r), decode_descriptor(l), atol=1e-4)


@pytest.fixture(scope="module")
def features_stub(channel):
    from vision.v1 import features_pb2_grpc

    return features_pb2_grpc.FeaturesStub(channel)


def test_requests_larger_than_tritons_max_batch_are_split(triton_stack, photos):
    stub = _stub(triton_stack["service"].address)
    images = [photos["coffee.jpg"], photos["chelsea.png"], photos["rocket.jpg"]] * 7  # 21 > max_batch_size 16
    response = stub.Classify(classify_request(*images, top_k=1), timeout=120)
    tops = [r.predictions[0].index for r in response.results]
    assert len(tops) == 21
    assert tops[0::3] == [967] * 7 and tops[2::3] == [657] * 7 and all(t in range(281, 286) for t in tops[1::3])


def test_triton_logits_equal_in_process_logits(triton_stack):
    import onnxruntime as ort
    import tritonclient.grpc as triton_grpc

    from vision.backends.torch_backend import TorchBackend, run_on_torch_thread
    from vision.models import create_model

    preset = PRESETS["torchvision"]
    batch = np.stack([preprocess(photo(n), preset) for n in ("coffee.png", "chelsea.png", "rocket.jpg")])
    client = triton_grpc.InferenceServerClient(triton_stack["triton"].grpc_address)
    inp = triton_grpc.InferInput("images", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch)
    result = client.infer(MODEL, [inp], model_version="1", outputs=[triton_grpc.InferRequestedOutput("logits")])
    remote = result.as_numpy("logits")
    assert result.get_response().model_version == "1"
    session = ort.InferenceSession(str(triton_stack["repository"] / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    local = session.run(["logits"], {"images": batch})[0]
    eager = run_on_torch_thread(lambda: TorchBackend(create_model(MODEL)).forward(batch))["logits"]
    assert np.abs(remote - local).max() <= 1e-4
    assert np.abs(remote - eager).max() <= 1e-4
    assert remote[0].argmax() == 967 and remote[2].argmax() == 657


def test_concurrent_requests_reach_triton_as_batches(triton_stack, photos):
    before = _stats(triton_stack["triton"])
    stub = _stub(triton_stack["service"].address)
    clients = 16
    barrier = threading.Barrier(clients)
    tops: list[int] = []

    def client() -> None:
        barrier.wait()
        for _ in range(2):
            tops.append(stub.Classify(classify_request(photos["coffee.jpg"], top_k=1), timeout=60).results[0].predictions[0].index)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tops == [967] * clients * 2
    # Triton records statistics after the responses are sent, so the counters can trail the answers briefly.
    deadline = time.monotonic() + 10
    while True:
        after = _stats(triton_stack["triton"])
        inferences = int(after["inference_count"]) - int(before["inference_count"])
        executions = int(after["execution_count"]) - int(before["execution_count"])
        if inferences >= clients * 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert inferences == clients * 2
    assert executions < inferences, f"Triton ran {inferences} images in {executions} executions: no batching"


def test_shared_memory_transfer(triton_stack, photos):
    triton = triton_stack["triton"]
    service = ServerProcess(
        ["--backend", "triton", "--triton-url", triton.grpc_address, "--triton-shm-mb", "4"],
        triton_stack["root"] / "serve-shm.log",
    ).wait_ready()
    try:
        regions = triton.admin.shared_memory_status()
        assert len(regions) == 16 and all(r["byte_size"] == 4 * 1024 * 1024 for r in regions)
        stub = _stub(service.address)
        response = stub.Classify(classify_request(photos["coffee.jpg"], photos["chelsea.png"], top_k=1), timeout=60)
        assert response.results[0].predictions[0].index == 967
        assert response.results[1].predictions[0].index in range(281, 286)
        # 8 images (4.8 MB) do not fit a 4 MiB region: sent inside the gRPC message instead, same answers.
        big = stub.Classify(classify_request(*[photos["coffee.jpg"]] * 8, top_k=1), timeout=60)
        assert [r.predictions[0].index for r in big.results] == [967] * 8
    finally:
        service.stop()
    assert triton.admin.shared_memory_status() == [], "regions were not unregistered at shutdown"


def test_triton_outage_gives_unavailable_then_recovers_without_restart(triton_stack, photos):
    from vision.triton import TritonProcess

    service, triton = triton_stack["service"], triton_stack["triton"]
    stub = _stub(service.address)
    assert _health(service.address) == health_pb2.HealthCheckResponse.SERVING
    ports = (triton.grpc_port, triton.http_port, triton.metrics_port)
    triton.stop()

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(classify_request(photos["coffee.jpg"]), timeout=20)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert "Triton" in info.value.details()
    assert time.monotonic() - started < 15, "the failure took longer than the per-attempt timeout and retries allow"
    deadline = time.monotonic() + 15
    while _health(service.address) != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "health never reported NOT_SERVING"
        time.sleep(0.2)

    restarted = TritonProcess(
        triton_stack["repository"], runtime=triton_stack["runtime"], grpc_port=ports[0], http_port=ports[1],
        metrics_port=ports[2], log_path=triton_stack["root"] / "triton-restarted.log",
    ).start()
    triton_stack["triton"] = restarted
    back = time.monotonic()
    deadline = back + 30
    while _health(service.address) != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "service did not notice Triton came back"
        time.sleep(0.2)
    response = stub.Classify(classify_request(photos["coffee.jpg"]), timeout=30)
    assert response.results[0].predictions[0].index == 967
    print(f"recovered {time.monotonic() - back:.1f} s after Triton was ready again")


def test_labels_that_do_not_fit_the_triton_model_stop_start_up(triton_stack):
    """Twelve labels served by a 1000-class model in Triton: the service refuses to start, naming the model,
    the version and the shapes, instead of serving SERVING while every request would fail."""
    labels = triton_stack["root"] / "twelve.txt"
    labels.write_text("".join(f"{i}\tlabel{i}\n" for i in range(12)))
    spec = f"arch={MODEL},name=twelve,labels={labels},triton_model={MODEL}"
    service = ServerProcess(
        ["--backend", "triton", "--triton-url", triton_stack["triton"].grpc_address, "--model", spec],
        triton_stack["root"] / "serve-twelve.log",
    )
    with pytest.raises(RuntimeError) as info:
        service.wait_ready(timeout=120)
    service.stop()
    assert service.proc.returncode not in (0, None)
    message = str(info.value)
    assert f"'{MODEL}' version 1" in message, message[-2000:]
    assert "output 'logits' has shape (1, 1000)" in message and "expected (1, 12)" in message, message[-2000:]


def test_classification_through_a_triton_served_over_mutual_tls(triton_stack, photos, tmp_path):
    """tritonserver with --grpc-use-ssl-mutual on the same repository; `vision serve --triton-tls-*` reaches
    it with a client certificate, and a client without TLS cannot."""
    import trustme
    import tritonclient.grpc as triton_grpc
    from tritonclient.utils import InferenceServerException

    from vision.triton import TritonProcess

    ca = trustme.CA()
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    paths = {}
    for role, leaf in (("server", ca.issue_cert("localhost", "127.0.0.1")), ("client", ca.issue_cert("vision-serve"))):
        paths[role] = (tmp_path / f"{role}.crt", tmp_path / f"{role}.key")
        leaf.cert_chain_pems[0].write_to_path(str(paths[role][0]))
        leaf.private_key_pem.write_to_path(str(paths[role][1]))
    triton = TritonProcess(
        triton_stack["repository"], runtime=triton_stack["runtime"], log_path=tmp_path / "triton-tls.log",
        extra_args=["--grpc-use-ssl=true", "--grpc-use-ssl-mutual=true", f"--grpc-server-cert={paths['server'][0]}",
                    f"--grpc-server-key={paths['server'][1]}", f"--grpc-root-cert={ca_path}"],
    ).start()
    service = None
    try:
        with triton_grpc.InferenceServerClient(triton.grpc_address) as plain:
            with pytest.raises(InferenceServerException):
                plain.is_server_live(client_timeout=5)
        service = ServerProcess(
            ["--backend", "triton", "--triton-url", triton.grpc_address, "--triton-tls-ca", str(ca_path),
             "--triton-tls-cert", str(paths["client"][0]), "--triton-tls-key", str(paths["client"][1]),
             "--triton-tls-server-name", "localhost"],
            tmp_path / "serve.log",
        ).wait_ready()
        response = _stub(service.address).Classify(classify_request(photos["coffee.jpg"], top_k=1), timeout=60)
        assert response.results[0].predictions[0].index == 967
    finally:
        if service is not None:
            service.stop()
        triton.stop()


def test_a_traced_request_continues_into_tritons_own_spans(triton_stack, photos, tmp_path):
    """tritonserver in its OpenTelemetry trace mode (rate=0: only requests that carry a context) exporting
    OTLP/HTTP to a loopback receiver, and a traced `vision serve`: Triton's spans join the caller's trace,
    under the service's `triton.infer` client span."""
    from otlp import HttpReceiver, exporting_env, traceparent

    from vision.triton import TritonProcess

    receiver = HttpReceiver()
    triton = TritonProcess(
        triton_stack["repository"], runtime=triton_stack["runtime"], log_path=tmp_path / "triton-traced.log",
        extra_args=["--trace-config=mode=opentelemetry", "--trace-config=rate=0", "--trace-config=count=-1",
                    "--trace-config=level=TIMESTAMPS", f"--trace-config=opentelemetry,url={receiver.endpoint}/v1/traces",
                    "--trace-config=opentelemetry,resource=service.name=triton",
                    "--trace-config=opentelemetry,bsp_schedule_delay=100"],
    ).start()
    service = None
    try:
        service = ServerProcess(
            ["--services", "classification", "--backend", "triton", "--triton-url", triton.grpc_address],
            tmp_path / "serve.log", env=exporting_env(receiver, "http/protobuf"),
        ).wait_ready()
        header, trace_id, _ = traceparent()
        response = _stub(service.address).Classify(
            classify_request(photos["coffee.jpg"], top_k=1), timeout=60, metadata=(("traceparent", header),)
        )
        assert response.results[0].predictions[0].index == 967
        try:
            spans = receiver.wait_for(lambda spans: {"triton", "vision-classification"} <= {
                s.service for s in spans if s.trace_id == trace_id and s.name in ("InferRequest", "triton.infer")})
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nrefused exports: {receiver.refused}") from None
        mine = [s for s in spans if s.trace_id == trace_id]
        (client,) = [s for s in mine if s.name == "triton.infer"]
        assert client.kind == 3 and client.service == "vision-classification"  # CLIENT
        tritons = [s for s in mine if s.service == "triton"]
        # Triton's top-level span continues the context our client span sent; its model and compute spans
        # sit under it.
        (top,) = [s for s in tritons if s.name == "InferRequest"]
        assert top.parent_id == client.span_id, [(s.name, s.span_id, s.parent_id) for s in mine]
        (model,) = [s for s in tritons if s.parent_id == top.span_id]
        assert model.name == "efficientnet_lite0" and [s.name for s in tritons if s.parent_id == model.span_id] == ["compute"]
    finally:
        if service is not None:
            service.stop()
        triton.stop()
        receiver.close()
