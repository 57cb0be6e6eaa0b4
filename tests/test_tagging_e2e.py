"""Tagging through real `vision serve` processes and real gRPC clients (and the `vision tag`/`eval-tags` CLIs)."""

from __future__ import annotations

import re

import json
import math
import subprocess
import sys

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ML_IMAGES_TREE, ServerProcess, metric_value, scrape
from vision.models import get_architecture
from vision.labels.names import imagenet_wordnet
from vision.v1 import classification_pb2, classification_pb2_grpc, common_pb2, tagging_pb2, tagging_pb2_grpc


def tag_request(
    *contents: bytes, model: str = "", version: str = "", **options: float
) -> tagging_pb2.TagRequest:
    request = tagging_pb2.TagRequest(
        model=common_pb2.ModelSelector(name=model, version=version),
        images=[common_pb2.Image(id=f"img{i}", content=c) for i, c in enumerate(contents)],
    )
    for name, value in options.items():
        setattr(request, name, value)
    return request


@pytest.fixture(scope="module")
def tagger(channel) -> tagging_pb2_grpc.TaggingStub:
    return tagging_pb2_grpc.TaggingStub(channel)


def names(result) -> list[str]:
    return [t.label for t in result.tags]


def assert_consistent_with_wordnet(result) -> None:
    """Every ancestor of a tag is tagged too (but the root), scores at least as high, and listed after it."""
    vocab = imagenet_wordnet()
    position = {t.index: i for i, t in enumerate(result.tags)}
    score = {t.index: t.score for t in result.tags}
    for t in result.tags:
        assert (t.label, t.wnid, t.depth) == (vocab[t.index].name, vocab[t.index].wnid, vocab.depth(t.index))
        assert t.from_hierarchy == (t.index >= 1000)
        for ancestor in vocab.ancestors(t.index)[:-1]:  # [-1] is the root, "entity": always 1, never returned
            assert ancestor in score, f"{vocab[ancestor].name} (ancestor of {t.label}) missing"
            assert score[ancestor] >= score[t.index] - 1e-6
            assert position[ancestor] > position[t.index]
    assert "entity" not in names(result)


# --- the embedded default: EfficientNet-Lite0 under the WordNet hierarchy ---------------------------------


@pytest.mark.parametrize("name", ["coffee.jpg", "coffee.png"])
def test_coffee_is_espresso_coffee_beverage(tagger, photos, name):
    response = tagger.Tag(tag_request(photos[name]), timeout=60)
    assert (response.model.name, response.model.version) == ("efficientnet_lite0", "1")
    result = response.results[0]
    tags = names(result)
    assert tags[:3] == ["espresso", "coffee", "beverage"]  # most specific first
    assert {"food", "substance", "matter", "physical entity"} <= set(tags)
    espresso = result.tags[0]
    assert (espresso.index, espresso.wnid, espresso.from_hierarchy) == (967, "n07920052", False)
    assert espresso.score > 0.7
    assert_consistent_with_wordnet(result)


@pytest.mark.parametrize("name", ["chelsea.jpg", "chelsea.png"])
def test_chelsea_is_a_cat_feline_carnivore_mammal_animal(tagger, photos, name):
    result = tagger.Tag(tag_request(photos[name]), timeout=60).results[0]
    tags = names(result)
    assert tags[0] in {"domestic cat", "tabby", "tiger cat", "Egyptian cat", "cat"}
    assert {"cat", "feline", "carnivore", "mammal", "animal", "organism"} <= set(tags)
    assert_consistent_with_wordnet(result)


def test_threshold_override_max_tags_and_min_score_on_a_real_photo(tagger, photos):
    default = tagger.Tag(tag_request(photos["chelsea.png"]), timeout=60).results[0]
    low = tagger.Tag(tag_request(photos["chelsea.png"], threshold=0.2), timeout=60).results[0]
    # Lowering the threshold adds the cat breeds, listed before their parent.
    breeds = {"tabby", "tiger cat", "Egyptian cat"}
    assert not breeds & set(names(default)) and breeds <= set(names(low)[:3])
    assert set(names(default)) < set(names(low))
    assert_consistent_with_wordnet(low)
    capped = tagger.Tag(tag_request(photos["chelsea.png"], threshold=0.2, max_tags=3), timeout=60).results[0]
    assert names(capped) == names(low)[:3]
    filtered = tagger.Tag(
        tag_request(photos["chelsea.png"], threshold=0.2, min_score=0.9), timeout=60
    ).results[0]
    assert names(filtered) == [t.label for t in low.tags if t.score >= 0.9]


def test_batch_results_follow_request_order(tagger, photos):
    response = tagger.Tag(
        tag_request(photos["chelsea.png"], photos["coffee.jpg"], photos["rocket.jpg"]), timeout=60
    )
    assert [r.image_id for r in response.results] == ["img0", "img1", "img2"]
    assert "cat" in names(response.results[0]) and names(response.results[1])[0] == "espresso"


def test_list_models_of_tagging(tagger):
    (model,) = tagger.ListModels(common_pb2.ListModelsRequest(), timeout=10).models
    assert (model.name, model.task, model.num_labels, model.num_tag_labels) == (
        "efficientnet_lite0",
        "classification",
        1000,
        1808,
    )


BAD_REQUESTS = {
    "threshold-above-1": (
        {"threshold": 1.5},
        grpc.StatusCode.INVALID_ARGUMENT,
        "threshold must be between 0 and 1",
    ),
    "threshold-negative": (
        {"threshold": -0.25},
        grpc.StatusCode.INVALID_ARGUMENT,
        "threshold must be between 0 and 1",
    ),
    "threshold-nan": ({"threshold": math.nan}, grpc.StatusCode.INVALID_ARGUMENT, "got nan"),
    "min-score-above-1": (
        {"min_score": 1.01},
        grpc.StatusCode.INVALID_ARGUMENT,
        "min_score must be between 0 and 1",
    ),
    "max-tags-zero": ({"max_tags": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_tags must be at least 1"),
    "max-tags-negative": ({"max_tags": -2}, grpc.StatusCode.INVALID_ARGUMENT, "max_tags must be at least 1"),
    "unknown-model": ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, "available: efficientnet_lite0"),
    "unknown-version": (
        {"model": "efficientnet_lite0", "version": "9"},
        grpc.StatusCode.NOT_FOUND,
        "no version '9'",
    ),
    "bad-image-names-its-index": (
        {"extra": b"garbage"},
        grpc.StatusCode.INVALID_ARGUMENT,
        "image 1 (id 'img1')",
    ),
    "empty-batch": ({"no_images": True}, grpc.StatusCode.INVALID_ARGUMENT, "no images"),
    "oversize-batch": ({"copies": 33}, grpc.StatusCode.RESOURCE_EXHAUSTED, "limit of 32"),
}


@pytest.mark.parametrize("kind", sorted(BAD_REQUESTS))
def test_bad_request_gets_documented_status_and_server_keeps_serving(tagger, photos, kind):
    spec, code, fragment = BAD_REQUESTS[kind]
    spec = dict(spec)
    contents = [photos["coffee.jpg"]] * spec.pop("copies", 1)
    if "extra" in spec:
        contents.append(spec.pop("extra"))
    if spec.pop("no_images", False):
        contents = []
    with pytest.raises(grpc.RpcError) as info:
        tagger.Tag(tag_request(*contents, **spec), timeout=60)
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details()
    assert names(tagger.Tag(tag_request(photos["coffee.jpg"]), timeout=60).results[0])[0] == "espresso"


def test_metrics_move_after_tag_requests(tagger, server, photos):
    before = scrape(server.metrics_url)
    tagger.Tag(tag_request(photos["coffee.jpg"], photos["chelsea.jpg"]), timeout=60)
    with pytest.raises(grpc.RpcError):
        tagger.Tag(tag_request(photos["coffee.jpg"], max_tags=0), timeout=60)
    after = scrape(server.metrics_url)
    ok = {"service": "vision.v1.Tagging", "method": "Tag", "code": "OK"}
    bad = {**ok, "code": "INVALID_ARGUMENT"}
    for labels in (ok, bad):
        assert (
            metric_value(after, "vision_requests_total", **labels)
            - metric_value(before, "vision_requests_total", **labels)
            == 1
        )
    images = {"service": "vision.v1.Tagging", "model": "efficientnet_lite0"}
    assert (
        metric_value(after, "vision_images_total", **images)
        - metric_value(before, "vision_images_total", **images)
        == 2
    )
    latency = {"service": "vision.v1.Tagging", "method": "Tag"}
    assert (
        metric_value(after, "vision_request_duration_seconds_count", **latency)
        - metric_value(before, "vision_request_duration_seconds_count", **latency)
        == 2
    )


def test_health_and_reflection_include_tagging(channel):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    status = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="vision.v1.Tagging"), timeout=10
    )
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert "vision.v1.Tagging" in set(ProtoReflectionDescriptorDatabase(channel).get_services())


# --- the CLI ---------------------------------------------------------------------------------------------


def vision_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vision.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_vision_tag_cli(server, photos, tmp_path):
    coffee = tmp_path / "coffee.jpg"
    coffee.write_bytes(photos["coffee.jpg"])
    text = vision_cli("tag", "--target", server.address, str(coffee))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == "model efficientnet_lite0 version 1" and lines[1].endswith("coffee.jpg: 7 tags")
    assert lines[2].split()[1:] == ["967", "n07920052", "model", "espresso"]
    assert lines[3].split()[-2:] == ["hierarchy", "coffee"]
    as_json = vision_cli("tag", "--target", server.address, "--max-tags", "2", "--json", str(coffee))
    tags = json.loads(as_json.stdout)["results"][0]["tags"]
    assert [t["label"] for t in tags] == ["espresso", "coffee"] and tags[1]["fromHierarchy"] is True
    bad = vision_cli("tag", "--target", server.address, "--threshold", "2", str(coffee))
    assert bad.returncode == 1 and "INVALID_ARGUMENT: threshold must be between 0 and 1" in bad.stderr
    models = vision_cli("models", "--target", server.address)
    assert "tag_labels=1808" in models.stdout and "services=classification,tagging" in models.stdout


@pytest.fixture(scope="module")
def labelled(photos, tmp_path_factory):
    """3 images, 6 labels. coffee: espresso, beverage; chelsea: domestic cat, mammal (by WordNet id), tabby;
    rocket: space shuttle. At the default thresholds the model tags espresso, beverage, domestic cat and
    mammal, but not tabby (0.42) nor space shuttle (0.02)."""
    root = tmp_path_factory.mktemp("labelled")
    folder = root / "folder"
    layout = {
        "espresso": "coffee.png",
        "beverage": "coffee.png",
        "domestic cat": "chelsea.png",
        "n01861778": "chelsea.png",
        "tabby": "chelsea.png",
        "space shuttle": "rocket.jpg",
    }
    for label, image in layout.items():
        (folder / label).mkdir(parents=True)
        (folder / label / image).write_bytes(photos[image])
    (root / "images").mkdir()
    for image in ("coffee.png", "chelsea.png", "rocket.jpg"):
        (root / "images" / image).write_bytes(photos[image])
    labels = ["beverage", "domestic cat", "espresso", "n01861778", "space shuttle", "tabby"]
    document = {
        "labels": labels,
        "samples": [
            {"image": "images/coffee.png", "labels": ["espresso", "beverage"]},
            {"image": "images/chelsea.png", "labels": [1, "n01861778", "tabby"]},
            {"file_name": "images/rocket.jpg", "labels": ["space shuttle"]},
        ],
    }
    (root / "nus.json").write_text(json.dumps(document))
    return folder, root / "nus.json"


@pytest.mark.parametrize("kind", ["folder", "json"])
def test_eval_tags_reports_multilabel_metrics(server, labelled, kind):
    dataset = labelled[0] if kind == "folder" else labelled[1]
    result = vision_cli("eval-tags", "--target", server.address, "--json", str(dataset))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["n_samples"], report["n_labels"], report["n_labels_evaluated"]) == (3, 6, 6)
    per_label = {e["name"]: e for e in report["per_label"]}
    assert {n for n, e in per_label.items() if e["true_positives"]} == {
        "espresso",
        "beverage",
        "domestic cat",
        "n01861778",
    }
    assert report["OP"] == 1.0 and report["OR"] == pytest.approx(4 / 6)
    assert report["CP"] == pytest.approx(4 / 6) and report["CR"] == pytest.approx(4 / 6)
    # coffee: 1; chelsea: 2·2/(3+2) = 0.8; rocket: 0.
    assert report["samples_f1"] == pytest.approx(0.6)
    # Every label's one positive image scores it highest of the three, missed or not.
    assert report["mAP"] == pytest.approx(1.0)
    lowered = json.loads(
        vision_cli(
            "eval-tags", "--target", server.address, "--json", "--threshold", "0.01", str(dataset)
        ).stdout
    )
    assert lowered["OR"] == 1.0 and lowered["OP"] < 1.0  # everything found, at the cost of false positives
    text = vision_cli("eval-tags", "--target", server.address, str(dataset))
    assert "samples-F1 0.6000  mAP 1.0000" in text.stdout


def test_eval_tags_refuses_a_bad_dataset(server, tmp_path):
    (tmp_path / "bad.json").write_text(
        json.dumps({"labels": ["a"], "samples": [{"image": "missing.jpg", "labels": ["a"]}]})
    )
    result = vision_cli("eval-tags", "--target", server.address, str(tmp_path / "bad.json"))
    assert result.returncode == 2 and "missing.jpg does not exist" in result.stderr


# --- a multi-label ResNeXt head saved here, with a hierarchy and calibrated thresholds ---------------------

# ML-Images hierarchy format: animal ── mammal ── cat, dog; plant ── tree; vehicle ── car.
TREE = ML_IMAGES_TREE
# Sigmoid outputs the biased head produces for every image: labels 2 and 5 fire at the default 0.5.
PROBS = {2: 0.95, 5: 0.75, 7: 0.40, 3: 0.20}
NUS_LABELS = ["sky", "water", "person", "animal", "building"]


def _biased_head(net: torch.nn.Module, linear: torch.nn.Linear, probs: dict[int, float]) -> None:
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.fill_(math.log(0.01 / 0.99))
        for index, p in probs.items():
            linear.bias[index] = math.log(p / (1 - p))


@pytest.fixture(scope="module")
def multilabel_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("multilabel")
    tree = root / "mlimages.tsv"
    tree.write_text(
        "category_index\tcategory_id\tindex_of_parent_category\tcategory name\n"
        + "".join("\t".join(map(str, row)) + "\n" for row in TREE)
    )
    # Calibrated thresholds: tree needs 0.8 (its 0.75 no longer fires), car only 0.35 (its 0.40 does).
    thresholds = root / "thresholds.json"
    thresholds.write_text(json.dumps({"default": 0.5, "thresholds": {"5": 0.8, "n02958343": 0.35}}))
    net = get_architecture("resnext50_32x4d_multilabel").builder(num_classes=len(TREE))
    _biased_head(net, net.fc[1], PROBS)
    torch.save({"state_dict": net.state_dict(), "epoch": 7}, root / "mlx.pt")
    nus = root / "nus.json"
    nus.write_text(json.dumps({"labels": NUS_LABELS, "samples": []}))
    small = get_architecture("efficientnet_lite0").builder(num_classes=len(NUS_LABELS))
    _biased_head(small, small.classifier, {1: 0.9, 0: 0.6, 2: 0.3})
    torch.save(small.state_dict(), root / "nus.pt")
    args = ["--backend", "torch", "--max-images-per-request", "8"]
    for spec in (
        f"arch=resnext50_32x4d_multilabel,name=mlx,version=1,weights={root / 'mlx.pt'},labels={tree}",
        f"arch=resnext50_32x4d_multilabel,name=mlx,version=2,weights={root / 'mlx.pt'},labels={tree},thresholds={thresholds}",
        f"arch=efficientnet_lite0,name=nus,task=multilabel,weights={root / 'nus.pt'},labels={nus}",
        "arch=efficientnet_lite0,name=plain,hierarchy=none",
    ):
        args += ["--model", spec]
    proc = ServerProcess(args, root / "serve.log").wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def ml_channel(multilabel_server):
    with grpc.insecure_channel(multilabel_server.address) as channel:
        yield channel


def own_and_inherited(result) -> tuple[list[int], list[int]]:
    return [t.index for t in result.tags if not t.from_hierarchy], [
        t.index for t in result.tags if t.from_hierarchy
    ]


def test_multilabel_head_returns_the_labels_it_was_built_to_fire(ml_channel, photos):
    stub = tagging_pb2_grpc.TaggingStub(ml_channel)
    response = stub.Tag(
        tag_request(photos["coffee.jpg"], photos["chelsea.png"], model="mlx", version="1"), timeout=120
    )
    assert (response.model.name, response.model.version) == ("mlx", "1")
    for result in response.results:
        own, inherited = own_and_inherited(result)
        assert own == [2, 5]
        assert sorted(inherited) == [0, 1, 4]  # animal, mammal above cat; plant above tree
        tags = {t.index: t for t in result.tags}
        assert tags[2].score == pytest.approx(0.95, abs=1e-4) and tags[5].score == pytest.approx(
            0.75, abs=1e-4
        )
        # Ancestors score the max over their tagged descendants.
        assert tags[1].score == tags[0].score == tags[2].score and tags[4].score == tags[5].score
        assert [t.label for t in result.tags] == [
            "cat",
            "mammal",
            "animal",
            "tree",
            "plant",
        ]  # by score, ties specific first
        assert (tags[2].wnid, tags[2].depth, tags[0].depth) == ("n02121620", 2, 0)


def test_calibrated_thresholds_override_the_default(ml_channel, photos):
    stub = tagging_pb2_grpc.TaggingStub(ml_channel)
    response = stub.Tag(tag_request(photos["coffee.jpg"], model="mlx"), timeout=120)  # newest: version 2
    assert response.model.version == "2"
    result = response.results[0]
    assert own_and_inherited(result) == (
        [2, 7],
        [1, 0, 6],
    )  # car fires at 0.40 >= 0.35; tree's 0.75 < 0.8 does not
    overridden = stub.Tag(tag_request(photos["coffee.jpg"], model="mlx", threshold=0.5), timeout=120).results[
        0
    ]
    assert own_and_inherited(overridden)[0] == [2, 5]
    strict = stub.Tag(tag_request(photos["coffee.jpg"], model="mlx", min_score=0.5), timeout=120).results[0]
    assert [t.label for t in strict.tags] == ["cat", "mammal", "animal"]
    capped = stub.Tag(
        tag_request(photos["coffee.jpg"], model="mlx", threshold=0.1, max_tags=4), timeout=120
    ).results[0]
    assert [t.label for t in capped.tags] == ["cat", "mammal", "animal", "tree"]
    assert [t.score for t in capped.tags] == sorted((t.score for t in capped.tags), reverse=True)


def test_flat_multilabel_model_with_nus_wide_labels(ml_channel, photos):
    result = (
        tagging_pb2_grpc.TaggingStub(ml_channel)
        .Tag(tag_request(photos["rocket.jpg"], model="nus"), timeout=60)
        .results[0]
    )
    assert [(t.label, t.from_hierarchy, t.depth, t.wnid) for t in result.tags] == [
        ("water", False, 0, ""),
        ("sky", False, 0, ""),
    ]


def test_which_service_serves_which_model(ml_channel, photos):
    tagging = tagging_pb2_grpc.TaggingStub(ml_channel)
    classification = classification_pb2_grpc.ClassificationStub(ml_channel)
    listed = tagging.ListModels(common_pb2.ListModelsRequest(), timeout=10).models
    assert [
        (m.name, m.version, m.task, m.num_labels, m.num_tag_labels, m.preprocessing.preset) for m in listed
    ] == [
        ("mlx", "1", "multilabel", 8, 8, "mlimages"),
        ("mlx", "2", "multilabel", 8, 8, "mlimages"),
        ("nus", "1", "multilabel", 5, 5, "torchvision"),
    ]
    assert [m.name for m in classification.ListModels(common_pb2.ListModelsRequest(), timeout=10).models] == [
        "plain"
    ]
    # A classification model without a hierarchy cannot tag; a multi-label model is not softmax-classified.
    with pytest.raises(grpc.RpcError) as info:
        tagging.Tag(tag_request(photos["coffee.jpg"], model="plain"), timeout=60)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # "it serves" lists the model's capabilities (classification, features, ...), then what can tag.
    assert re.search(
        r"model 'plain' cannot be used for tagging \(it serves: [a-z, ]*classification[a-z, ]*\); available: mlx, nus",
        info.value.details(),
    ), info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        classification.Classify(
            classification_pb2.ClassifyRequest(
                model=common_pb2.ModelSelector(name="mlx"),
                images=[common_pb2.Image(content=photos["coffee.jpg"])],
            ),
            timeout=60,
        )
    assert (
        info.value.code() == grpc.StatusCode.NOT_FOUND
        and "cannot be used for classification" in info.value.details()
    )
    # Both still answer: the default tagging model is the first configured one that can tag.
    assert tagging.Tag(tag_request(photos["coffee.jpg"]), timeout=120).model.name == "mlx"
    plain = classification.Classify(
        classification_pb2.ClassifyRequest(images=[common_pb2.Image(content=photos["coffee.jpg"])], top_k=1),
        timeout=60,
    )
    assert plain.model.name == "plain" and plain.results[0].predictions[0].index == 967


def test_bad_thresholds_file_stops_startup(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text('{"default": 0.5, "thresholds": {"5000": 0.3}}')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vision.cli",
            "serve",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--backend",
            "torch",
            "--model",
            f"arch=efficientnet_lite0,thresholds={bad}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert (
        f'{bad}: "thresholds"["5000"]: no label 5000' in result.stderr
        and "gRPC listening" not in result.stdout
    )
