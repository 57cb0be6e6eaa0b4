"""Tagging without a server: thresholds files, both scoring modes, ordering, options, model configuration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vision.core.errors import ConfigurationError, InvalidArgument, NotFound
from vision.evaluation.tagging import best_f1_thresholds
from vision.media.imaging import get_preset
from vision.models import create_model, get_architecture
from vision.labels.names import imagenet_names
from vision.models.signature import Signature
from vision.models.card import ModelCard
from vision.serving.repository import ModelRepository, ServedModel
from vision.config.settings import ModelConfig
from conftest import ML_IMAGES_TREE
from vision.tasks.tagging import TagOptions, Tagger, Thresholds, load_tagger, load_thresholds
from vision.labels.vocab import Label, LabelVocabulary

HEADER4 = "category_index\tcategory_id\tindex_of_parent_category\tcategory name"

# Multi-label vocabulary: every label is a model output.
#   animal(0) ── mammal(1) ── cat(2), dog(3)
#   plant(4) ── tree(5)
#   vehicle(6) ── car(7)
ML_ROWS = ML_IMAGES_TREE
ANIMAL, MAMMAL, CAT, DOG, PLANT, TREE, VEHICLE, CAR = range(8)

# Softmax classifier over 4 classes (labels 0..3) with concepts above them:
#   entity(8) ── animal(7) ── domestic cat(4) ── tabby(0), siamese(1)
#                         └── dog(5) ── beagle(2)
#            └── coffee(6) ── espresso(3)
SUM_ROWS = [
    (0, "n02123045", 4, "tabby"),
    (1, "n02123597", 4, "siamese"),
    (2, "n02088364", 5, "beagle"),
    (3, "n07920052", 6, "espresso"),
    (4, "n02121808", 7, "domestic cat"),
    (5, "n02084071", 7, "dog"),
    (6, "n07929519", 8, "coffee"),
    (7, "n00015388", 8, "animal"),
    (8, "n00001740", -1, "entity"),
]
TABBY, SIAMESE, BEAGLE, ESPRESSO, DOMESTIC_CAT, S_DOG, COFFEE, S_ANIMAL, ENTITY = range(9)


def vocab_of(rows) -> LabelVocabulary:
    return LabelVocabulary(tuple(Label(i, w, n, None if p == -1 else p) for i, w, p, n in rows))


def write_tree(path: Path, rows) -> Path:
    path.write_text("\n".join([HEADER4, *("\t".join(map(str, r)) for r in rows)]) + "\n")
    return path


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def ml_logits(**probs: float) -> np.ndarray:
    """One image; unnamed labels get probability 0.01."""
    row = np.full(8, logit(0.01), dtype=np.float32)
    for name, p in probs.items():
        row[globals()[name.upper()]] = logit(p)
    return row[None]


def tags_of(rows) -> list[tuple[int, float, bool]]:
    return [(t.index, round(t.score, 4), t.from_hierarchy) for t in rows]


@pytest.fixture
def ml_tagger() -> Tagger:
    return Tagger("max", vocab_of(ML_ROWS), 8, Thresholds.constant(8))


@pytest.fixture
def sum_tagger() -> Tagger:
    return Tagger("sum", vocab_of(SUM_ROWS), 4, Thresholds.constant(9))


def sum_logits(*probs: float) -> np.ndarray:
    return np.log(np.asarray([probs], dtype=np.float32))


# --- options ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threshold": -0.1}, "threshold must be between 0 and 1, got -0.1"),
        ({"threshold": 1.5}, "threshold must be between 0 and 1"),
        ({"threshold": float("nan")}, "threshold must be between 0 and 1, got nan"),
        ({"min_score": 2.0}, "min_score must be between 0 and 1"),
        ({"max_tags": 0}, "max_tags must be at least 1"),
        ({"max_tags": -4}, "max_tags must be at least 1"),
    ],
)
def test_bad_options_are_invalid_argument(kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        TagOptions(**kwargs)


def test_edge_options_are_valid():
    TagOptions(threshold=0.0, min_score=1.0, max_tags=1)


# --- multi-label (sigmoid + max propagation) ----------------------------------------------------------


def test_multilabel_tags_predicted_labels_and_their_ancestors(ml_tagger):
    (tags,) = ml_tagger.tag(ml_logits(cat=0.9, tree=0.7, car=0.4, dog=0.2))
    assert tags_of(tags) == [
        (CAT, 0.9, False),
        (MAMMAL, 0.9, True),
        (ANIMAL, 0.9, True),  # ties: more specific first
        (TREE, 0.7, False),
        (PLANT, 0.7, True),
    ]
    assert (tags[0].label, tags[0].wnid, tags[0].depth) == ("cat", "n02121620", 2)
    assert (tags[2].label, tags[2].depth) == ("animal", 0)


def test_multilabel_ancestor_predicted_itself_keeps_the_higher_score(ml_tagger):
    (tags,) = ml_tagger.tag(ml_logits(cat=0.9, animal=0.95))
    assert tags_of(tags) == [(ANIMAL, 0.95, False), (CAT, 0.9, False), (MAMMAL, 0.9, True)]


def test_per_label_thresholds_override_the_default():
    th = np.full(8, 0.5)
    th[CAR], th[TREE] = 0.35, 0.8  # lower: car at 0.4 fires; higher: tree at 0.7 does not
    tagger = Tagger("max", vocab_of(ML_ROWS), 8, Thresholds(0.5, th))
    logits = ml_logits(cat=0.9, tree=0.7, car=0.4, dog=0.2)
    assert [t.index for t in tagger.tag(logits)[0]] == [CAT, MAMMAL, ANIMAL, CAR, VEHICLE]
    # A request threshold replaces every per-label threshold.
    assert [t.index for t in tagger.tag(logits, TagOptions(threshold=0.5))[0]] == [
        CAT,
        MAMMAL,
        ANIMAL,
        TREE,
        PLANT,
    ]
    assert [t.index for t in tagger.tag(logits, TagOptions(threshold=0.15))[0]] == [
        CAT,
        MAMMAL,
        ANIMAL,
        TREE,
        PLANT,
        CAR,
        VEHICLE,
        DOG,
    ]


def test_max_tags_caps_after_sorting_by_score_and_min_score_filters(ml_tagger):
    logits = ml_logits(cat=0.9, tree=0.7, car=0.6)
    (capped,) = ml_tagger.tag(logits, TagOptions(max_tags=4))
    assert [t.index for t in capped] == [CAT, MAMMAL, ANIMAL, TREE]
    assert [t.score for t in capped] == sorted((t.score for t in capped), reverse=True)
    (filtered,) = ml_tagger.tag(logits, TagOptions(min_score=0.65))
    assert [t.index for t in filtered] == [CAT, MAMMAL, ANIMAL, TREE, PLANT]
    assert ml_tagger.tag(ml_logits(), TagOptions()) == [[]]


def test_multilabel_with_concepts_that_have_no_output():
    # Outputs are labels 0..2 of a 4-label vocabulary: label 3 (their root) has no logit of its own.
    vocab = vocab_of([(0, "", 3, "a"), (1, "", 3, "b"), (2, "", -1, "c"), (3, "", -1, "root")])
    tagger = Tagger("max", vocab, 3, Thresholds.constant(4))
    logits = np.array([[logit(0.8), logit(0.1), logit(0.1)], [logit(0.1)] * 3], dtype=np.float32)
    first, second = tagger.tag(logits)
    assert tags_of(first) == [(0, 0.8, False), (3, 0.8, True)]
    assert second == []
    # Even at threshold 0 a concept without an output is tagged only through its descendants.
    assert all(t.index != 3 or t.from_hierarchy for t in tagger.tag(logits, TagOptions(threshold=0.0))[1])


def test_batch_rows_are_independent(ml_tagger):
    logits = np.concatenate([ml_logits(cat=0.9), ml_logits(car=0.8)])
    first, second = ml_tagger.tag(logits)
    assert [t.index for t in first] == [CAT, MAMMAL, ANIMAL] and [t.index for t in second] == [CAR, VEHICLE]


# --- softmax + sum propagation ------------------------------------------------------------------------


def test_sum_scores_concepts_by_summed_probability(sum_tagger):
    (tags,) = sum_tagger.tag(sum_logits(0.3, 0.25, 0.05, 0.4))
    # domestic cat = 0.3 + 0.25, animal = 0.6; the root (every class below it) is never returned.
    assert tags_of(tags) == [(DOMESTIC_CAT, 0.55, True), (S_ANIMAL, 0.6, True)]


def test_sum_order_is_most_specific_first(sum_tagger):
    (tags,) = sum_tagger.tag(sum_logits(0.3, 0.25, 0.05, 0.4), TagOptions(threshold=0.2))
    order = [t.index for t in tags]
    # Siblings before their parent; the most confident branch that is ready goes first.
    assert order == [ESPRESSO, COFFEE, TABBY, SIAMESE, DOMESTIC_CAT, S_ANIMAL]
    vocab = sum_tagger.vocabulary
    for position, index in enumerate(order):
        assert not set(vocab.ancestors(index)) & set(order[:position]), (
            "an ancestor came before its descendant"
        )
    assert [t.from_hierarchy for t in tags] == [False, True, False, False, True, True]
    scores = {t.index: t.score for t in tags}
    assert (
        scores[DOMESTIC_CAT] >= max(scores[TABBY], scores[SIAMESE])
        and scores[S_ANIMAL] >= scores[DOMESTIC_CAT]
    )


def test_sum_max_tags_keeps_the_most_specific_and_min_score_filters(sum_tagger):
    logits = sum_logits(0.3, 0.25, 0.05, 0.4)
    (capped,) = sum_tagger.tag(logits, TagOptions(threshold=0.2, max_tags=3))
    assert [t.index for t in capped] == [ESPRESSO, COFFEE, TABBY]
    (filtered,) = sum_tagger.tag(logits, TagOptions(threshold=0.2, min_score=0.3))
    assert [t.index for t in filtered] == [ESPRESSO, COFFEE, TABBY, DOMESTIC_CAT, S_ANIMAL]


def test_sum_threshold_zero_returns_every_label_but_the_root(sum_tagger):
    (tags,) = sum_tagger.tag(sum_logits(0.3, 0.25, 0.05, 0.4), TagOptions(threshold=0.0))
    assert sorted(t.index for t in tags) == list(range(8))


def test_sum_per_label_thresholds_apply_to_concepts():
    th = np.full(9, 0.5)
    th[S_ANIMAL] = 0.7  # animal at 0.6 is no longer enough
    th[TABBY] = 0.25  # tabby at 0.3 now is
    tagger = Tagger("sum", vocab_of(SUM_ROWS), 4, Thresholds(0.5, th))
    (tags,) = tagger.tag(sum_logits(0.3, 0.25, 0.05, 0.4))
    assert tags_of(tags) == [(TABBY, 0.3, False), (DOMESTIC_CAT, 0.55, True)]


def test_tagger_refuses_a_vocabulary_smaller_than_the_outputs():
    with pytest.raises(ConfigurationError, match="fewer than the model's 5 outputs"):
        Tagger("sum", LabelVocabulary.from_names(["a", "b", "c", "d"]), 5, Thresholds.constant(4))


# --- thresholds files ---------------------------------------------------------------------------------


def write_json(path: Path, document) -> Path:
    path.write_text(json.dumps(document) if not isinstance(document, str) else document)
    return path


def test_thresholds_by_index_and_wordnet_id(tmp_path):
    vocab = vocab_of(ML_ROWS)
    table = load_thresholds(
        write_json(tmp_path / "t.json", {"default": 0.6, "thresholds": {"2": 0.3, "n02958343": 0.9}}),
        vocab,
        8,
    )
    assert table.default == 0.6 and table.n_calibrated == 2
    assert table.per_label.tolist() == [0.6, 0.6, 0.3, 0.6, 0.6, 0.6, 0.6, 0.9]
    assert not table.per_label.flags.writeable


def test_thresholds_list_for_every_label_or_every_output(tmp_path):
    vocab = vocab_of(SUM_ROWS)
    full = load_thresholds(
        write_json(tmp_path / "a.json", {"thresholds": [0.1 * i for i in range(9)]}), vocab, 4
    )
    assert full.per_label.tolist() == pytest.approx([0.1 * i for i in range(9)])
    outputs = load_thresholds(
        write_json(tmp_path / "b.json", {"default": 0.4, "thresholds": [0.2] * 4}), vocab, 4
    )
    assert outputs.per_label.tolist() == [0.2] * 4 + [0.4] * 5


def test_best_f1_thresholds_output_is_a_thresholds_file(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.random((40, 8)) < 0.3
    y[:, 7] = False  # no positives: gets the fallback
    scores = np.clip(y * 0.5 + rng.random((40, 8)) * 0.6, 0, 1)
    selection = best_f1_thresholds(y, scores, fallback=0.45)
    path = write_json(tmp_path / "cal.json", selection.as_dict())
    table = load_thresholds(path, vocab_of(ML_ROWS), 8)
    assert table.default == 0.45
    np.testing.assert_array_equal(table.per_label, selection.thresholds)


@pytest.mark.parametrize(
    "document, message",
    [
        ("{not json", "t.json:1: not valid JSON"),
        ([0.5], "expected a JSON object"),
        ({"treshold": 0.5}, r"unknown key\(s\) \['treshold'\]"),
        ({"default": 1.5}, '"default" must be a number between 0 and 1, got 1.5'),
        ({"default": True}, '"default" must be a number between 0 and 1, got true'),
        ({"default": 0.5, "fallback": 0.4}, "disagree"),
        ({"thresholds": [0.5] * 5}, '"thresholds" has 5 values; the model needs 8'),
        ({"thresholds": [0.5] * 7 + ["x"]}, r'"thresholds"\[7\] must be a number'),
        ({"thresholds": {"8": 0.5}}, "no label 8; the vocabulary has labels 0..7"),
        ({"thresholds": {"n99999999": 0.5}}, "keys must be label indices"),
        ({"thresholds": {"3": -0.1}}, r'"thresholds"\["3"\] must be a number between 0 and 1, got -0.1'),
        ({"thresholds": 0.5}, "must be a list"),
    ],
)
def test_bad_thresholds_files_name_file_and_entry(tmp_path, document, message):
    path = write_json(tmp_path / "t.json", document)
    with pytest.raises(ConfigurationError, match=message) as info:
        load_thresholds(path, vocab_of(ML_ROWS), 8)
    assert str(path) in str(info.value)


def test_missing_thresholds_file(tmp_path):
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_thresholds(tmp_path / "nope.json", vocab_of(ML_ROWS), 8)


# --- which models tag, and with what --------------------------------------------------------------------


def test_imagenet_classifier_tags_with_the_bundled_wordnet_hierarchy():
    tagger = load_tagger(model="m", task="classification", labels_source="imagenet", labels=imagenet_names())
    assert tagger is not None and tagger.mode == "sum" and len(tagger) == 1808 and tagger.n_outputs == 1000
    probs = np.full((1, 1000), 1e-6, dtype=np.float32)
    probs[0, 967] = 0.9  # espresso
    names = [t.label for t in tagger.tag(np.log(probs))[0]]
    assert names[:3] == ["espresso", "coffee", "beverage"] and "entity" not in names


def test_hierarchy_none_and_other_heads():
    labels = imagenet_names()
    assert (
        load_tagger(
            model="m", task="classification", labels_source="imagenet", labels=labels, hierarchy="none"
        )
        is None
    )
    flat = load_tagger(
        model="m", task="multilabel", labels_source="imagenet", labels=labels, hierarchy="none"
    )
    assert flat is not None and flat.mode == "max" and len(flat) == 1000 and not flat.has_hierarchy
    assert load_tagger(model="m", task="features", labels_source="imagenet", labels=labels) is None


def test_label_file_with_a_hierarchy_is_the_tag_vocabulary(tmp_path):
    path = write_tree(tmp_path / "tree.tsv", ML_ROWS)
    tagger = load_tagger(
        model="m", task="multilabel", labels_source=str(path), labels=[r[3] for r in ML_ROWS]
    )
    assert tagger is not None and tagger.mode == "max" and tagger.has_hierarchy
    flat = tmp_path / "flat.txt"
    flat.write_text("0\ta\n1\tb\n")
    assert load_tagger(model="m", task="classification", labels_source=str(flat), labels=["a", "b"]) is None
    # ... unless it is given a hierarchy whose first labels are its outputs.
    tree = write_tree(tmp_path / "ab.tsv", [(0, "", 2, "a"), (1, "", 2, "b"), (2, "", -1, "ab")])
    with_tree = load_tagger(
        model="m", task="classification", labels_source=str(flat), labels=["a", "b"], hierarchy=str(tree)
    )
    assert with_tree is not None and with_tree.mode == "sum" and len(with_tree) == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"hierarchy": "wordnet"},
            "bundled WordNet hierarchy is over the 1000 ImageNet-1k classes, but the model has 3",
        ),
        ({"hierarchy": "/nope/tree.tsv"}, "hierarchy file /nope/tree.tsv does not exist"),
        ({"hierarchy": "SHORT"}, "has 2 labels, fewer than the model's 3 outputs"),
        ({"thresholds": Path("/t.json")}, "has a thresholds file but cannot tag"),
    ],
)
def test_bad_tagging_configuration_is_refused(tmp_path, kwargs, message):
    flat = tmp_path / "flat.txt"
    flat.write_text("0\ta\n1\tb\n2\tc\n")
    if kwargs.get("hierarchy") == "SHORT":
        kwargs["hierarchy"] = str(write_tree(tmp_path / "short.tsv", [(0, "", -1, "a"), (1, "", 0, "b")]))
    with pytest.raises(ConfigurationError, match=message):
        load_tagger(
            model="m", task="classification", labels_source=str(flat), labels=["a", "b", "c"], **kwargs
        )


def test_model_spec_takes_hierarchy_and_thresholds():
    config = ModelConfig.parse_spec(
        "arch=resnext50_32x4d_multilabel,labels=/v.tsv,hierarchy=none,thresholds=/t.json"
    )
    assert (config.hierarchy, config.thresholds) == ("none", Path("/t.json"))


# --- the repository: who serves what -------------------------------------------------------------------


def card(name: str, task: str, tagger: Tagger | None) -> ModelCard:
    return ModelCard(name, "1", "arch", task, ("a",), get_preset("torchvision"), "torch", Signature(1, 8), artifacts={"tagging": tagger})


def test_repository_finds_models_by_task_and_explains_a_model_that_cannot_tag(ml_tagger, sum_tagger):
    repo = ModelRepository(
        [
            ServedModel(card("plain", "classification", None), None),  # type: ignore[arg-type]
            ServedModel(card("wordnet", "classification", sum_tagger), None),  # type: ignore[arg-type]
            ServedModel(card("ml", "multilabel", ml_tagger), None),  # type: ignore[arg-type]
        ]
    )
    assert [m.card.name for m in repo.list("classification")] == ["plain", "wordnet"]
    assert [m.card.name for m in repo.list("tagging")] == ["wordnet", "ml"]
    assert repo.get(task="tagging").card.name == "wordnet"
    assert repo.get("ml", task="tagging").card.tasks == {"multilabel", "tagging", "features"}
    with pytest.raises(
        NotFound,
        match=r"model 'plain' cannot be used for tagging \(it serves: classification, features\); available: ml, wordnet",
    ):
        repo.get("plain", task="tagging")
    with pytest.raises(NotFound, match="model 'ml' cannot be used for classification"):
        repo.get("ml", task="classification")


# --- the multi-label ResNeXt builder --------------------------------------------------------------------


def test_multilabel_resnext_is_registered_with_its_head(tmp_path):
    entry = get_architecture("resnext50_32x4d_multilabel")
    d = entry.defaults
    assert (d.task, d.preset, d.num_classes, d.labels) == ("multilabel", "mlimages", 11166, None)
    net = entry.builder(num_classes=6)
    assert isinstance(net.fc[0], torch.nn.Dropout) and net.fc[0].p == 0.2
    assert (net.fc[1].in_features, net.fc[1].out_features) == (2048, 6)
    path = tmp_path / "ml.pt"
    torch.save({"state_dict": net.state_dict(), "epoch": 1}, path)  # a registry-style checkpoint
    loaded = create_model("resnext50_32x4d_multilabel", num_classes=6, weights=path)
    assert torch.equal(loaded.fc[1].weight, net.fc[1].weight) and not loaded.training


def test_multilabel_resnext_without_labels_fails_at_load():
    from vision.serving.loading import load_model
    from vision.config.settings import ServeSettings

    config = ModelConfig(arch="resnext50_32x4d_multilabel")
    with pytest.raises(ConfigurationError, match="no labels: this architecture has no default label set"):
        load_model(config, ServeSettings(models=[config]))
