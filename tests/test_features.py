"""Features: poolings and whitening against values computed by hand, the retrieval protocol's AP, and the
service end to end (real server, real photos, the pretrained EfficientNet-Lite0)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import grpc
import numpy as np
import pytest
from PIL import Image

from conftest import ServerProcess, encode, metric_value, photo, scrape
from vision.core.errors import InvalidArgument
from vision.api.codec import decode_descriptor
from vision.tasks import features as F
from vision.evaluation.retrieval import (
    GroundTruth,
    Query,
    average_precision,
    evaluate,
    load_ground_truth,
    precision_at,
    protocol_precision_at,
)
from vision.v1 import common_pb2, features_pb2, features_pb2_grpc

# --- poolings ------------------------------------------------------------------------------------------

# Two channels on a 2x3 map.
FMAP = np.array(
    [[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]],
     [[0.0, 0.0, 9.0], [1.0, 0.0, 2.0]]],
    dtype=np.float32,
)


def test_sum_average_max_pooling_by_hand():
    np.testing.assert_allclose(F.spoc(FMAP), [21.0, 12.0])
    np.testing.assert_allclose(F.avg(FMAP), [3.5, 2.0])
    np.testing.assert_allclose(F.mac(FMAP), [6.0, 9.0])


def test_gem_by_hand_equals_avg_at_p1_and_tends_to_max():
    # p = 2: sqrt(mean(x^2)); channel 0: sqrt(91/6).
    np.testing.assert_allclose(F.gem(FMAP, 2.0)[0], np.sqrt(91 / 6), rtol=1e-6)
    np.testing.assert_allclose(F.gem(FMAP, 1.0), F.avg(np.maximum(FMAP, F.GEM_EPS)), rtol=1e-6)
    gaps = [np.abs(F.gem(FMAP, p) - F.mac(FMAP)).max() for p in (3, 10, 30, 64)]
    assert all(a > b for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 0.3


def test_crow_by_hand():
    # Spatial weights: sqrt(S / ||S||), S the channel sum; channel weights log(sum(Q) / Q_k), Q the share of
    # non-zero positions (channel 0: 6/6, channel 1: 3/6).
    summed = FMAP.sum(axis=0)
    spatial = np.sqrt(summed / np.linalg.norm(summed))
    omega = np.log(np.array([1.5 / 1.0, 1.5 / 0.5]))
    expected = omega * (FMAP * spatial).sum(axis=(1, 2))
    np.testing.assert_allclose(F.crow(FMAP), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "height, width, expected",
    [
        # Square: levels 1..3 give 1, 4 and 9 squares of side 10, 6 and 5 (Tolias et al.: 14 regions at L = 3).
        (10, 10, [(0, 0, 10)] + [(t, l, 6) for t in (0, 4) for l in (0, 4)] + [(t, l, 5) for t in (0, 2, 5) for l in (0, 2, 5)]),
        # 10x20: one extra region along the long side gives the overlap nearest 40 % (50 %, against 0 %).
        (10, 20, [(0, l, 10) for l in (0, 5, 10)] + [(t, l, 6) for t in (0, 4) for l in (0, 4, 9, 14)]
         + [(t, l, 5) for t in (0, 2, 5) for l in (0, 3, 7, 11, 15)]),
    ],
)
def test_rmac_region_grid_follows_the_paper(height, width, expected):
    assert F.rmac_regions(height, width) == expected


def test_rmac_sums_the_normalised_region_maxima():
    fmap = np.random.default_rng(0).random((4, 10, 10)).astype(np.float32)
    total = F.l2_normalize(F.mac(fmap))
    for top, left, side in F.rmac_regions(10, 10):
        total = total + F.l2_normalize(F.mac(fmap[:, top : top + side, left : left + side]))
    np.testing.assert_allclose(F.rmac(fmap), total, rtol=1e-6)


# --- whitening -----------------------------------------------------------------------------------------


def test_pca_whitening_round_trip_on_synthetic_data(tmp_path):
    rng = np.random.default_rng(0)
    scales = np.array([10.0, 5.0, 1.0, 0.5, 0.1, 0.05])
    x = rng.standard_normal((2000, 6)) * scales + 3.0
    w = F.fit_pca_whitening("pca", x, dim=4)
    assert (w.input_dim, w.max_dim) == (6, 4)
    white = (x - w.mean) @ w.projection.T
    np.testing.assert_allclose(np.cov(white, rowvar=False), np.eye(4), atol=0.05)
    assert np.all(np.diff(w.eigenvalues) <= 0), "strongest directions first"
    w.save(tmp_path / "pca.npz")
    loaded = F.Whitening.load(tmp_path / "pca.npz")
    np.testing.assert_allclose(loaded.apply(x[:5], 2), w.apply(x[:5], 2), rtol=1e-6)
    assert loaded.apply(x[:5], 2).shape == (5, 2)
    np.testing.assert_allclose(np.linalg.norm(loaded.apply(x[:5]), axis=1), 1.0, rtol=1e-6)


def test_learned_whitening_brings_matching_pairs_together():
    rng = np.random.default_rng(1)
    objects = rng.standard_normal((100, 8))
    nuisance = np.zeros(8)
    nuisance[0] = 1.0  # views of one object differ along a direction that also dominates raw distances
    views = np.concatenate([objects + 6 * rng.standard_normal((100, 1)) * nuisance for _ in range(2)])
    pairs = [(i, i + 100) for i in range(100)]
    w = F.fit_learned_whitening("lw", views, pairs)

    def pair_rank(vectors: np.ndarray) -> float:
        vectors = F.l2_normalize(vectors)
        sims = vectors[:100] @ vectors[100:].T
        return float(np.mean([(sims[i] > sims[i, i]).sum() for i in range(100)]))

    assert pair_rank(w.apply(views)) < pair_rank(views) / 3


# --- the retrieval protocol ------------------------------------------------------------------------------


def test_oxford_ap_by_hand():
    # Ranked a, x, b with positives {a, b}: trapezoids 0.5·(1+1)/2 + 0 + 0.5·(1/2+2/3)/2 = 0.791666...
    assert average_precision(["a", "x", "b"], frozenset("ab"), frozenset()) == pytest.approx(0.5 + 0.5 * (0.5 + 2 / 3) / 2)
    assert average_precision(["j", "a"], frozenset("a"), frozenset("j")) == 1.0  # junk is ignored
    assert average_precision(["x", "a"], frozenset("a"), frozenset()) == pytest.approx(0.25)
    assert np.isnan(average_precision(["a"], frozenset(), frozenset()))


def test_protocol_precision_lowers_k_to_the_last_positive_as_revisitop():
    # revisitop compute_map: pos = 1-based ranks of the positives after junk removal, kq = min(max(pos), k),
    # precision = #(pos <= kq) / kq. Positives at ranks 1 and 3 (junk j removed before counting):
    ranked, positives, junk = ["a", "j", "x", "b", "y", "z"], frozenset("ab"), frozenset("j")
    assert protocol_precision_at(ranked, positives, junk, 1) == 1.0
    assert protocol_precision_at(ranked, positives, junk, 5) == pytest.approx(2 / 3)
    assert protocol_precision_at(ranked, positives, junk, 10) == pytest.approx(2 / 3)
    assert precision_at(ranked, positives, junk, 5) == pytest.approx(2 / 5)  # plain P@5
    # The last positive beyond k: kq = k, the plain precision.
    late = ["a", "x", "y", "z", "w", "v", "b"]
    assert protocol_precision_at(late, positives, frozenset(), 5) == precision_at(late, positives, frozenset(), 5) == 0.2
    assert protocol_precision_at(["x", "y"], positives, frozenset(), 5) == 0.0  # no positive ranked


def test_revisited_settings_and_mean_precision(tmp_path):
    gnd = {"imlist": ["e", "h", "j", "n"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [1], "junk": [2], "bbx": [0, 0, 5, 5]}]}
    (tmp_path / "gnd.json").write_text(json.dumps(gnd))
    gt = load_ground_truth(tmp_path / "gnd.json")
    assert gt.settings == ("easy", "medium", "hard") and gt.queries[0].bbox == (0, 0, 5, 5)
    database = np.eye(4, dtype=np.float32)
    # Ranking h, j, e, n: easy ignores h and j (junk) -> e first: AP 1; hard: h first -> 1; medium: h then e -> 1.
    query = F.l2_normalize(np.array([[0.3, 0.9, 0.6, 0.0]], dtype=np.float32))
    report = evaluate(gt, gt.database, database, query)
    assert report.scores["easy"]["mAP"] == pytest.approx(100.0)
    assert report.scores["hard"]["mAP"] == pytest.approx(100.0)
    assert report.scores["medium"]["mAP"] == pytest.approx(100.0)
    # Medium without junk j ranks h, e, n: both positives by rank 2, so the protocol's k drops to 2 (mP@5 100),
    # while plain P@5 divides by 5.
    assert report.scores["medium"]["mP@5"] == pytest.approx(100.0)
    assert report.scores["medium"]["P@5"] == pytest.approx(40.0)
    # The only positive ranked 4th: precision fell to 0 over three misses, so the trapezoid from (0, 0) to
    # (1, 1/4) gives 1/8 (a step-curve AP would say 1/4).
    last = GroundTruth((), (Query("q", None, {"oxford": (frozenset({"n"}), frozenset())}),), ("oxford",))
    assert evaluate(last, ["e", "h", "j", "n"], database, query).scores["oxford"]["mAP"] == pytest.approx(12.5)


# --- recipes ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite_card():
    from vision.serving.loading import model_card
    from vision.config.settings import ModelConfig, ServeSettings

    return model_card(ModelConfig(arch="efficientnet_lite0"), ServeSettings())[0]


@pytest.mark.parametrize(
    "request_, message",
    [
        (F.FeatureRequest(recipe="vlad"), "unknown recipe 'vlad'.*supports: center, ten_crop, spoc"),
        (F.FeatureRequest(recipe="gem", layer="layer9"), "unknown layer 'layer9'.*its layers: blocks.4, blocks.6, conv_head"),
        (F.FeatureRequest(recipe="mac", whitening="pca"), "unknown whitening 'pca'.*it has: none"),
        (F.FeatureRequest(recipe="mac", gem_p=2), "gem_p applies to recipe 'gem' only"),
        (F.FeatureRequest(recipe="center", scales=(1.0, 0.5)), "scales apply to the pooled recipes"),
        (F.FeatureRequest(recipe="gem", scales=(1.0, 9.0)), "scales: at most 5 values between 0.1 and 2"),
        (F.FeatureRequest(recipe="gem", dim=64), "dim applies after a whitening"),
        (F.FeatureRequest(recipe="gem", gem_p=0.1), "gem_p must be between"),
    ],
)
def test_bad_recipe_parameters_name_what_the_model_supports(lite_card, request_, message):
    with pytest.raises(InvalidArgument, match=message):
        F.Features().validate(lite_card, request_)


def test_recipes_resolve_their_defaults(lite_card):
    recipe = F.Features().resolve(lite_card, F.FeatureRequest(recipe="gem"))
    assert (recipe.layer, recipe.gem_p, recipe.scales) == ("conv_head", 3.0, (1.0,))


# --- through the real server -------------------------------------------------------------------------------


def _images(*contents: bytes) -> list[common_pb2.Image]:
    return [common_pb2.Image(id=f"img{i}", content=c) for i, c in enumerate(contents)]


def _extract(stub, contents, **fields) -> tuple[np.ndarray, features_pb2.ExtractResponse]:
    response = stub.Extract(features_pb2.ExtractRequest(images=_images(*contents), **fields), timeout=120)
    return np.stack([decode_descriptor(d) for d in response.descriptors]), response


@pytest.fixture(scope="module")
def features_stub(channel):
    return features_pb2_grpc.FeaturesStub(channel)


def _mild_copy(img: Image.Image) -> bytes:
    w, h = img.size
    return encode(img.rotate(6, resample=Image.Resampling.BILINEAR).crop((w // 12, h // 12, w - w // 12, h - h // 12)), "JPEG", quality=70)


@pytest.mark.parametrize("recipe, extra", [("center", {}), ("ten_crop", {}), ("gem", {"scales": [1.0, 0.7071, 0.5]}),
                                           ("rmac", {}), ("crow", {}), ("spoc", {"layer": "blocks.6"})])
def test_an_image_is_closer_to_its_copy_than_to_another_photo(features_stub, photos, recipe, extra):
    coffee = photo("coffee.png")
    vectors, response = _extract(features_stub, [photos["coffee.jpg"], _mild_copy(coffee), photos["chelsea.jpg"]], recipe=recipe, **extra)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.1
    assert response.recipe.name == recipe and response.dim == vectors.shape[1]
    assert response.model.name == "efficientnet_lite0" and response.model.version == "1"


def test_ten_crop_is_the_mean_of_ten_crops_in_one_forward_pass(server, features_stub, photos, onnx_cache):
    import onnxruntime as ort
    import torchvision.transforms as T

    from vision.media.imaging import PRESETS

    before = scrape(server.metrics_url)
    vectors, _ = _extract(features_stub, [photos["chelsea.png"]], recipe="ten_crop")
    after = scrape(server.metrics_url)
    added = {
        key: metric_value(after, f"vision_inference_batch_size_{key}", model="efficientnet_lite0")
        - metric_value(before, f"vision_inference_batch_size_{key}", model="efficientnet_lite0")
        for key in ("count", "sum")
    }
    assert added == {"count": 1, "sum": 10}, "the ten crops must go through one batched forward pass"
    # The same model, one crop at a time, with torchvision's own TenCrop.
    (onnx_file,) = onnx_cache.glob("efficientnet_lite0-*.onnx")
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    preset = PRESETS["torchvision"]
    crops = T.Compose([T.Resize(256), T.TenCrop(224)])(Image.open(io.BytesIO(photos["chelsea.png"])).convert("RGB"))
    embeddings = [
        session.run(["embedding"], {"images": T.Normalize(preset.mean, preset.std)(T.ToTensor()(c))[None].numpy()})[0][0]
        for c in crops
    ]
    expected = F.l2_normalize(np.mean(embeddings, axis=0))
    np.testing.assert_allclose(vectors[0], expected, atol=1e-5)


def test_float16_vectors_match_float32(features_stub, photos):
    full, _ = _extract(features_stub, [photos["rocket.jpg"]], recipe="mac")
    half, response = _extract(features_stub, [photos["rocket.jpg"]], recipe="mac", float16=True)
    assert not response.descriptors[0].values and len(response.descriptors[0].values_f16) == 2 * response.dim
    np.testing.assert_allclose(half, full, atol=1e-3)


@pytest.mark.parametrize(
    "fields, code, message",
    [
        ({"recipe": "sift"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown recipe 'sift'.*it supports: center, ten_crop"),
        ({"recipe": "gem", "layer": "fc"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown layer 'fc'"),
        ({"recipe": "gem", "whitening": "x"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown whitening 'x'"),
        ({"model": common_pb2.ModelSelector(name="nope")}, grpc.StatusCode.NOT_FOUND, "model 'nope' is not served"),
    ],
)
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(features_stub, photos, fields, code, message):
    with pytest.raises(grpc.RpcError) as info:
        features_stub.Extract(features_pb2.ExtractRequest(images=_images(photos["coffee.jpg"]), **fields), timeout=30)
    assert info.value.code() == code
    assert __import__("re").search(message, info.value.details())
    vectors, _ = _extract(features_stub, [photos["coffee.jpg"]], recipe="gem")
    assert vectors.shape == (1, 1280)


def test_a_bad_image_is_named_by_its_index(features_stub, photos):
    with pytest.raises(grpc.RpcError) as info:
        features_stub.Extract(features_pb2.ExtractRequest(images=_images(photos["coffee.jpg"], b"not an image"), recipe="rmac"), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("image 1 (id 'img1')")


def test_list_models_names_recipes_and_layers(features_stub):
    (model,) = features_stub.ListModels(common_pb2.ListModelsRequest(), timeout=10).models
    assert list(model.recipes) == list(F.RECIPES)
    assert list(model.layers) == ["blocks.4", "blocks.6", "conv_head"]
    assert model.model.name == "efficientnet_lite0" and not model.whitenings


# --- fit a whitening, serve it, evaluate retrieval: through the CLI ---------------------------------------------


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    from loadtest.retrieval_bench import generate

    root = tmp_path_factory.mktemp("retrieval")
    generate(root)
    return root


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vision.cli", *args], capture_output=True, text=True, timeout=600)


def test_eval_retrieval_on_the_generated_benchmark(server, benchmark):
    result = _cli("eval-retrieval", "--target", server.address, "--images", str(benchmark / "jpg"),
                  "--queries", str(benchmark / "queries"), "--gt", str(benchmark / "gt"), "--recipe", "gem")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["queries"] == 18 and report["database_images"] > 150
    assert report["recipe"]["name"] == "gem" and report["recipe"]["layer"] == "conv_head"
    assert report["scores"]["oxford"]["mAP"] > 80 and report["scores"]["oxford"]["mP@1"] > 90


def test_fit_whitening_then_serve_it(server, benchmark, tmp_path, photos):
    folder = tmp_path / "whitenings"
    result = _cli("fit-whitening", "--target", server.address, "--images", str(benchmark / "jpg"),
                  "--out", str(folder / "bench-pca.npz"), "--recipe", "gem", "--whitening-dim", "128")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["dim"] == 128
    proc = ServerProcess(["--services", "features", "--model", f"arch=efficientnet_lite0,whitenings={folder}",
                          "--model", f"arch=efficientnet_lite0,name=lite-torch,backend=torch,whitenings={folder}"],
                         tmp_path / "serve.log").wait_ready()
    try:
        with grpc.insecure_channel(proc.address) as channel:
            stub = features_pb2_grpc.FeaturesStub(channel)
            (listed, _) = stub.ListModels(common_pb2.ListModelsRequest(), timeout=10).models
            assert [(w.name, w.kind, w.input_dim, w.max_dim) for w in listed.whitenings] == [("bench-pca", "pca", 1280, 128)]
            white, response = _extract(stub, [photos["coffee.jpg"], photos["chelsea.jpg"]], recipe="gem", whitening="bench-pca", dim=64)
            assert white.shape == (2, 64) and response.recipe.dim == 64
            np.testing.assert_allclose(np.linalg.norm(white, axis=1), 1.0, rtol=1e-5)
            with pytest.raises(grpc.RpcError) as info:  # fitted on gem's 1280-d conv_head vectors, not blocks.4
                _extract(stub, [photos["coffee.jpg"]], recipe="gem", layer="blocks.4", whitening="bench-pca")
            assert "fitted on 1280-d descriptors" in info.value.details()
            # The same request through ONNX Runtime and torch gives the same vectors.
            for recipe in ("center", "gem", "rmac"):
                onnx, _ = _extract(stub, [photos["rocket.jpg"]], recipe=recipe)
                eager, _ = _extract(stub, [photos["rocket.jpg"]], recipe=recipe, model=common_pb2.ModelSelector(name="lite-torch"))
                np.testing.assert_allclose(onnx, eager, atol=1e-4)
    finally:
        proc.stop()
