"""Start-up failures, several models with custom labels and versions, and graceful SIGTERM drain."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch

from conftest import ServerProcess, classify_request, metric_value, scrape
from vision.models import get_architecture
from vision.v1 import classification_pb2_grpc, common_pb2


def test_corrupt_weights_stop_startup_with_a_clear_message(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    result = subprocess.run(
        [sys.executable, "-m", "vision.cli", "serve", "--port", "0", "--metrics-port", "0", "--model", f"arch=resnet50,weights={bad}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert f"weights file {bad} is not a readable torch file" in result.stderr
    assert "gRPC listening" not in result.stdout


def test_invalid_flags_are_refused_before_loading(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vision.cli", "serve", "--max-batch-size", "0"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "max_batch_size" in result.stderr


@pytest.fixture(scope="module")
def multi_model_server(tmp_path_factory):
    """resnet50 at versions 1 and 2 with a 10-label ML-Images label file, beside the default model."""
    root = tmp_path_factory.mktemp("multi")
    labels = root / "labels.txt"
    labels.write_text("".join(f"{i}\tthing number {i}\n" for i in range(10)))
    for version, seed in (("1", 1), ("2", 2)):
        torch.manual_seed(seed)
        net = get_architecture("resnet50").builder(num_classes=10)
        # Bias the head so each version has a known, different answer whatever the image.
        with torch.no_grad():
            net.fc.bias.zero_()
            net.fc.bias[3 if version == "1" else 7] = 50.0
        torch.save(net.state_dict(), root / f"r50-v{version}.pt")
    # The torch backend end to end (the session server covers onnxruntime).
    args = ["--backend", "torch", "--model", "efficientnet_lite0"]
    for version in ("1", "2"):
        args += ["--model", f"arch=resnet50,name=r50,version={version},weights={root / f'r50-v{version}.pt'},labels={labels}"]
    proc = ServerProcess(args, root / "serve.log").wait_ready()
    yield proc
    proc.stop()


def test_models_with_label_files_and_versions(multi_model_server, photos):
    with grpc.insecure_channel(multi_model_server.address) as channel:
        stub = classification_pb2_grpc.ClassificationStub(channel)
        models = stub.ListModels(common_pb2.ListModelsRequest(), timeout=10).models
        assert [(m.name, m.version, m.num_labels) for m in models] == [
            ("efficientnet_lite0", "1", 1000), ("r50", "1", 10), ("r50", "2", 10)
        ]
        newest = stub.Classify(classify_request(photos["coffee.jpg"], top_k=10, model="r50"), timeout=60)
        assert newest.model.version == "2"
        preds = newest.results[0].predictions
        assert len(preds) == 10 and preds[0].index == 7 and preds[0].label == "thing number 7"
        assert sum(p.score for p in preds) == pytest.approx(1.0, abs=1e-4)
        v1 = stub.Classify(classify_request(photos["coffee.jpg"], top_k=1, model="r50", version="1"), timeout=60)
        assert (v1.model.version, v1.results[0].predictions[0].index) == ("1", 3)
        # The default model (first configured) still answers unnamed requests.
        default = stub.Classify(classify_request(photos["coffee.jpg"], top_k=1), timeout=60)
        assert default.model.name == "efficientnet_lite0" and default.results[0].predictions[0].index == 967
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(classify_request(photos["coffee.jpg"], top_k=11, model="r50"), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "between 1 and 10" in info.value.details()


def test_sigterm_drains_in_flight_requests_then_exits(tmp_path, photos):
    server = ServerProcess(["--grace-seconds", "30", "--max-batch-size", "4"], tmp_path / "serve.log").wait_ready()
    outcome: dict[str, object] = {}
    with grpc.insecure_channel(server.address) as channel:
        stub = classification_pb2_grpc.ClassificationStub(channel)
        stub.Classify(classify_request(photos["coffee.jpg"]), timeout=60)  # warm up

        def slow_request() -> None:
            try:
                outcome["response"] = stub.Classify(classify_request(*[photos["coffee.png"]] * 32, top_k=1), timeout=120)
            except grpc.RpcError as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=slow_request)
        thread.start()
        deadline = time.monotonic() + 30
        while metric_value(scrape(server.metrics_url), "vision_requests_in_flight", method="Classify") < 1:
            assert time.monotonic() < deadline, "request never started"
            time.sleep(0.005)
        server.proc.send_signal(15)
        thread.join(timeout=60)
        assert "error" not in outcome, outcome.get("error")
        response = outcome["response"]
        assert len(response.results) == 32 and all(r.predictions[0].index == 967 for r in response.results)
    assert server.proc.wait(timeout=60) == 0
    assert "stopped" in server.log()
    server.stop()


def test_port_in_use_is_a_clear_startup_error():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "vision.cli", "serve", "--port", str(port), "--metrics-port", "0"],
            capture_output=True, text=True, timeout=120,
        )
    assert result.returncode == 1
    assert f"cannot bind gRPC on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr
