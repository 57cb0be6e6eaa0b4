"""Classification through a real `vision serve` process and a real gRPC client."""

from __future__ import annotations

import struct
import threading
import time
import zlib

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from conftest import classify_request, encode, metric_value, photo, scrape
from vision.v1 import common_pb2

CATS = range(281, 286)


def top1(response, i: int = 0) -> int:
    return response.results[i].predictions[0].index


@pytest.mark.parametrize("name", ["coffee.jpg", "coffee.png"])
def test_coffee_is_espresso(classifier, photos, name):
    response = classifier.Classify(classify_request(photos[name], top_k=5), timeout=60)
    assert response.model.name == "efficientnet_lite0" and response.model.version == "1"
    preds = response.results[0].predictions
    assert preds[0].index == 967 and preds[0].label == "espresso"
    assert preds[0].score > 0.7
    assert [p.score for p in preds] == sorted((p.score for p in preds), reverse=True)
    assert len(preds) == 5


@pytest.mark.parametrize("name", ["chelsea.jpg", "chelsea.png"])
def test_chelsea_is_a_cat(classifier, photos, name):
    response = classifier.Classify(classify_request(photos[name], top_k=3), timeout=60)
    assert top1(response) in CATS
    assert all(p.index in CATS for p in response.results[0].predictions)


def test_batch_results_follow_request_order_and_ids(classifier, photos):
    response = classifier.Classify(
        classify_request(photos["chelsea.png"], photos["coffee.jpg"], photos["rocket.jpg"], top_k=1), timeout=60
    )
    assert [r.image_id for r in response.results] == ["img0", "img1", "img2"]
    assert top1(response, 0) in CATS and top1(response, 1) == 967 and top1(response, 2) == 657


def test_list_models_describes_preprocessing(classifier):
    response = classifier.ListModels(common_pb2.ListModelsRequest(), timeout=10)
    (model,) = response.models
    assert (model.name, model.architecture, model.num_labels, model.task) == (
        "efficientnet_lite0", "efficientnet_lite0", 1000, "classification"
    )
    assert model.backend == "onnxruntime" and len(model.weights_sha256) == 64
    p = model.preprocessing
    assert (p.preset, p.resize_shorter, p.crop_size, p.channel_order) == ("torchvision", 256, 224, "RGB")
    assert list(p.mean) == pytest.approx([0.485, 0.456, 0.406])


# --- inputs that are odd but valid: decoded, converted, classified -------------------------------------


def _exif_rotated_jpeg() -> bytes:
    # Stored sideways, EXIF orientation 6 says "rotate 90° clockwise to display": upright after decoding.
    stored = photo("coffee.png").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif)


def _animated_gif() -> bytes:
    frames = [photo("coffee.png").quantize(256), photo("chelsea.png").resize((600, 400)).quantize(256)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _sixteen_bit_png() -> bytes:
    gray = np.asarray(photo("coffee.png").convert("L"), dtype=np.uint16) * 257
    return encode(Image.fromarray(gray), "PNG")


VALID_ODD_IMAGES = {
    "cmyk-jpeg": (lambda: encode(photo("coffee.png").convert("CMYK"), "JPEG", quality=95), {967}),
    "rgba-png": (lambda: encode(photo("coffee.png").convert("RGBA"), "PNG"), {967}),
    "palette-png": (lambda: encode(photo("coffee.png").quantize(256), "PNG"), {967}),
    "exif-rotated-jpeg": (_exif_rotated_jpeg, {967}),
    "animated-gif-first-frame": (_animated_gif, {967}),
    "webp": (lambda: encode(photo("chelsea.png"), "WEBP", quality=90), set(CATS)),
    "bmp": (lambda: encode(photo("chelsea.png"), "BMP"), set(CATS)),
    # Grayscale loses the colour cues; the check is that 16-bit values are scaled, not clipped to white.
    "16-bit-grayscale-png": (_sixteen_bit_png, {967, 968, 504, 925}),
}


@pytest.mark.parametrize("kind", sorted(VALID_ODD_IMAGES))
def test_odd_but_valid_images_are_classified(classifier, kind):
    make, expected = VALID_ODD_IMAGES[kind]
    response = classifier.Classify(classify_request(make(), top_k=1), timeout=60)
    assert top1(response) in expected, response


def test_exif_orientation_is_applied(classifier, photos):
    upright = classifier.Classify(classify_request(encode(photo("coffee.png"), "JPEG", quality=95)), timeout=60)
    rotated = classifier.Classify(classify_request(_exif_rotated_jpeg()), timeout=60)
    # Same picture once the tag is honoured: same ranking, nearly the same probabilities (JPEG noise only).
    up = {p.index: p.score for p in upright.results[0].predictions}
    rot = {p.index: p.score for p in rotated.results[0].predictions}
    assert list(up)[:3] == list(rot)[:3]
    assert abs(up[967] - rot[967]) < 0.03


# --- bad requests: documented status, and the server keeps serving ------------------------------------


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG that declares a giant canvas (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(1000))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _truncated_jpeg(photos) -> bytes:
    data = photos["coffee.jpg"]
    return data[: len(data) // 3]


BAD_REQUESTS = {
    "zero-bytes": (lambda p: classify_request(b""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    "random-bytes": (
        lambda p: classify_request(np.random.default_rng(0).bytes(5000)), grpc.StatusCode.INVALID_ARGUMENT, "not a decodable image",
    ),
    "truncated-jpeg": (lambda p: classify_request(_truncated_jpeg(p)), grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
    "html": (
        lambda p: classify_request(b"<!doctype html><html><body>404</body></html>"), grpc.StatusCode.INVALID_ARGUMENT, "not a decodable",
    ),
    "1x1-image": (
        lambda p: classify_request(encode(Image.new("RGB", (1, 1)), "PNG")), grpc.StatusCode.INVALID_ARGUMENT, "at least 8 pixels",
    ),
    "huge-dimension-png-header": (
        lambda p: classify_request(_png_header_only(100_000, 100_000)), grpc.StatusCode.INVALID_ARGUMENT, "too many pixels",
    ),
    "over-pixel-limit-png-header": (
        lambda p: classify_request(_png_header_only(8000, 6000)), grpc.StatusCode.INVALID_ARGUMENT, "40000000-pixel limit",
    ),
    "tiff-unsupported": (
        lambda p: classify_request(encode(photo("coffee.png"), "TIFF")), grpc.StatusCode.INVALID_ARGUMENT, "supported formats",
    ),
    "over-byte-limit": (
        lambda p: classify_request(b"\xff\xd8" + bytes(3_100_000)), grpc.StatusCode.INVALID_ARGUMENT, "byte limit",
    ),
    "bad-image-names-its-index": (
        lambda p: classify_request(p["coffee.jpg"], p["chelsea.png"], b"garbage"), grpc.StatusCode.INVALID_ARGUMENT, "image 2 (id 'img2')",
    ),
    "top-k-zero": (lambda p: classify_request(p["coffee.jpg"], top_k=0), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    "top-k-negative": (lambda p: classify_request(p["coffee.jpg"], top_k=-3), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    "top-k-million": (lambda p: classify_request(p["coffee.jpg"], top_k=10**6), grpc.StatusCode.INVALID_ARGUMENT, "between 1 and 1000"),
    "unknown-model": (lambda p: classify_request(p["coffee.jpg"], model="nope"), grpc.StatusCode.NOT_FOUND, "available: efficientnet_lite0"),
    "unknown-version": (
        lambda p: classify_request(p["coffee.jpg"], model="efficientnet_lite0", version="7"), grpc.StatusCode.NOT_FOUND, "no version '7'",
    ),
    "request-over-size-limit": (
        lambda p: classify_request(*[b"\xff\xd8" + bytes(2_900_000)] * 14), grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max",
    ),
    "empty-batch": (lambda p: classify_request(), grpc.StatusCode.INVALID_ARGUMENT, "no images"),
    "oversize-batch": (lambda p: classify_request(*[p["coffee.jpg"]] * 33), grpc.StatusCode.RESOURCE_EXHAUSTED, "limit of 32"),
}


@pytest.mark.parametrize("kind", sorted(BAD_REQUESTS))
def test_bad_request_gets_documented_status_and_server_keeps_serving(classifier, photos, kind):
    make, code, fragment = BAD_REQUESTS[kind]
    with pytest.raises(grpc.RpcError) as info:
        classifier.Classify(make(photos), timeout=60)
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details()
    assert top1(classifier.Classify(classify_request(photos["coffee.jpg"]), timeout=60)) == 967


def test_deadline_is_honoured_by_the_server(classifier, server, photos):
    """The client library enforces its own deadline, so check the server's side: it records the RPC as
    DEADLINE_EXCEEDED and drops the work (the 32 images never reach a forward pass)."""
    labels = {"model": "efficientnet_lite0", "version": "1"}
    ran_before = metric_value(scrape(server.metrics_url), "vision_inference_batch_size_sum", **labels)
    expired = {"service": "vision.v1.Classification", "method": "Classify", "code": "DEADLINE_EXCEEDED"}
    expired_before = metric_value(scrape(server.metrics_url), "vision_requests_total", **expired)
    request = classify_request(*[photos["coffee.png"]] * 32)
    recorded = False
    attempts = 0
    # A deadline so short that the RPC can expire before the server even starts it would prove nothing;
    # lengthen it until the server has seen one expire (32 images take over 0.15 s to serve even on a quiet machine).
    for timeout in (0.05, 0.08, 0.12):
        attempts += 1
        with pytest.raises(grpc.RpcError) as info:
            classifier.Classify(request, timeout=timeout)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 3
        while not recorded and time.monotonic() < deadline:
            recorded = metric_value(scrape(server.metrics_url), "vision_requests_total", **expired) > expired_before
            time.sleep(0.05)
        if recorded:
            break
    assert recorded, "the server never recorded an expired RPC"
    assert top1(classifier.Classify(classify_request(photos["coffee.jpg"]), timeout=60)) == 967
    ran = metric_value(scrape(server.metrics_url), "vision_inference_batch_size_sum", **labels) - ran_before
    assert ran < 32 * attempts, f"{ran:.0f} images were inferred for RPCs whose callers had given up"


# --- batching, isolation, metrics, health, reflection --------------------------------------------------


def test_concurrent_clients_are_batched_and_get_their_own_answers(classifier, server, photos):
    names = ["coffee.jpg", "chelsea.png", "rocket.jpg", "motorcycle.png"]
    expected = {n: top1(classifier.Classify(classify_request(photos[n], top_k=1), timeout=60)) for n in names}
    assert expected["coffee.jpg"] == 967 and expected["rocket.jpg"] == 657 and expected["motorcycle.png"] == 665
    before = scrape(server.metrics_url)
    clients = 16
    barrier = threading.Barrier(clients)
    answers: dict[int, tuple[str, int]] = {}
    failures: list[BaseException] = []

    def client(i: int) -> None:
        name = names[i % len(names)]
        barrier.wait()
        try:
            for _ in range(3):
                response = classifier.Classify(classify_request(photos[name], top_k=1), timeout=60)
                assert response.results[0].image_id == "img0"
                answers[i] = (name, top1(response))
                if answers[i][1] != expected[name]:
                    return
        except BaseException as exc:  # surfaced below: an assert in a thread would not fail the test
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert len(answers) == clients
    assert all(got == expected[name] for name, got in answers.values()), answers
    after = scrape(server.metrics_url)
    labels = {"model": "efficientnet_lite0", "version": "1"}
    batches = metric_value(after, "vision_inference_batch_size_count", **labels) - metric_value(
        before, "vision_inference_batch_size_count", **labels
    )
    images = metric_value(after, "vision_inference_batch_size_sum", **labels) - metric_value(
        before, "vision_inference_batch_size_sum", **labels
    )
    assert images == clients * 3
    assert batches < images, f"{images:.0f} images ran in {batches:.0f} forward passes: no batching happened"
    one_image_batches = metric_value(after, "vision_inference_batch_size_bucket", le="1.0", **labels) - metric_value(
        before, "vision_inference_batch_size_bucket", le="1.0", **labels
    )
    assert one_image_batches < batches


def test_metrics_move_after_requests(classifier, server, photos):
    before = scrape(server.metrics_url)
    classifier.Classify(classify_request(photos["coffee.jpg"], photos["chelsea.jpg"]), timeout=60)
    with pytest.raises(grpc.RpcError):
        classifier.Classify(classify_request(b""), timeout=60)
    after = scrape(server.metrics_url)
    ok = {"service": "vision.v1.Classification", "method": "Classify", "code": "OK"}
    bad = {**ok, "code": "INVALID_ARGUMENT"}
    assert metric_value(after, "vision_requests_total", **ok) - metric_value(before, "vision_requests_total", **ok) == 1
    assert metric_value(after, "vision_requests_total", **bad) - metric_value(before, "vision_requests_total", **bad) == 1
    images = {"service": "vision.v1.Classification", "model": "efficientnet_lite0"}
    assert metric_value(after, "vision_images_total", **images) - metric_value(before, "vision_images_total", **images) == 2
    for stage in ("decode", "preprocess", "inference", "queue"):
        assert metric_value(after, "vision_stage_duration_seconds_count", stage=stage) > metric_value(
            before, "vision_stage_duration_seconds_count", stage=stage
        )
    assert metric_value(after, "vision_request_duration_seconds_count", method="Classify") > 0
    assert metric_value(after, "vision_model_info", model="efficientnet_lite0", backend="onnxruntime") == 1
    assert "vision_requests_in_flight" in after and "process_resident_memory_bytes" in after


def test_health_check_reports_serving(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "vision.v1.Classification"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        stub.Check(health_pb2.HealthCheckRequest(service="vision.v1.Nope"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_server_reflection_lists_services(channel):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {"vision.v1.Classification", "grpc.health.v1.Health"} <= services
    method = db.FindFileContainingSymbol("vision.v1.Classification")
    assert method.package == "vision.v1"


def test_classify_cli_prints_classes_model_and_errors(server, photos, tmp_path):
    import subprocess
    import sys

    (tmp_path / "coffee.jpg").write_bytes(photos["coffee.jpg"])
    (tmp_path / "chelsea.png").write_bytes(photos["chelsea.png"])
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    cli = [sys.executable, "-m", "vision.cli"]
    ok = subprocess.run(
        [*cli, "classify", str(tmp_path / "coffee.jpg"), str(tmp_path / "chelsea.png"), "--top-k", "5", "--target", server.address],
        capture_output=True, text=True, timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[0] == "model efficientnet_lite0 version 1"
    assert "967  espresso" in lines[2] and lines[2].lstrip().startswith("1.")
    assert sum(1 for line in lines if line.lstrip()[:2] in {f"{i}." for i in range(1, 6)}) == 10
    bad = subprocess.run(
        [*cli, "classify", str(tmp_path / "broken.jpg"), "--target", server.address], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "image 0" in bad.stderr
    models = subprocess.run([*cli, "models", "--target", server.address], capture_output=True, text=True, timeout=120)
    assert models.returncode == 0 and "efficientnet_lite0:1" in models.stdout and "backend=onnxruntime" in models.stdout
