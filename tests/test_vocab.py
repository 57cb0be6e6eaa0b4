"""Label vocabularies: file formats, hierarchy closure, score propagation, the committed WordNet file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import vision
from vision.labels.vocab import (
    HierarchyTag,
    Label,
    LabelVocabulary,
    VocabularyError,
    load_label_file,
    load_mlimages,
    load_nuswide_json,
    load_vocabulary,
    propagate_max,
    propagate_sum,
    write_label_file,
    write_mlimages,
)

HEADER4 = "category_index\tcategory_id\tindex_of_parent_category\tcategory name"

# A tiny tree, listed children first so parents are only defined later in the file:
#
#   animal(5) ── cat(3) ── tabby(0), siamese(1)
#            └── dog(4) ── beagle(2)
#   cat(6)      a second, unrelated "cat" (the whip): names may repeat
#
# Labels 0..2 are the "model outputs" for propagate_sum.
TREE_ROWS = [
    (0, "n00000010", 3, "tabby"),
    (1, "n00000011", 3, "siamese, Siamese cat"),
    (2, "n00000012", 4, "beagle"),
    (3, "n00000020", 5, "cat"),
    (4, "n00000021", 5, "dog"),
    (5, "n00000030", -1, "animal"),
    (6, "n00000040", -1, "cat"),
]
TABBY, SIAMESE, BEAGLE, CAT, DOG, ANIMAL, WHIP = range(7)


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tree_file(tmp_path: Path, rows=TREE_ROWS, header: bool = True) -> Path:
    lines = [HEADER4] if header else []
    lines += ["\t".join(str(field) for field in row) for row in rows]
    return write(tmp_path / "tree.tsv", lines)


@pytest.fixture
def tree(tmp_path: Path) -> LabelVocabulary:
    return load_mlimages(tree_file(tmp_path))


# ---------------------------------------------------------------------------------------
# ML-Images hierarchy format
# ---------------------------------------------------------------------------------------


def test_tree_closure_is_built_whatever_the_line_order(tree: LabelVocabulary, tmp_path: Path) -> None:
    assert len(tree) == 7
    assert tree[SIAMESE] == Label(SIAMESE, "n00000011", "siamese, Siamese cat", CAT)
    assert tree.ancestors(TABBY) == (CAT, ANIMAL)  # nearest first
    assert tree.ancestors(ANIMAL) == ()
    assert tree.descendants(ANIMAL) == (TABBY, SIAMESE, BEAGLE, CAT, DOG)
    assert tree.descendants(CAT) == (TABBY, SIAMESE)
    assert tree.children(ANIMAL) == (CAT, DOG)
    assert [tree.depth(i) for i in range(7)] == [2, 2, 2, 1, 1, 0, 0]
    assert tree.max_depth == 2
    assert tree.roots == (ANIMAL, WHIP)
    assert tree.leaves == (TABBY, SIAMESE, BEAGLE, WHIP)
    assert tree.is_leaf(BEAGLE) and not tree.is_leaf(DOG)
    assert tree.by_wnid("n00000021").index == DOG
    assert "n00000021" in tree and "n99999999" not in tree
    with pytest.raises(KeyError, match="n99999999"):
        tree.by_wnid("n99999999")
    with pytest.raises(IndexError, match="out of range"):
        tree.ancestors(7)

    # Same labels, lines reversed and shuffled: identical vocabulary.
    shuffled = [TREE_ROWS[i] for i in (5, 2, 6, 0, 4, 1, 3)]
    assert load_mlimages(tree_file(tmp_path, shuffled)).labels == tree.labels
    assert load_mlimages(tree_file(tmp_path, shuffled)) == tree
    assert repr(tree).startswith("LabelVocabulary(7 labels, max depth 2, source=")


def test_duplicate_names_are_allowed_and_kept_apart(tree: LabelVocabulary) -> None:
    assert tree.names.count("cat") == 2
    assert tree[CAT].wnid != tree[WHIP].wnid
    assert tree.descendants(WHIP) == ()


@pytest.mark.parametrize("with_ids", [True, False])
def test_round_trip(tree: LabelVocabulary, tmp_path: Path, with_ids: bool) -> None:
    path = tmp_path / "out.tsv"
    write_mlimages(tree, path, with_ids=with_ids)
    header = path.read_text(encoding="utf-8").splitlines()[0].split("\t")
    assert len(header) == (4 if with_ids else 3)
    again = load_mlimages(path)
    if with_ids:
        assert again.labels == tree.labels
    else:  # the 3-column form has no WordNet ids
        assert [(lb.index, lb.parent, lb.name) for lb in again] == [
            (lb.index, lb.parent, lb.name) for lb in tree
        ]
        assert set(again.wnids) == {""}


def test_headerless_forms_are_detected_by_column_count(tmp_path: Path) -> None:
    four = load_mlimages(tree_file(tmp_path, header=False))
    rows = [(lb.index, lb.wnid, -1 if lb.parent is None else lb.parent, lb.name) for lb in four]
    assert rows == TREE_ROWS
    three = write(tmp_path / "three.tsv", ["0\t2\tleaf a", "1\t2\tleaf b", "2\t-1\troot"])
    vocab = load_mlimages(three)
    assert vocab.ancestors(0) == (2,) and vocab[1].wnid == ""
    # CRLF line endings and a trailing blank line are tolerated.
    crlf = tmp_path / "crlf.tsv"
    crlf.write_bytes(b"0\t1\tleaf\r\n1\t-1\troot\r\n\r\n")
    assert load_mlimages(crlf).names == ("leaf", "root")


def test_empty_wordnet_ids_are_allowed_and_round_trip(tmp_path: Path) -> None:
    vocab = LabelVocabulary((Label(0, "", "a", 1), Label(1, "", "b", None), Label(2, "n00000001", "c", 1)))
    write_mlimages(vocab, tmp_path / "v.tsv")
    assert load_mlimages(tmp_path / "v.tsv").labels == vocab.labels


def test_cycle_is_refused_and_named(tmp_path: Path) -> None:
    rows = [(0, "n1", 1, "a"), (1, "n2", 2, "b"), (2, "n3", 0, "c"), (3, "n4", -1, "root")]
    with pytest.raises(VocabularyError, match=r"cycle: labels 0 -> 1 -> 2 -> 0 .*lines 2, 3, 4"):
        load_mlimages(tree_file(tmp_path, rows))
    with pytest.raises(VocabularyError, match=r"cycle: labels 0 -> 0"):
        load_mlimages(tree_file(tmp_path, [(0, "n1", 0, "self"), (1, "n2", -1, "root")]))
    # The in-memory constructor refuses cycles too.
    with pytest.raises(VocabularyError, match="cycle"):
        LabelVocabulary((Label(0, "", "a", 1), Label(1, "", "b", 0)))


def test_dangling_parent_is_refused(tmp_path: Path) -> None:
    rows = [(0, "n1", 9, "orphan"), (1, "n2", -1, "root")]
    with pytest.raises(
        VocabularyError, match=r"tree\.tsv:2: label 0 \('orphan'\) has parent 9, but there is no label 9"
    ):
        load_mlimages(tree_file(tmp_path, rows))


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("2\tn3\t-1", r":4: expected 4 tab-separated fields .*found 3"),
        ("2\tn3\t-1\tname\textra", r":4: expected 4 tab-separated fields .*found 5"),
        ("two\tn3\t-1\tname", r":4: the label index must be an integer, got 'two'"),
        ("2\tn3\troot\tname", r":4: the parent index must be an integer, got 'root'"),
        ("2\tn3\t-1\t  ", r":4: label 2 has an empty name"),
        ("1\tn3\t-1\tname", r":4: label index 1 was already defined on line 3"),
        ("3\tn3\t-1\tname", r":4: label index 3 is out of range: 3 labels .*index 2 is missing"),
        ("2\tn1\t-1\tname", r":4: WordNet id n1 of label 2 is already used by label 0 on line 2"),
        ("2\tn3\t-5\tname", r":4: parent index must be >= 0, or -1"),
    ],
)
def test_malformed_lines_are_refused_with_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = write(tmp_path / "bad.tsv", [HEADER4, "0\tn1\t-1\troot", "1\tn2\t0\tchild", bad_line])
    with pytest.raises(VocabularyError, match="bad.tsv" + message):
        load_mlimages(path)


def test_bad_header_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(VocabularyError, match=r"h\.tsv:1: header has 2 tab-separated columns"):
        load_mlimages(write(tmp_path / "h.tsv", ["index\tname", "0\ta"]))
    with pytest.raises(VocabularyError, match="no labels"):
        load_mlimages(write(tmp_path / "e.tsv", ["", "  "]))
    assert issubclass(VocabularyError, ValueError)


def test_writer_refuses_fields_that_would_break_columns(tmp_path: Path) -> None:
    vocab = LabelVocabulary.from_names(["fine", "tab\there"])
    with pytest.raises(ValueError, match="label 1: its name 'tab\\\\there' contains a tab"):
        write_mlimages(vocab, tmp_path / "x.tsv")


# ---------------------------------------------------------------------------------------
# Flat label lists and NUS-WIDE JSON
# ---------------------------------------------------------------------------------------


def test_label_file(tmp_path: Path) -> None:
    path = write(tmp_path / "labels.txt", ["1\tgoldfish", "0\ttench", "2\tcrane", "3\tcrane"])
    vocab = load_label_file(path)
    assert vocab.names == ("tench", "goldfish", "crane", "crane")
    assert not vocab.has_hierarchy and vocab.ancestors(0) == ()
    write_label_file(vocab, tmp_path / "again.txt")
    assert load_label_file(tmp_path / "again.txt").names == vocab.names

    with pytest.raises(VocabularyError, match=r"l2\.txt:2: expected 2 tab-separated fields"):
        load_label_file(write(tmp_path / "l2.txt", ["0\ta", "1 b"]))
    with pytest.raises(VocabularyError, match=r"l3\.txt:2: label index 0 was already defined on line 1"):
        load_label_file(write(tmp_path / "l3.txt", ["0\ta", "0\tb"]))
    with pytest.raises(
        VocabularyError, match=r"l4\.txt:2: label index 5 is out of range.*index 1 is missing"
    ):
        load_label_file(write(tmp_path / "l4.txt", ["0\ta", "5\tb"]))


def test_nuswide_json(tmp_path: Path) -> None:
    good = tmp_path / "nus.json"
    good.write_text(
        json.dumps({"labels": ["sky", "clouds", "person"], "samples": [{"image": "a.jpg", "labels": [0]}]})
    )
    vocab = load_nuswide_json(good)
    assert vocab.names == ("sky", "clouds", "person") and len(vocab) == 3

    cases = {
        '{"labels": []}': r'"labels" must be a non-empty list',
        '{"samples": []}': r'expected a JSON object with a "labels" list',
        '{"labels": ["sky", 3]}': r'"labels"\[1\] must be a non-empty string, got 3',
        '{"labels": ["sky", " "]}': r'"labels"\[1\] must be a non-empty string',
        '{"labels": ["sky", "sea", "sky"]}': r'"labels"\[2\] \'sky\' repeats "labels"\[0\]',
        '{"labels": ["sky",\n  ]': r"bad\.json:2: not valid JSON",
    }
    for text, message in cases.items():
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(VocabularyError, match=message):
            load_nuswide_json(tmp_path / "bad.json")


def test_load_vocabulary_dispatches_on_extension_and_content(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"labels": ["x", "y"]}')
    (tmp_path / "b.txt").write_text('\n{"labels": ["x"]}')
    assert load_vocabulary(tmp_path / "a.json").names == ("x", "y")
    assert load_vocabulary(tmp_path / "b.txt").names == ("x",)
    assert load_vocabulary(write(tmp_path / "c.txt", ["0\tx", "1\ty"])).names == ("x", "y")
    assert load_vocabulary(tree_file(tmp_path)).ancestors(TABBY) == (CAT, ANIMAL)
    assert load_vocabulary(write(tmp_path / "d.txt", ["0\t-1\troot"])).names == ("root",)
    with pytest.raises(VocabularyError, match=r"e\.txt:1: cannot tell the vocabulary format"):
        load_vocabulary(write(tmp_path / "e.txt", ["just a name"]))


# ---------------------------------------------------------------------------------------
# Score propagation
# ---------------------------------------------------------------------------------------


def test_propagate_max_tags_ancestors_with_the_best_predicted_descendant(tree: LabelVocabulary) -> None:
    scores = np.zeros((3, 7))
    predicted = np.zeros((3, 7), dtype=bool)
    # Image 0: two cats and a directly predicted dog (its beagle child is not predicted).
    scores[0, [TABBY, SIAMESE, DOG, BEAGLE]] = [0.9, 0.6, 0.55, 0.3]
    predicted[0, [TABBY, SIAMESE, DOG]] = True
    # Image 1: "cat" predicted itself, above its predicted child: its own score wins.
    scores[1, [CAT, TABBY]] = [0.95, 0.7]
    predicted[1, [CAT, TABBY]] = True
    # Image 2: "cat" scored 0.45 but not predicted; only the child's predicted score counts.
    scores[2, [CAT, SIAMESE]] = [0.45, 0.3]
    predicted[2, SIAMESE] = True

    tags = propagate_max(tree, scores, predicted)
    assert tags[0] == [
        HierarchyTag(TABBY, 0.9, False),
        HierarchyTag(CAT, 0.9, True),  # max(0.9, 0.6)
        HierarchyTag(ANIMAL, 0.9, True),  # max(0.9, 0.6, 0.55)
        HierarchyTag(SIAMESE, 0.6, False),
        HierarchyTag(DOG, 0.55, False),
    ]
    assert tags[1] == [
        HierarchyTag(CAT, 0.95, False),
        HierarchyTag(ANIMAL, 0.95, True),
        HierarchyTag(TABBY, 0.7, False),
    ]
    assert tags[2] == [
        HierarchyTag(SIAMESE, 0.3, False),
        HierarchyTag(CAT, 0.3, True),
        HierarchyTag(ANIMAL, 0.3, True),
    ]

    with pytest.raises(ValueError, match="7 labels"):
        propagate_max(tree, scores[:, :6], predicted[:, :6])


def test_propagate_max_ancestor_never_scores_below_a_predicted_child(tree: LabelVocabulary) -> None:
    rng = np.random.default_rng(0)
    scores = rng.random((50, 7))
    predicted = scores > 0.6
    for row, tags in enumerate(propagate_max(tree, scores, predicted)):
        by_index = {tag.index: tag for tag in tags}
        expected = set(np.flatnonzero(predicted[row]))
        for index in list(expected):
            expected.update(tree.ancestors(index))
        assert set(by_index) == expected
        for tag in tags:
            assert tag.from_hierarchy == (not predicted[row, tag.index])
            for child in tree.children(tag.index):
                if child in by_index:
                    assert tag.score >= by_index[child].score


def test_propagate_sum_on_a_hand_made_tree(tree: LabelVocabulary) -> None:
    probs = np.array([[0.5, 0.2, 0.3], [0.0, 0.0, 1.0]], dtype=np.float32)
    scores = propagate_sum(tree, probs)
    assert scores.shape == (2, 7) and scores.dtype == np.float32
    # tabby, siamese, beagle keep their own; cat = 0.5 + 0.2; dog = 0.3; animal = all three;
    # the whip "cat" has no outputs below it.
    np.testing.assert_allclose(scores[0], [0.5, 0.2, 0.3, 0.7, 0.3, 1.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(scores[1], [0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0], rtol=1e-6)
    membership = tree.leaf_membership(3)
    assert membership.shape == (3, 7) and set(np.unique(membership)) == {0.0, 1.0}
    assert tree.leaf_membership(3) is membership  # cached, not rebuilt per request
    with pytest.raises(ValueError, match="n_leaves must be in 1..7"):
        propagate_sum(tree, np.ones((1, 8)))


# ---------------------------------------------------------------------------------------
# The committed ImageNet WordNet hierarchy
# ---------------------------------------------------------------------------------------

WORDNET_FILE = Path(vision.__file__).parent / "labels" / "data" / "imagenet_wordnet_hierarchy.tsv"


@pytest.fixture(scope="module")
def imagenet() -> LabelVocabulary:
    return load_mlimages(WORDNET_FILE)


def names_of(vocab: LabelVocabulary, indices) -> set[str]:
    return {vocab[i].name for i in indices}


def test_wordnet_file_layout(imagenet: LabelVocabulary) -> None:
    assert WORDNET_FILE.read_text(encoding="utf-8").startswith(HEADER4 + "\n")
    assert len(imagenet) == 1808
    assert imagenet.max_depth == 18
    assert [imagenet[r].wnid for r in imagenet.roots] == ["n00001740"]  # entity
    # Model output order: index == ImageNet-1k class id, and every class is a leaf.
    assert (imagenet[0].wnid, imagenet[0].name) == ("n01440764", "tench")
    assert (imagenet[999].wnid, imagenet[999].name) == ("n15075141", "toilet tissue")
    assert all(imagenet.is_leaf(i) for i in range(1000))
    assert not any(imagenet.is_leaf(i) for i in range(1000, len(imagenet)))


def test_wordnet_espresso_and_cats(imagenet: LabelVocabulary) -> None:
    assert imagenet[967].name == "espresso"
    assert {"coffee", "beverage", "food", "substance", "entity"} <= names_of(
        imagenet, imagenet.ancestors(967)
    )
    assert imagenet[imagenet.ancestors(967)[0]].name == "coffee"
    expected_cat = {"domestic cat", "cat", "feline", "carnivore", "mammal", "animal", "organism"}
    for index, name in zip(
        range(281, 286), ["tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"], strict=True
    ):
        assert imagenet[index].name == name
        assert expected_cat <= names_of(imagenet, imagenet.ancestors(index))
    domestic_cat = imagenet.by_wnid("n02121808")
    assert set(range(281, 286)) <= set(imagenet.descendants(domestic_cat.index))


def test_wordnet_propagate_sum(imagenet: LabelVocabulary) -> None:
    probs = np.full((2, 1000), 1 / 1000, dtype=np.float32)
    probs[1] = 0
    probs[1, [281, 282, 967]] = [0.5, 0.3, 0.2]
    scores = propagate_sum(imagenet, probs)
    root = imagenet.roots[0]
    np.testing.assert_allclose(scores[:, root], 1.0, rtol=1e-5)
    assert scores.max() <= 1.0 + 1e-5
    feline = imagenet.by_wnid("n02120997")  # feline, felid
    assert scores[1, feline.index] == pytest.approx(0.8)
    assert scores[1, imagenet.by_wnid("n07929519").index] == pytest.approx(0.2)  # coffee
