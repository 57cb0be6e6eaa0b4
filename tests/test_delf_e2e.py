"""vision.v1.Delf through real `vision serve` processes, real gRPC clients and the `vision` CLI.

Two servers: the session's embedded default (EfficientNet-Lite0, pretrained, scored by feature L2 norm),
and one started here for this module hosting only Delf with a DELF ResNet-50 (attention head, seeded random
weights, threshold 0) and EfficientNet-Lite0 with a PCA fitted by `vision fit-delf-pca` against the first
server. Images are kept small (longer side 384-741 px) so the pyramids stay cheap on 2 CPUs.
"""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServerProcess, encode, metric_value, photo, scrape
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from vision.tasks.delf import REFERENCE_SCALES
from vision.v1 import common_pb2, delf_pb2, delf_pb2_grpc

SIDE = 512  # cap of the longer side in most requests here: the 741 x 500 stereo pair at 512 x 345


def jpeg(img: Image.Image) -> bytes:
    return encode(img, "JPEG", quality=92)


@pytest.fixture(scope="module")
def pair() -> dict[str, bytes]:
    return {
        "left": jpeg(photo("motorcycle_left.png")),
        "right": jpeg(photo("motorcycle_right.png")),
        "coffee": jpeg(photo("coffee.png")),
    }


@pytest.fixture(scope="module")
def delf(server) -> delf_pb2_grpc.DelfStub:
    # DELF answers are large (1000 keypoints x 112 floats per image): more than gRPC's 4 MB default.
    with grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", 1 << 28)]) as channel:
        yield delf_pb2_grpc.DelfStub(channel)


@pytest.fixture(scope="module")
def channel(server) -> grpc.Channel:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def images(*contents: bytes) -> list[common_pb2.Image]:
    return [common_pb2.Image(id=f"img{i}", content=c) for i, c in enumerate(contents)]


def options(**kwargs: object) -> delf_pb2.DelfExtractOptions:
    return delf_pb2.DelfExtractOptions(**{"max_image_side": SIDE, **kwargs})


def extract(stub, *contents: bytes, model: str = "", timeout: float = 120, **kwargs: object) -> delf_pb2.DelfExtractResponse:
    request = delf_pb2.DelfExtractRequest(model=common_pb2.ModelSelector(name=model), images=images(*contents), options=options(**kwargs))
    return stub.Extract(request, timeout=timeout)


def side(content: bytes | None = None, features: delf_pb2.DelfFeatures | None = None) -> delf_pb2.DelfMatchInput:
    if features is not None:
        return delf_pb2.DelfMatchInput(features=features)
    return delf_pb2.DelfMatchInput(image=common_pb2.Image(id="", content=content))


def match(stub, a, b, *, model: str = "", timeout: float = 120, **kwargs: object) -> delf_pb2.DelfMatchResponse:
    request = delf_pb2.DelfMatchRequest(
        model=common_pb2.ModelSelector(name=model), a=a, b=b, extract_options=options(), **kwargs
    )
    return stub.Match(request, timeout=timeout)


def descriptors(features: delf_pb2.DelfFeatures) -> np.ndarray:
    return np.frombuffer(features.descriptors, dtype="<f4").reshape(len(features.keypoints), features.descriptor_dim)


def status_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


# --------------------------------------------------------------------------------------
# The embedded default: EfficientNet-Lite0, L2-norm scores
# --------------------------------------------------------------------------------------


def test_extract_returns_the_reference_shaped_features_of_a_real_photo(delf, pair):
    response = extract(delf, pair["left"], max_image_side=1024)
    assert (response.model.name, response.model.version) == ("efficientnet_lite0", "1")
    (result,) = response.results
    f = result.features
    assert result.image_id == "img0" and (f.image_width, f.image_height) == (741, 500)
    assert len(f.keypoints) == 1000 and f.descriptor_dim == 112 and (f.model.name, f.model.version) == ("efficientnet_lite0", "1")
    scores = np.array([k.score for k in f.keypoints])
    assert (np.diff(scores) <= 0).all() and scores[-1] > 0
    xy = np.array([(k.x, k.y) for k in f.keypoints])
    assert (xy >= 0).all() and (xy[:, 0] <= 740).all() and (xy[:, 1] <= 499).all()
    # Keypoints come from the pyramid's levels; scale = 1 / level scale (the image is under the 1024 cap).
    inverse = np.array([k.scale for k in f.keypoints])
    assert (np.abs(inverse[:, None] * np.array(REFERENCE_SCALES)[None] - 1).min(axis=1) < 3e-3).all()
    assert len(np.unique(np.round(inverse, 3))) >= 5
    np.testing.assert_allclose(np.linalg.norm(descriptors(f), axis=1), 1.0, rtol=1e-5)


def test_stereo_pair_verifies_with_many_more_inliers_than_unrelated_photos(delf, pair):
    stereo = match(delf, side(pair["left"]), side(pair["right"]))
    unrelated = match(delf, side(pair["left"]), side(pair["coffee"]))
    assert stereo.inliers >= 300 and stereo.inliers >= 5 * max(unrelated.inliers, 1), (stereo.inliers, unrelated.inliers)
    assert stereo.putative_matches >= stereo.inliers and stereo.keypoints_a == stereo.keypoints_b == 1000
    # The stereo pair differs by a horizontal shift: the verified transform is close to a translation.
    m = np.array(stereo.transform).reshape(2, 3)
    np.testing.assert_allclose(m[:, :2], np.eye(2), atol=0.15)
    # The correspondences agree with that transform (RANSAC's residual threshold is 20 px; the returned
    # transform is refitted on all inliers, so a few drift past it).
    a = np.array([(c.a_x, c.a_y) for c in stereo.correspondences])
    b = np.array([(c.b_x, c.b_y) for c in stereo.correspondences])
    residuals = np.linalg.norm(a @ m[:, :2].T + m[:, 2] - b, axis=1)
    assert len(a) == stereo.inliers and np.percentile(residuals, 95) < 20


def test_an_image_against_its_rotated_and_scaled_copy(delf, pair):
    left = photo("motorcycle_left.png")
    angle, scale = np.deg2rad(12.0), 0.85
    width, height = left.size
    centre = np.array([width / 2, height / 2])
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shift = centre - linear @ centre + np.array([10.0, -6.0])  # b = linear @ a + shift
    inverse = np.linalg.inv(linear)
    # PIL's affine maps output pixel centres back to input ones: a = inverse @ (b - shift).
    back = -inverse @ shift
    coefficients = (inverse[0, 0], inverse[0, 1], back[0], inverse[1, 0], inverse[1, 1], back[1])
    moved = left.transform(left.size, Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR, fillcolor=(124, 116, 104))
    response = match(delf, side(pair["left"]), side(jpeg(moved)))
    assert response.inliers >= 200, response.inliers
    estimated = np.array(response.transform).reshape(2, 3)
    np.testing.assert_allclose(estimated[:, :2], linear, atol=0.03)
    corners = np.array([[0, 0], [width, 0], [0, height], [width, height]], dtype=float)
    mapped = corners @ estimated[:, :2].T + estimated[:, 2]
    assert np.abs(mapped - (corners @ linear.T + shift)).max() < 8.0


def test_feature_sets_passed_back_match_like_the_images(delf, pair):
    extracted = extract(delf, pair["left"], pair["right"])
    a, b = (r.features for r in extracted.results)
    from_images = match(delf, side(pair["left"]), side(pair["right"]))
    from_features = match(delf, side(features=a), side(features=b))
    assert from_features.inliers == from_images.inliers and from_features.model.name == "efficientnet_lite0"
    assert list(from_features.transform) == pytest.approx(list(from_images.transform))
    mixed = match(delf, side(features=a), side(pair["right"]), return_features=True)
    assert mixed.inliers == from_images.inliers
    assert mixed.features_a == a and len(mixed.features_b.keypoints) == 1000


def test_receptive_field_centres_land_on_a_bright_spot_at_every_scale(delf):
    """A single bright spot on the preset's mean colour (which is what zero padding looks like to the
    model), drawn 8 pixels wide at the level under test; each request asks for that level (with level
    0.7071 when it alone would be smaller than the 339-px receptive field, which gives no keypoints). The
    level's best keypoint lands within one stride of that level (16 level px) of the spot along each axis."""
    width, height = 640, 480
    background = np.array([124, 116, 104], np.uint8)  # ImageNet mean: the torchvision preset's zero
    for cx, cy in ((0.6 * width, 0.35 * height), (0.2 * width, 0.7 * height)):
        for scale in REFERENCE_SCALES:
            radius = 8 / scale
            yy, xx = np.mgrid[0:height, 0:width]
            pixels = np.broadcast_to(background, (height, width, 3)).copy()
            pixels[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2] = 255
            scales = [scale] if width * scale >= 339 else [scale, 0.7071]
            response = extract(delf, encode(Image.fromarray(pixels), "PNG"), scales=scales,
                               max_keypoints=10_000, max_image_side=1024)
            keypoints = response.results[0].features.keypoints
            best = max((k for k in keypoints if abs(k.scale * scale - 1) < 0.01), key=lambda k: k.score)
            stride = 16 / scale
            assert abs(best.x - cx) <= stride and abs(best.y - cy) <= stride, (scale, best, (cx, cy))


def test_tiny_and_small_images_give_zero_keypoints_not_errors(delf, pair):
    one = encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG")
    small = jpeg(photo("coffee.png").resize((150, 100)))  # smaller than the 339-px receptive field
    # One coarse level of a real photo: 185 px < 339 px, no keypoints either (the forward pass still runs).
    coarse = extract(delf, pair["left"], scales=[0.25], max_image_side=741)
    assert len(coarse.results[0].features.keypoints) == 0
    response = extract(delf, one, small, pair["left"])
    counts = [len(r.features.keypoints) for r in response.results]
    assert counts[:2] == [0, 0] and counts[2] == 1000
    sizes = [(r.features.image_width, r.features.image_height) for r in response.results]
    assert sizes == [(1, 1), (150, 100), (741, 500)]
    assert all(r.features.descriptor_dim == 112 for r in response.results)
    alone = extract(delf, one)
    assert len(alone.results[0].features.keypoints) == 0 and alone.model.name == "efficientnet_lite0"
    nothing = match(delf, side(one), side(pair["left"]))
    assert (nothing.inliers, nothing.putative_matches, len(nothing.transform)) == (0, 0, 0)


def test_exif_orientation_is_applied_before_extraction(delf):
    img = photo("coffee.png").resize((400, 300))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    f = extract(delf, buf.getvalue()).results[0].features
    assert (f.image_width, f.image_height) == (300, 400)
    xy = np.array([(k.x, k.y) for k in f.keypoints])
    assert len(xy) and xy[:, 0].max() <= 299 and xy[:, 1].max() <= 399


def _exif_jpeg(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_each_image_reports_its_decoded_upright_size_in_every_format(delf):
    """The sizes come from the data plane's decode (EXIF orientation applied), tiny images' too."""
    img = photo("motorcycle_left.png").resize((123, 77))
    contents = [encode(img, fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP")]
    contents += [_exif_jpeg(img, 6), _exif_jpeg(img, 3), _exif_jpeg(img.resize((5, 3)), 6)]
    response = extract(delf, *contents)
    sizes = [(r.features.image_width, r.features.image_height) for r in response.results]
    assert sizes == [(123, 77)] * 5 + [(77, 123), (123, 77), (3, 5)]


def test_list_models_says_how_each_model_extracts(delf):
    (model,) = delf.ListModels(common_pb2.ListModelsRequest(), timeout=10).models
    assert model.model.name == "efficientnet_lite0" and model.model.architecture == "efficientnet_lite0"
    assert (model.layer, model.stride, model.receptive_field, model.padding) == ("blocks.4", 16, 339, 169)
    assert (model.scoring, model.score_threshold, model.max_image_side) == ("l2_norm", 0.0, 1024)
    assert (model.descriptor_dim, model.pca_dim) == (112, 0)


def test_health_and_reflection_list_the_delf_service(channel):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="vision.v1.Delf"), timeout=10)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert "vision.v1.Delf" in set(ProtoReflectionDescriptorDatabase(channel).get_services())


# --------------------------------------------------------------------------------------
# Bad input: INVALID_ARGUMENT naming the image or parameter; the server keeps serving
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"scales": [-1.0]}, "scales"),
    ({"scales": [1.0] * 13}, "scales"),
    ({"scales": [4.0], "max_image_side": 1024}, "largest pyramid level"),
    ({"max_keypoints": 0}, "max_keypoints"),
    ({"max_image_side": 4096}, "over this model's cap of 1024"),
    ({"max_image_side": 5}, "max_image_side"),
    ({"nms_iou": 1.5}, "nms_iou"),
    ({"score_threshold": float("nan")}, "score_threshold"),
])
def test_bad_extract_options(delf, pair, kwargs, message):
    code, details = status_of(lambda: extract(delf, pair["left"], **kwargs))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details


def test_bad_images_are_named_by_their_index_in_the_request(delf, pair):
    one = encode(Image.new("RGB", (1, 1)), "PNG")
    code, details = status_of(lambda: extract(delf, one, pair["left"], b"not an image"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("image 2 (id 'img2'): not a decodable image")
    noise = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    whole = encode(Image.fromarray(noise), "PNG")
    code, details = status_of(lambda: extract(delf, pair["left"], whole[: len(whole) // 2 + 10]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("image 1 (id 'img1'): corrupt or truncated")
    code, details = status_of(lambda: extract(delf, b""))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "image 0" in details and "empty" in details
    code, details = status_of(lambda: delf.Extract(delf_pb2.DelfExtractRequest(), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no images" in details
    code, details = status_of(lambda: extract(delf, *[one] * 33))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "33 images" in details
    # 20 x 10000 keypoints of 112 floats would not fit the 64 MiB response limit: refused before any work.
    code, details = status_of(lambda: extract(delf, *[pair["left"]] * 20, max_keypoints=10_000))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "response limit" in details and "PCA" in details


def test_unknown_models_are_not_found(delf, pair):
    code, details = status_of(lambda: extract(delf, pair["left"], model="nope"))
    assert code == grpc.StatusCode.NOT_FOUND and "efficientnet_lite0" in details


def test_bad_match_requests(delf, pair):
    good = extract(delf, pair["left"]).results[0].features
    cases = [
        (delf_pb2.DelfMatchRequest(a=side(pair["left"])), "b: give an image or features"),
        (delf_pb2.DelfMatchRequest(a=side(b"junk"), b=side(pair["left"])), "a.image: not a decodable image"),
        (delf_pb2.DelfMatchRequest(a=side(pair["left"]), b=side(b"")), "b.image: empty image payload"),
        (delf_pb2.DelfMatchRequest(a=side(features=good), b=side(features=delf_pb2.DelfFeatures(
            descriptor_dim=112, descriptors=b"\x00" * 12, keypoints=[delf_pb2.DelfKeypoint()]))), "b.features: descriptors has 12 bytes"),
        (delf_pb2.DelfMatchRequest(a=side(features=delf_pb2.DelfFeatures(
            descriptor_dim=1, descriptors=np.array([np.nan], "<f4").tobytes(), keypoints=[delf_pb2.DelfKeypoint()])), b=side(features=good)),
         "a.features: keypoints and descriptors must be finite"),
        (delf_pb2.DelfMatchRequest(a=side(features=good), b=side(pair["right"]), options=delf_pb2.DelfMatchOptions(max_trials=0)), "max_trials"),
        (delf_pb2.DelfMatchRequest(a=side(pair["left"]), b=side(pair["right"]), extract_options=delf_pb2.DelfExtractOptions(max_keypoints=0)), "max_keypoints"),
    ]
    other = delf_pb2.DelfFeatures()
    other.CopyFrom(good)
    other.model.name = "another"
    cases.append((delf_pb2.DelfMatchRequest(a=side(features=good), b=side(features=other)), "different models"))
    narrow = delf_pb2.DelfFeatures(descriptor_dim=2, descriptors=np.ones((1, 2), "<f4").tobytes(), keypoints=[delf_pb2.DelfKeypoint()])
    cases.append((delf_pb2.DelfMatchRequest(a=side(features=good), b=side(features=narrow)), "112-d descriptors and b 2-d"))
    for request, message in cases:
        code, details = status_of(lambda: delf.Match(request, timeout=60))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, (message, details)
    # Still serving.
    assert match(delf, side(features=good), side(features=good)).inliers >= 500


def test_deadline_fault_drops_the_pyramid_and_the_server_keeps_serving(delf, server, pair):
    """A client gives up on a heavy pyramid (four 741 x 500 images at scales up to 2, 56 forward passes):
    the server records DEADLINE_EXCEEDED, drops the queued levels, and answers the next request."""
    expired = {"service": "vision.v1.Delf", "method": "Extract", "code": "DEADLINE_EXCEEDED"}
    before = metric_value(scrape(server.metrics_url), "vision_requests_total", **expired)
    heavy = delf_pb2.DelfExtractRequest(images=images(pair["left"], pair["right"], pair["coffee"], pair["left"]))
    recorded = False
    for timeout in (0.3, 0.6, 1.2):
        code, _ = status_of(lambda: delf.Extract(heavy, timeout=timeout))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 30
        while not recorded and time.monotonic() < deadline:
            recorded = metric_value(scrape(server.metrics_url), "vision_requests_total", **expired) > before
            time.sleep(0.1)
        if recorded:
            break
    assert recorded, "the server never recorded the expired Extract"
    assert len(extract(delf, pair["coffee"], max_image_side=384).results[0].features.keypoints) > 0


def test_cancelled_matches_do_not_disturb_others(delf, pair):
    """Clients that cancel mid-request while another client matches: the survivor gets its full answer."""
    results: list[int] = []

    def survivor() -> None:
        results.append(match(delf, side(pair["left"]), side(pair["right"])).inliers)

    thread = threading.Thread(target=survivor)
    thread.start()
    for _ in range(3):
        future = delf.Match.future(delf_pb2.DelfMatchRequest(a=side(pair["left"]), b=side(pair["coffee"])), timeout=60)
        time.sleep(0.2)
        future.cancel()
    thread.join(timeout=180)
    assert results and results[0] >= 300


def test_requests_are_counted_by_status(server, delf, pair):
    text = scrape(server.metrics_url)
    assert metric_value(text, "vision_requests_total", service="vision.v1.Delf", method="Extract", code="OK") > 0
    assert metric_value(text, "vision_requests_total", service="vision.v1.Delf", method="Extract", code="INVALID_ARGUMENT") > 0
    assert metric_value(text, "vision_requests_total", service="vision.v1.Delf", method="Match", code="OK") > 0
    assert metric_value(text, "vision_images_total", service="vision.v1.Delf", model="efficientnet_lite0") > 0


def test_keypoints_inliers_and_match_time_are_exported(server, delf, pair):
    labels = {"model": "efficientnet_lite0", "version": "1"}

    def sample(name: str, **extra: str) -> float:
        return metric_value(scrape(server.metrics_url), name, **labels, **extra)

    names = ("vision_delf_keypoints_per_image_count", "vision_delf_keypoints_per_image_sum",
             "vision_delf_inliers_per_match_count", "vision_delf_inliers_per_match_sum")
    before = {n: sample(n) for n in names}
    match_time = sample("vision_stage_duration_seconds_count", stage="delf_match")
    extracted = extract(delf, pair["left"], encode(Image.new("RGB", (1, 1)), "PNG"))
    matched = match(delf, side(pair["left"]), side(pair["right"]), return_features=True)
    after = {n: sample(n) for n in names}
    # Extract: the photo's 1000 keypoints and a 1x1 image's 0; Match: both image sides' keypoints.
    assert [len(r.features.keypoints) for r in extracted.results] == [1000, 0]
    sides = len(matched.features_a.keypoints) + len(matched.features_b.keypoints)
    assert after[names[0]] - before[names[0]] == 4
    assert after[names[1]] - before[names[1]] == 1000 + sides
    assert after[names[2]] - before[names[2]] == 1
    assert after[names[3]] - before[names[3]] == matched.inliers >= 300
    assert sample("vision_stage_duration_seconds_count", stage="delf_match") == match_time + 1
    # Matching 1000 x 1000 keypoints is RANSAC's 1000 trials: well under the 30 s top bucket.
    assert sample("vision_stage_duration_seconds_bucket", stage="delf_match", le="30.0") == match_time + 1
    text = scrape(server.metrics_url)
    assert 'vision_delf_keypoints_per_image_bucket{le="0.0",model="efficientnet_lite0",version="1"}' in text


def test_a_retired_versions_delf_series_are_removed():
    # What ModelRepository.retire calls (tests/test_live_models.py drives a real retirement).
    from prometheus_client import generate_latest
    from vision.core import metrics

    for version in ("7", "8"):
        metrics.DELF_KEYPOINTS.labels(model="delf_retire", version=version).observe(1000)
        metrics.DELF_INLIERS.labels(model="delf_retire", version=version).observe(40)
        metrics.STAGE_LATENCY.labels(stage="delf_match", model="delf_retire", version=version).observe(0.2)
    metrics.forget_model("delf_retire", "7")
    text = generate_latest().decode()
    assert 'model="delf_retire",version="7"' not in text
    for name in ("vision_delf_keypoints_per_image_count", "vision_delf_inliers_per_match_count"):
        assert metric_value(text, name, model="delf_retire", version="8") == 1
    assert metric_value(text, "vision_stage_duration_seconds_count", stage="delf_match", model="delf_retire", version="8") == 1


# --------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------


def vision(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vision.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_extracts_saves_and_matches_with_a_figure(server, pair, tmp_path):
    for name in ("left", "right"):
        (tmp_path / f"{name}.jpg").write_bytes(pair[name])
    target = ["--target", server.address, "--max-image-side", str(SIDE)]
    done = vision("delf-extract", str(tmp_path / "left.jpg"), "--save", str(tmp_path / "saved"), "--show", "3", *target)
    assert done.returncode == 0, done.stderr
    assert "left.jpg: 741x500, 1000 keypoints, 112-d descriptors" in done.stdout and "saved" in done.stdout
    saved = tmp_path / "saved" / "left.delf.npz"
    assert saved.is_file()
    done = vision("match", str(tmp_path / "left.jpg"), str(tmp_path / "right.jpg"), "--out", str(tmp_path / "m.png"), *target)
    assert done.returncode == 0, done.stderr
    inliers = int(done.stdout.split("inliers ")[1].split()[0])
    assert inliers >= 300 and "affine a->b" in done.stdout and "wrote" in done.stdout
    with Image.open(tmp_path / "m.png") as figure:
        assert figure.size[1] == 600 and figure.size[0] > 2 * 600  # both images side by side at one height
    # Saved features on one side: the same inliers as the images.
    done = vision("delf-match", str(saved), str(tmp_path / "right.jpg"), *target)
    assert done.returncode == 0 and f"inliers {inliers}" in done.stdout, done.stdout + done.stderr
    done = vision("delf-match", str(saved), str(tmp_path / "right.jpg"), "--out", str(tmp_path / "x.png"), *target)
    assert done.returncode == 2 and "features file" in done.stderr
    done = vision("delf-extract", str(tmp_path / "missing.jpg"), *target)
    assert done.returncode == 2 and "cannot read" in done.stderr
    done = vision("delf-extract", str(tmp_path / "left.jpg"), "--max-keypoints", "0", *target)
    assert done.returncode == 1 and "INVALID_ARGUMENT" in done.stderr and "max_keypoints" in done.stderr
    listed = vision("models", "--target", server.address)
    assert listed.returncode == 0 and "delf(blocks.4,l2_norm)" in listed.stdout, listed.stdout + listed.stderr
    usage = vision("delf-match", "--help").stdout
    assert "RANSAC" in usage and "--out" in usage and "(default 120)" in usage


@pytest.fixture(scope="module")
def tiny_retrieval(tmp_path_factory) -> Path:
    """Three queries of the generated retrieval benchmark with their 21 database copies and three
    distractors: small enough for DELF on every shortlisted image in a few seconds."""
    import json
    import shutil

    from loadtest.retrieval_bench import generate

    full = tmp_path_factory.mktemp("retrieval-full")
    generate(full)
    root = tmp_path_factory.mktemp("retrieval-tiny")
    for folder in ("jpg", "queries", "gt"):
        (root / folder).mkdir()
    for stem in ("astronaut", "rocket", "camera"):
        shutil.copy(full / "queries" / f"q_{stem}.jpg", root / "queries")
        for gt_file in (full / "gt").glob(f"{stem}_*.txt"):
            shutil.copy(gt_file, root / "gt")
        for image in (full / "jpg").glob(f"{stem}_*.jpg"):
            shutil.copy(image, root / "jpg")
    for name in ("distractor_coffee_0", "distractor_horse_0", "distractor_chelsea_0"):
        shutil.copy(full / "jpg" / f"{name}.jpg", root / "jpg")
    assert len(list((root / "jpg").iterdir())) == 24, json.dumps(sorted(p.name for p in (root / "jpg").iterdir()))
    return root


def test_eval_retrieval_reranks_the_shortlist_by_delf_inliers(server, tiny_retrieval):
    import json

    bench = ["--images", str(tiny_retrieval / "jpg"), "--queries", str(tiny_retrieval / "queries"),
             "--gt", str(tiny_retrieval / "gt"), "--target", server.address]
    done = vision("eval-retrieval", *bench, "--rerank", "5", "--timeout", "120")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["queries"], report["database_images"]) == (3, 24)
    rerank = report["rerank"]
    assert rerank["top"] == 5 and rerank["delf_model"]["name"] == "efficientnet_lite0"
    # Each shortlisted image is extracted once: at most 3 queries x 5, at least one query's 5.
    assert 5 <= rerank["database_images_extracted"] <= 15
    before, after = report["scores"]["oxford"]["mAP"], rerank["scores"]["oxford"]["mAP"]
    assert 0 < before <= 100 and 0 < after <= 100
    assert rerank["mAP_change"]["oxford"] == pytest.approx(after - before, abs=0.01)
    # Only the top 5 move: precision at 1 is a property of the head, and all three photos are easy to
    # verify geometrically, so DELF keeps a true copy first for every query.
    assert rerank["scores"]["oxford"]["mP@1"] == 100.0
    # A model the server does not have: the Delf service's NOT_FOUND, before any Features work.
    done = vision("eval-retrieval", *bench, "--rerank", "5", "--delf-model", "no_such_model")
    assert done.returncode == 1 and "NOT_FOUND" in done.stderr and "no_such_model" in done.stderr, done.stderr
    done = vision("eval-retrieval", *bench, "--rerank", "-1")
    assert done.returncode == 2 and "--rerank must be 0" in done.stderr, done.stderr
    assert "--delf-model" in vision("eval-retrieval", "--help").stdout


# --------------------------------------------------------------------------------------
# A DELF ResNet-50 with its attention head, and a served PCA (a server of this module)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pca_file(server, tmp_path_factory) -> Path:
    """`vision fit-delf-pca` through the session's server on six scikit-image photos."""
    root = tmp_path_factory.mktemp("delf-pca")
    photos = root / "photos"
    photos.mkdir()
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png"):
        photo(name).save(photos / (Path(name).stem + ".jpg"), quality=90)
    out = root / "pca.npz"
    done = vision("fit-delf-pca", "--images", str(photos), "--out", str(out), "--target", server.address, "--max-image-side", "384")
    assert done.returncode == 0, done.stderr
    assert "fitted a 40-d PCA of 112-d descriptors on 6000 descriptors from 6 images" in done.stdout, done.stdout
    return out


@pytest.fixture(scope="module")
def attention_server(pca_file, tmp_path_factory):
    log = tmp_path_factory.mktemp("delf-server") / "serve.log"
    proc = ServerProcess(
        ["--services", "delf",
         "--model", "arch=delf_resnet50,weights=random,delf_score_threshold=0,name=delf,version=3",
         "--model", f"arch=efficientnet_lite0,name=lite_pca,delf_pca={pca_file}"],
        log,
    ).wait_ready(timeout=300)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def delf_b(attention_server) -> delf_pb2_grpc.DelfStub:
    ch = grpc.insecure_channel(attention_server.address, options=[("grpc.max_receive_message_length", 1 << 28)])
    yield delf_pb2_grpc.DelfStub(ch)
    ch.close()


def test_attention_model_extracts_with_its_attention_scores(delf_b, attention_server, pair):
    listed = {m.model.name: m for m in delf_b.ListModels(common_pb2.ListModelsRequest(), timeout=10).models}
    d = listed["delf"]
    assert (d.layer, d.receptive_field, d.stride, d.padding, d.scoring) == ("layer3", 267, 16, 133, "attention")
    assert d.model.preprocessing.preset == "delf" and d.model.random_weights and d.descriptor_dim == 1024
    assert [o.name for o in d.model.outputs] == ["embedding", "attention", "layer3"]
    listed = vision("models", "--target", attention_server.address)
    assert listed.returncode == 0 and "delf:3  arch=delf_resnet50 task=features" in listed.stdout, listed.stdout + listed.stderr
    assert "services=delf(layer3,attention)" in listed.stdout
    response = extract(delf_b, pair["left"], model="delf", max_image_side=384)
    assert (response.model.name, response.model.version) == ("delf", "3")
    f = response.results[0].features
    assert len(f.keypoints) == 1000 and f.descriptor_dim == 1024
    # Random weights: softplus scores are small, so the reference threshold of 100 keeps nothing.
    strict = extract(delf_b, pair["left"], model="delf", max_image_side=384, score_threshold=100.0)
    assert len(strict.results[0].features.keypoints) == 0
    stereo = match(delf_b, side(pair["left"]), side(pair["right"]), model="delf")
    assert stereo.inliers >= 100


def test_served_pca_gives_40_d_unit_descriptors_that_still_match(delf_b, pair):
    listed = {m.model.name: m for m in delf_b.ListModels(common_pb2.ListModelsRequest(), timeout=10).models}
    assert (listed["lite_pca"].descriptor_dim, listed["lite_pca"].pca_dim, listed["lite_pca"].pca_whitening) == (40, 40, False)
    f = extract(delf_b, pair["left"], model="lite_pca").results[0].features
    assert f.descriptor_dim == 40
    np.testing.assert_allclose(np.linalg.norm(descriptors(f), axis=1), 1.0, rtol=1e-5)
    raw = extract(delf_b, pair["left"], model="lite_pca", skip_pca=True).results[0].features
    assert raw.descriptor_dim == 112
    stereo = match(delf_b, side(pair["left"]), side(pair["right"]), model="lite_pca")
    unrelated = match(delf_b, side(pair["left"]), side(pair["coffee"]), model="lite_pca")
    assert stereo.inliers >= 300 and stereo.inliers >= 5 * max(unrelated.inliers, 1), (stereo.inliers, unrelated.inliers)
    # Features of one model matched against an image extracted by another: refused, not compared.
    code, details = status_of(lambda: match(delf_b, side(features=f), side(pair["right"]), model="delf"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "lite_pca version 1" in details


def test_a_bad_pca_file_stops_start_up_with_its_name(tmp_path):
    bad = tmp_path / "pca.npz"
    bad.write_bytes(b"not numpy")
    done = vision("serve", "--port", "0", "--metrics-port", "0", "--services", "delf",
                  "--model", f"arch=efficientnet_lite0,delf_pca={bad}", timeout=120)
    assert done.returncode == 1 and str(bad) in done.stderr and "not readable" in done.stderr


# --------------------------------------------------------------------------------------
# Configured limits apply to DELF like to every service (the servicer goes through the data plane)
# --------------------------------------------------------------------------------------

PIXEL_LIMIT = 400_000  # the 741 x 500 stereo photos (370,500 pixels) fit


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("delf-limited") / "serve.log"
    proc = ServerProcess(
        ["--services", "delf", "--max-image-pixels", str(PIXEL_LIMIT), "--max-images-per-request", "4"], log
    ).wait_ready(timeout=300)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def delf_limited(limited_server) -> delf_pb2_grpc.DelfStub:
    ch = grpc.insecure_channel(limited_server.address, options=[("grpc.max_receive_message_length", 1 << 28)])
    yield delf_pb2_grpc.DelfStub(ch)
    ch.close()


def test_tiny_images_obey_the_configured_limits_and_mix_with_normal_ones(delf_limited, limited_server, pair):
    labels = {"model": "efficientnet_lite0", "version": "1"}

    def forward_passes() -> float:
        return metric_value(scrape(limited_server.metrics_url), "vision_inference_batch_size_count", **labels)

    one = encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG")
    thin = encode(Image.new("RGB", (3, 40), (0, 0, 255)), "PNG")
    # Mixed in one request: tiny ones answered empty with their sizes, the photo extracted, in request order.
    response = extract(delf_limited, one, pair["left"], thin)
    assert [len(r.features.keypoints) for r in response.results] == [0, 1000, 0]
    assert [(r.features.image_width, r.features.image_height) for r in response.results] == [(1, 1), (741, 500), (3, 40)]
    assert [r.image_id for r in response.results] == ["img0", "img1", "img2"]
    # Only tiny images: answered by the model, without a forward pass.
    before = forward_passes()
    alone = extract(delf_limited, one, thin)
    assert [len(r.features.keypoints) for r in alone.results] == [0, 0] and alone.model.name == "efficientnet_lite0"
    assert forward_passes() == before
    # A tiny image is still held to the server's pixel limit (4 x 120,000: a 3-KB PNG)...
    long = encode(Image.new("RGB", (4, 120_000), (10, 20, 30)), "PNG")
    code, details = status_of(lambda: extract(delf_limited, pair["left"], long))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"image 1 (id 'img1'): image is 4x120000 = 480000 pixels, over the {PIXEL_LIMIT}-pixel limit")
    code, details = status_of(lambda: match(delf_limited, side(pair["left"]), side(long)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("b.image: image is 4x120000")
    # ... as a large one is, and to its image count per request.
    big = jpeg(photo("motorcycle_left.png").resize((1000, 500)))
    code, details = status_of(lambda: extract(delf_limited, one, big))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("image 1 (id 'img1'): image is 1000x500")
    code, details = status_of(lambda: extract(delf_limited, *[one] * 5))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "5 images, over the limit of 4" in details
    # A corrupt tiny image is refused, naming it.
    noise = np.random.default_rng(0).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    whole = encode(Image.fromarray(noise), "PNG")
    code, details = status_of(lambda: extract(delf_limited, one, whole[: len(whole) // 2 + 10]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("image 1 (id 'img1'): corrupt or truncated")
