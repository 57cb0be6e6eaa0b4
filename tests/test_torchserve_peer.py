"""The TorchServe peer of `python -m loadtest.modes`, without TorchServe: the handler's model path on a real
photo against the running service, its pieces, TorchServe's config, the closed-loop driver and the
comparison table. (The benchmark itself needs .venv-torchserve and Java; it is not part of CI.)"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from loadtest import torchserve as ts
from loadtest.harness import RunResult, closed_run
from loadtest.modes import format_table, summary_rows
from loadtest.openloop import RPCS
from loadtest.torchserve_handler import PeerModel, request_bytes, softmax_top_k
from tests.conftest import classify_request


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    """The embedded default exported exactly as the benchmark exports it for TorchServe."""
    return ts.export_model("efficientnet_lite0", tmp_path_factory.mktemp("peer"))


def test_peer_model_answers_what_the_service_answers(peer, photos, classifier):
    """Same weights, same decode and preprocessing, another engine (eager torch vs the service's ONNX
    Runtime): the same top-5 classes with the same probabilities."""
    assert (peer.arch, peer.num_classes, peer.preset) == ("efficientnet_lite0", 1000, "torchvision")
    assert peer.weights.startswith("bundled")
    model = PeerModel(peer.arch, peer.num_classes, peer.state_dict, threads=2, preset=peer.preset)
    from vision.media.imaging import get_preset, load_image

    batch = model.preprocess([photos["coffee.jpg"], photos["chelsea.jpg"]])
    expected = np.stack([load_image(photos[name], get_preset("torchvision")) for name in ("coffee.jpg", "chelsea.jpg")])
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == np.float32
    np.testing.assert_allclose(batch, expected, atol=1e-5, rtol=0)

    answers = model([photos["coffee.jpg"], photos["chelsea.jpg"]])
    served = classifier.Classify(classify_request(photos["coffee.jpg"], photos["chelsea.jpg"], top_k=5), timeout=60)
    for mine, theirs in zip(answers, served.results, strict=True):
        assert [c["index"] for c in mine] == [p.index for p in theirs.predictions]
        np.testing.assert_allclose([c["score"] for c in mine], [p.score for p in theirs.predictions], atol=1e-4)
    assert answers[0][0]["index"] == 967  # espresso
    assert answers[1][0]["index"] in (281, 285, 282)  # tabby, Egyptian, tiger cat


def test_softmax_top_k_matches_a_full_sort():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 1000)).astype(np.float32) * 4
    rows = softmax_top_k(logits, 5)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    for row, probs in zip(rows, p, strict=True):
        assert [c["index"] for c in row] == list(np.argsort(-probs)[:5])
        np.testing.assert_allclose([c["score"] for c in row], np.sort(probs)[::-1][:5], rtol=1e-5)
    assert len(softmax_top_k(logits[:, :3], 5)[0]) == 3


def test_request_bytes_takes_the_grpc_input():
    assert request_bytes({"data": bytearray(b"\xff\xd8jpeg")}) == b"\xff\xd8jpeg"
    assert request_bytes({"body": b"abc"}) == b"abc"
    with pytest.raises(ValueError, match="bytes"):
        request_bytes({"data": "text"})


def test_config_binds_loopback_only(tmp_path):
    ports = {"inference": 1, "management": 2, "metrics": 3, "grpc": 4, "grpc_management": 5}
    text = ts.config_properties(tmp_path, ports, batch_size=16, max_batch_delay_ms=0)
    props = dict(line.split("=", 1) for line in text.splitlines())
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:")
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["grpc_inference_port"] == "4"
    for flag in ("disable_token_authorization", "enable_model_api", "disable_system_metrics"):
        assert props[flag] == "true"
    model = json.loads(props["models"])[ts.MODEL_NAME]["1.0"]
    assert (model["batchSize"], model["maxBatchDelay"], model["minWorkers"], model["maxWorkers"]) == (16, 0, 1, 1)


def test_missing_venv_says_how_to_make_it(tmp_path):
    assert "torchserve_setup.sh" in ts.missing_reason(tmp_path / "nope")


def test_closed_loop_driver_against_a_real_server(server, photos):
    result = asyncio.run(closed_run(server.address, RPCS["classify"], photos["coffee.jpg"], 2, 1.0, 0.3, "standalone"))
    assert result.requests > 5 and not result.errors
    assert 0 < result.p50_ms <= result.p99_ms


def test_table_gives_each_mode_its_own_raw_and_torchserve_ratios(tmp_path):
    raw = {"raw": {"b1": 130.0, "b16": 150.0}, "raw-torch": {"b1": 50.0, "b16": 40.0}}
    closed = {
        "standalone": RunResult("standalone", 16, 165.0, 95.0, 120.0, 140.0, 100),
        "standalone-torch": RunResult("standalone-torch", 16, 44.0, 350.0, 400.0, 450.0, 100),
        "torchserve": RunResult("torchserve", 16, 33.0, 480.0, 500.0, 600.0, 100),
    }
    rows = {r["mode"]: r for r in summary_rows({}, closed, raw)}
    assert rows["raw"]["batch"] == 16 and rows["raw-torch"]["batch"] == 1  # each engine at its best batch
    assert rows["standalone"]["ratio_to_raw"] == pytest.approx(1.1)
    assert rows["standalone-torch"]["ratio_to_raw"] == pytest.approx(44 / 50)
    assert rows["torchserve"]["ratio_to_raw"] == pytest.approx(33 / 50)
    assert rows["standalone"]["vs_torchserve"] == pytest.approx(5.0)
    assert rows["standalone-torch"]["vs_torchserve"] == pytest.approx(44 / 33)
    table = format_table(list(rows.values()))
    assert "| torchserve | torch | 33.0 | 480.0 / 600.0 | 0.66 (of raw-torch) | 1.00 |" in table
    assert "| raw (batch 16) | onnxruntime | 150.0 | – | 1.00 | 4.55 |" in table
    without_peer = summary_rows({}, {"standalone": closed["standalone"]}, raw)
    assert all(r["vs_torchserve"] is None for r in without_peer)
    pytest.importorskip("matplotlib")
    from loadtest.report import plot_summary

    assert plot_summary(list(rows.values()), tmp_path / "modes.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(ts.missing_reason() is not None, reason="no TorchServe venv (loadtest/torchserve_setup.sh)")
def test_grpc_stubs_compile_from_the_jar(tmp_path):
    pb2, pb2_grpc = ts.grpc_stubs(out_dir=tmp_path)
    request = pb2.PredictionsRequest(model_name=ts.MODEL_NAME, input={"data": b"x"})
    assert request.input["data"] == b"x" and hasattr(pb2_grpc, "InferenceAPIsServiceStub")


def test_batch_and_handler_time_are_read_from_torchserve_logs(tmp_path):
    """The lines TorchServe 0.12 writes for the handler's log and its PredictionTime metric."""
    (tmp_path / "torchserve.log").write_text(
        "2026-11-25T17:48:24,578 [INFO ] W-9000-vision_peer_1.0-stdout MODEL_LOG - vision_peer: batches 5 images 70\n"
        "x [INFO ] W-9000-vision_peer_1.0-stdout MODEL_METRICS - PredictionTime.ms:900.0|#ModelName:vision_peer,Level:Model\n"
        "x [INFO ] W-9000-vision_peer_1.0-stdout MODEL_METRICS - PredictionTime.ms:300.5|#ModelName:vision_peer,Level:Model\n"
        "x [INFO ] W-9000-vision_peer_1.0-stdout MODEL_METRICS - PredictionTime.ms:250.0|#ModelName:vision_peer,Level:Model\n"
        "x [INFO ] W-9000-vision_peer_1.0-stdout MODEL_METRICS - PredictionTime.ms:260.0|#ModelName:vision_peer,Level:Model\n"
        "2026-11-25T17:48:30,000 [INFO ] W-9000-vision_peer_1.0-stdout MODEL_LOG - vision_peer: batches 10 images 150\n"
    )
    assert ts.batch_stats(tmp_path) == (10, 150)
    assert ts.prediction_ms(tmp_path) == pytest.approx(255.0)  # the first two (probe, warm-up) left out
    assert ts.batch_stats(tmp_path / "none") is None and ts.prediction_ms(tmp_path / "none") is None
