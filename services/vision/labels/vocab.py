"""Label vocabularies for the tagging and classification services.

A vocabulary is an ordered list of labels. Each label has

* ``index``  — its position, equal to the model output index it names;
* ``wnid``   — an optional WordNet id such as ``"n01440764"`` ("" when unknown);
* ``name``   — a human-readable name;
* ``parent`` — the index of its single parent in a semantic hierarchy, or ``None``.

Labels are looked up by index or WordNet id and never by name: real vocabularies
repeat names (the 11,166-label Tencent ML-Images hierarchy has hundreds of
duplicates, ImageNet-1k has two "crane"s and two "maillot"s).

File formats read here:

* Tencent ML-Images dictionary with hierarchy, 4 tab-separated columns
  (``index, wnid, parent index or -1, name``) under the header
  ``category_index  category_id  index_of_parent_category  category name``,
  or the older 3-column form ``index, parent, name`` (header optional);
  see :func:`load_mlimages`.
* A plain label list, ``index<TAB>name`` per line; see :func:`load_label_file`.
* NUS-WIDE-style JSON ``{"labels": [...], "samples": [...]}``; see
  :func:`load_nuswide_json`.

:func:`load_vocabulary` picks one of these from the file's extension and content.

The hierarchy helpers :func:`propagate_max` and :func:`propagate_sum` turn model
scores into scores for ancestor concepts; they are pure numpy.
"""

from __future__ import annotations

import graphlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "HierarchyTag",
    "Label",
    "LabelVocabulary",
    "VocabularyError",
    "load_label_file",
    "load_mlimages",
    "load_nuswide_json",
    "load_vocabulary",
    "propagate_max",
    "propagate_sum",
    "write_label_file",
    "write_mlimages",
]

PathLike = str | os.PathLike[str]

MLIMAGES_HEADER_4 = ("category_index", "category_id", "index_of_parent_category", "category name")
MLIMAGES_HEADER_3 = ("category_index", "index_of_parent_category", "category name")


class VocabularyError(ValueError):
    """A vocabulary file or label list is malformed; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Label:
    index: int
    wnid: str
    name: str
    parent: int | None = None


@dataclass(frozen=True, slots=True)
class HierarchyTag:
    """One tag produced by :func:`propagate_max`.

    ``from_hierarchy`` is True when the label was not predicted itself and is
    present only because one of its descendants was.
    """

    index: int
    score: float
    from_hierarchy: bool


# --------------------------------------------------------------------------------------
# The vocabulary
# --------------------------------------------------------------------------------------


def _find_cycle(parents: Sequence[int | None]) -> list[int] | None:
    """Return the indices of one parent cycle (in parent order, from its lowest index), or None if there is
    none."""
    graph = {child: () if parent is None else (parent,) for child, parent in enumerate(parents)}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        # graphlib lists the cycle parent before child, first node repeated at the end.
        cycle = exc.args[1][-1:0:-1]
        start = cycle.index(min(cycle))
        return cycle[start:] + cycle[:start]
    return None


@dataclass(frozen=True)
class LabelVocabulary:
    """An ordered, immutable list of labels with an optional single-parent hierarchy.

    Construct it from :class:`Label` objects whose indices are exactly
    ``0..N-1`` (in any order; they are sorted), or use :meth:`from_names` for a
    flat list. The ancestor closure is computed once here, so
    :meth:`ancestors`, :meth:`descendants` and :meth:`depth` are lookups.

    ``source`` names where the labels came from; it appears in error messages.
    """

    labels: tuple[Label, ...] = field(repr=False)
    # Two vocabularies with the same labels are equal wherever they were read from.
    source: str = field(default="<memory>", compare=False)
    _ancestors: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)
    _descendants: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)
    _children: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)
    _by_wnid: dict[str, int] = field(init=False, repr=False, compare=False)
    _membership_cache: dict[int, np.ndarray] = field(init=False, repr=False, compare=False)
    _sum_plan_cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        labels = tuple(sorted(self.labels, key=lambda label: label.index))
        n = len(labels)
        for position, label in enumerate(labels):
            if label.index != position:
                raise VocabularyError(
                    f"{self.source}: label indices must be exactly 0..{n - 1}; "
                    f"found {label.index} where {position} was expected"
                )
            if label.parent is not None and not 0 <= label.parent < n:
                raise VocabularyError(
                    f"{self.source}: label {label.index} ({label.name!r}) has parent {label.parent}, "
                    f"but there is no label {label.parent}"
                )
        by_wnid: dict[str, int] = {}
        for label in labels:
            if not label.wnid:
                continue
            if label.wnid in by_wnid:
                raise VocabularyError(
                    f"{self.source}: WordNet id {label.wnid} is used by labels "
                    f"{by_wnid[label.wnid]} and {label.index}"
                )
            by_wnid[label.wnid] = label.index
        parents = [label.parent for label in labels]
        cycle = _find_cycle(parents)
        if cycle is not None:
            raise VocabularyError(f"{self.source}: the hierarchy has a cycle: {_describe_cycle(cycle)}")

        # Ancestors are filled parents-first by memoised walks, so line order in the
        # source file never matters.
        ancestors: list[tuple[int, ...] | None] = [None] * n
        for start in range(n):
            chain: list[int] = []
            node: int | None = start
            while node is not None and ancestors[node] is None:
                chain.append(node)
                node = parents[node]
            known: tuple[int, ...] = () if node is None else (node, *ancestors[node])  # type: ignore[misc]
            for member in reversed(chain):
                ancestors[member] = known
                known = (member, *known)
        descendants: list[list[int]] = [[] for _ in range(n)]
        children: list[list[int]] = [[] for _ in range(n)]
        for index in range(n):
            for ancestor in ancestors[index]:  # type: ignore[union-attr]
                descendants[ancestor].append(index)
            if parents[index] is not None:
                children[parents[index]].append(index)  # type: ignore[index]

        set_ = object.__setattr__  # the dataclass is frozen; these are derived caches
        set_(self, "labels", labels)
        set_(self, "_ancestors", tuple(ancestors))
        set_(self, "_descendants", tuple(tuple(d) for d in descendants))
        set_(self, "_children", tuple(tuple(c) for c in children))
        set_(self, "_by_wnid", by_wnid)
        set_(self, "_membership_cache", {})
        set_(self, "_sum_plan_cache", {})

    @classmethod
    def from_names(cls, names: Sequence[str], *, source: str = "<memory>") -> LabelVocabulary:
        """A flat vocabulary (no WordNet ids, no hierarchy) from names in index order."""
        return cls(tuple(Label(i, "", name, None) for i, name in enumerate(names)), source=source)

    # -- basic access ------------------------------------------------------------------

    def __repr__(self) -> str:  # the default would print every label
        return f"LabelVocabulary({len(self)} labels, max depth {self.max_depth}, source={self.source!r})"

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[Label]:
        return iter(self.labels)

    def __getitem__(self, index: int) -> Label:
        return self.labels[self._check(index)]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(label.name for label in self.labels)

    @property
    def wnids(self) -> tuple[str, ...]:
        return tuple(label.wnid for label in self.labels)

    @property
    def has_hierarchy(self) -> bool:
        return any(label.parent is not None for label in self.labels)

    def by_wnid(self, wnid: str) -> Label:
        """The label with this WordNet id; KeyError if there is none."""
        try:
            return self.labels[self._by_wnid[wnid]]
        except KeyError:
            raise KeyError(f"{self.source}: no label has WordNet id {wnid!r}") from None

    def __contains__(self, wnid: object) -> bool:
        return wnid in self._by_wnid

    # -- hierarchy ---------------------------------------------------------------------

    def parent(self, index: int) -> int | None:
        return self.labels[self._check(index)].parent

    def children(self, index: int) -> tuple[int, ...]:
        """Direct children, in index order."""
        return self._children[self._check(index)]

    def ancestors(self, index: int) -> tuple[int, ...]:
        """Ancestors from the parent up to the root; the label itself is not included."""
        return self._ancestors[self._check(index)]

    def descendants(self, index: int) -> tuple[int, ...]:
        """All labels below this one, in index order; the label itself is not included."""
        return self._descendants[self._check(index)]

    def depth(self, index: int) -> int:
        """0 for a root, 1 for its children, and so on."""
        return len(self._ancestors[self._check(index)])

    def is_leaf(self, index: int) -> bool:
        return not self._children[self._check(index)]

    @property
    def roots(self) -> tuple[int, ...]:
        return tuple(label.index for label in self.labels if label.parent is None)

    @property
    def leaves(self) -> tuple[int, ...]:
        return tuple(i for i, kids in enumerate(self._children) if not kids)

    @property
    def max_depth(self) -> int:
        return max((len(a) for a in self._ancestors), default=0)

    def leaf_membership(self, n_leaves: int) -> np.ndarray:
        """The (n_leaves, N) float32 0/1 matrix M with M[j, i] = 1 iff output j is i or below i.

        Used by :func:`propagate_sum`: ``probs @ M`` sums, for every label, the
        probabilities of the distinct model outputs under it. Cached per
        ``n_leaves``; the returned array is read-only.
        """
        if not 0 < n_leaves <= len(self):
            raise ValueError(
                f"{self.source}: n_leaves must be in 1..{len(self)} (the vocabulary size), got {n_leaves}"
            )
        cached = self._membership_cache.get(n_leaves)
        if cached is None:
            cached = np.zeros((n_leaves, len(self)), dtype=np.float32)
            for output in range(n_leaves):
                # Assigning through an index array sets each cell once, so an output
                # reachable twice could never be counted twice.
                cached[output, [output, *self._ancestors[output]]] = 1.0
            cached.setflags(write=False)
            self._membership_cache[n_leaves] = cached
        return cached

    def _check(self, index: int) -> int:
        if not 0 <= index < len(self.labels):
            raise IndexError(f"{self.source}: label index {index} is out of range 0..{len(self.labels) - 1}")
        return index


def _describe_cycle(cycle: Sequence[int], lines: dict[int, int] | None = None) -> str:
    path = " -> ".join(str(i) for i in (*cycle, cycle[0]))
    text = f"labels {path} (each is the parent of the one before it)"
    if lines:
        text += "; lines " + ", ".join(str(lines[i]) for i in cycle)
    return text


# --------------------------------------------------------------------------------------
# Tencent ML-Images dictionary with hierarchy
# --------------------------------------------------------------------------------------


def _read_lines(path: PathLike) -> list[str]:
    # utf-8-sig drops a byte-order mark that editors on Windows like to add.
    try:
        with open(path, encoding="utf-8-sig", newline=None) as fh:
            return fh.read().split("\n")
    except UnicodeDecodeError as exc:
        raise VocabularyError(f"{path}: not UTF-8 text ({exc})") from None


def _parse_int(text: str, what: str, where: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise VocabularyError(f"{where}: {what} must be an integer, got {text!r}") from None


def _is_int(text: str) -> bool:
    try:
        int(text.strip())
    except ValueError:
        return False
    return True


def load_mlimages(path: PathLike) -> LabelVocabulary:
    """Read a Tencent ML-Images dictionary-with-hierarchy file.

    The 4-column form is ``index<TAB>wnid<TAB>parent<TAB>name`` with ``parent``
    ``-1`` for a root; the 3-column form drops ``wnid``. A header line is
    recognised by a non-integer first field and fixes the column count;
    without one, the column count is taken from the first line (its second
    field is an integer only in the 3-column form). Blank lines are ignored.
    Labels may be listed in any order, children before their parents.

    Raises :class:`VocabularyError`, naming the file and line, for malformed
    lines, non-integer or duplicate indices, indices that are not ``0..N-1``,
    parents that do not exist, parent cycles and repeated WordNet ids.
    """
    lines = _read_lines(path)
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise VocabularyError(f"{path}: the file has no labels")

    first_number, first_line = numbered[0]
    first_fields = first_line.split("\t")
    if not _is_int(first_fields[0]):
        n_columns = len(first_fields)
        if n_columns not in (3, 4):
            raise VocabularyError(
                f"{path}:{first_number}: header has {n_columns} tab-separated columns; expected "
                f"4 ({', '.join(MLIMAGES_HEADER_4)}) or 3 ({', '.join(MLIMAGES_HEADER_3)})"
            )
        numbered = numbered[1:]
    elif len(first_fields) >= 2 and _is_int(first_fields[1]):
        n_columns = 3
    else:
        n_columns = 4

    labels: list[Label] = []
    line_of: dict[int, int] = {}
    line_of_wnid: dict[str, tuple[int, int]] = {}
    for number, line in numbered:
        where = f"{path}:{number}"
        fields = line.split("\t")
        if len(fields) != n_columns:
            layout = "index, WordNet id, parent, name" if n_columns == 4 else "index, parent, name"
            raise VocabularyError(
                f"{where}: expected {n_columns} tab-separated fields ({layout}), "
                f"found {len(fields)}: {line!r}"
            )
        if n_columns == 4:
            index_text, wnid, parent_text, name = fields
        else:
            index_text, parent_text, name = fields
            wnid = ""
        index = _parse_int(index_text, "the label index", where)
        parent = _parse_int(parent_text, "the parent index", where)
        wnid, name = wnid.strip(), name.strip()
        if not name:
            raise VocabularyError(f"{where}: label {index} has an empty name")
        if any(ch.isspace() for ch in wnid):
            raise VocabularyError(f"{where}: WordNet id {wnid!r} contains whitespace")
        if index < 0:
            raise VocabularyError(f"{where}: label index must be >= 0, got {index}")
        if parent < -1:
            raise VocabularyError(f"{where}: parent index must be >= 0, or -1 for a root; got {parent}")
        if index in line_of:
            raise VocabularyError(
                f"{where}: label index {index} was already defined on line {line_of[index]}"
            )
        if wnid:
            if wnid in line_of_wnid:
                other_index, other_line = line_of_wnid[wnid]
                raise VocabularyError(
                    f"{where}: WordNet id {wnid} of label {index} is already used by label "
                    f"{other_index} on line {other_line}"
                )
            line_of_wnid[wnid] = (index, number)
        line_of[index] = number
        labels.append(Label(index, wnid, name, None if parent == -1 else parent))

    n = len(labels)
    for label in labels:
        if label.index >= n:
            missing = min(set(range(n)) - line_of.keys())
            raise VocabularyError(
                f"{path}:{line_of[label.index]}: label index {label.index} is out of range: "
                f"{n} labels must use indices 0..{n - 1}, and index {missing} is missing"
            )
    for label in labels:
        if label.parent is not None and label.parent not in line_of:
            raise VocabularyError(
                f"{path}:{line_of[label.index]}: label {label.index} ({label.name!r}) has parent "
                f"{label.parent}, but there is no label {label.parent}"
            )
    parents: list[int | None] = [None] * n
    for label in labels:
        parents[label.index] = label.parent
    cycle = _find_cycle(parents)
    if cycle is not None:
        raise VocabularyError(f"{path}: the hierarchy has a cycle: {_describe_cycle(cycle, line_of)}")
    return LabelVocabulary(tuple(labels), source=str(path))


def _checked_field(text: str, what: str, label: Label) -> str:
    # A tab or newline inside a field would silently shift columns or split a label on re-read.
    if "\t" in text or "\n" in text or "\r" in text:
        raise ValueError(f"cannot write label {label.index}: its {what} {text!r} contains a tab or newline")
    return text


def write_mlimages(vocab: LabelVocabulary, path: PathLike, *, with_ids: bool = True) -> None:
    """Write ``vocab`` in the ML-Images hierarchy format, with a header line.

    ``with_ids=True`` writes the 4-column form (empty WordNet ids stay empty);
    ``with_ids=False`` writes the older 3-column form without ids.
    """
    rows = ["\t".join(MLIMAGES_HEADER_4 if with_ids else MLIMAGES_HEADER_3)]
    for label in vocab:
        parent = str(-1 if label.parent is None else label.parent)
        name = _checked_field(label.name, "name", label)
        if with_ids:
            rows.append(
                "\t".join((str(label.index), _checked_field(label.wnid, "WordNet id", label), parent, name))
            )
        else:
            rows.append("\t".join((str(label.index), parent, name)))
    Path(path).write_text("\n".join(rows) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------
# Plain label lists and NUS-WIDE JSON
# --------------------------------------------------------------------------------------


def load_label_file(path: PathLike) -> LabelVocabulary:
    """Read a flat label list, ``index<TAB>name`` per line, indices ``0..N-1`` in any order.

    This is the ML-Images style list used to give a classification model's
    outputs their names. Blank lines are ignored; names may repeat.
    """
    names: dict[int, str] = {}
    line_of: dict[int, int] = {}
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        fields = line.split("\t")
        if len(fields) != 2:
            raise VocabularyError(
                f"{where}: expected 2 tab-separated fields (index, name), found {len(fields)}: {line!r}"
            )
        index = _parse_int(fields[0], "the label index", where)
        name = fields[1].strip()
        if index < 0:
            raise VocabularyError(f"{where}: label index must be >= 0, got {index}")
        if not name:
            raise VocabularyError(f"{where}: label {index} has an empty name")
        if index in names:
            raise VocabularyError(
                f"{where}: label index {index} was already defined on line {line_of[index]}"
            )
        names[index] = name
        line_of[index] = number
    if not names:
        raise VocabularyError(f"{path}: the file has no labels")
    n = len(names)
    for index in names:
        if index >= n:
            missing = min(set(range(n)) - names.keys())
            raise VocabularyError(
                f"{path}:{line_of[index]}: label index {index} is out of range: {n} labels must use "
                f"indices 0..{n - 1}, and index {missing} is missing"
            )
    return LabelVocabulary.from_names([names[i] for i in range(n)], source=str(path))


def write_label_file(vocab: LabelVocabulary, path: PathLike) -> None:
    """Write ``index<TAB>name`` lines, the format :func:`load_label_file` reads."""
    rows = [f"{label.index}\t{_checked_field(label.name, 'name', label)}" for label in vocab]
    Path(path).write_text("\n".join(rows) + "\n", encoding="utf-8")


def load_nuswide_json(path: PathLike) -> LabelVocabulary:
    """Read the labels of a NUS-WIDE-style JSON file ``{"labels": [...], "samples": [...]}``.

    Only ``labels`` is used here (``samples`` is for training). It must be a
    non-empty list of distinct, non-empty strings; label ``i`` gets index ``i``.
    """
    try:
        with open(path, encoding="utf-8-sig") as fh:
            document = json.load(fh)
    except json.JSONDecodeError as exc:
        raise VocabularyError(
            f"{path}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})"
        ) from None
    except UnicodeDecodeError as exc:
        raise VocabularyError(f"{path}: not UTF-8 text ({exc})") from None
    if not isinstance(document, dict) or "labels" not in document:
        raise VocabularyError(f'{path}: expected a JSON object with a "labels" list')
    labels = document["labels"]
    if not isinstance(labels, list) or not labels:
        raise VocabularyError(f'{path}: "labels" must be a non-empty list of strings')
    seen: dict[str, int] = {}
    for position, name in enumerate(labels):
        if not isinstance(name, str) or not name.strip():
            raise VocabularyError(f'{path}: "labels"[{position}] must be a non-empty string, got {name!r}')
        if name in seen:
            raise VocabularyError(f'{path}: "labels"[{position}] {name!r} repeats "labels"[{seen[name]}]')
        seen[name] = position
    return LabelVocabulary.from_names(labels, source=str(path))


def load_vocabulary(path: PathLike) -> LabelVocabulary:
    """Read any supported vocabulary file, choosing the parser from extension and content.

    ``.json`` files, or files whose first non-blank character is ``{``, are read
    as NUS-WIDE JSON. Otherwise the first non-blank line decides: an ML-Images
    header, or 3 or 4 tab-separated fields, means the hierarchy format; 2 fields
    mean a plain label list.
    """
    if Path(path).suffix.lower() == ".json":
        return load_nuswide_json(path)
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            return load_nuswide_json(path)
        n_fields = len(line.split("\t"))
        if n_fields in (3, 4):
            return load_mlimages(path)
        if n_fields == 2:
            return load_label_file(path)
        raise VocabularyError(
            f"{path}:{number}: cannot tell the vocabulary format: expected 2 tab-separated fields "
            f"(index, name), 3 or 4 (ML-Images hierarchy), or a JSON object; found {n_fields} field(s)"
        )
    raise VocabularyError(f"{path}: the file has no labels")


# --------------------------------------------------------------------------------------
# Hierarchy scoring
# --------------------------------------------------------------------------------------


def _as_matrix(name: str, array: np.ndarray, n_columns: int | None, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_images, {what}), got shape {array.shape}")
    if n_columns is not None and array.shape[1] != n_columns:
        raise ValueError(f"{name} has {array.shape[1]} columns but the vocabulary has {n_columns} labels")
    return array


def propagate_max(
    vocab: LabelVocabulary, scores: np.ndarray, predicted: np.ndarray
) -> list[list[HierarchyTag]]:
    """Add the ancestors of predicted labels, for multi-label (sigmoid) models.

    ``scores`` and ``predicted`` are ``(n_images, len(vocab))``: a score and a
    boolean "tagged" decision (for example ``scores >= thresholds``) per label.
    For each image, every predicted label is returned with its own score and
    ``from_hierarchy=False``; every ancestor of a predicted label is returned
    too, scored by the maximum over the predicted labels below it, and also
    its own score when it was predicted itself. An ancestor that was not
    predicted therefore gets ``from_hierarchy=True`` and a score no lower than
    any of its predicted descendants'; its own (below-threshold) score is not
    used, so one confident child is enough to carry the parent.

    Returns one list per image, sorted by score (highest first), then index.
    """
    scores = _as_matrix("scores", scores, len(vocab), "n_labels")
    predicted = _as_matrix("predicted", predicted, len(vocab), "n_labels").astype(bool, copy=False)
    if predicted.shape != scores.shape:
        raise ValueError(f"predicted has shape {predicted.shape} but scores has {scores.shape}")

    results: list[list[HierarchyTag]] = []
    for row_scores, row_predicted in zip(scores, predicted, strict=True):
        best: dict[int, float] = {}
        own = np.flatnonzero(row_predicted)
        for index in own.tolist():
            score = float(row_scores[index])
            for label in (index, *vocab.ancestors(index)):
                if best.get(label, -np.inf) < score:
                    best[label] = score
        own_set = set(own.tolist())
        tags = [HierarchyTag(label, score, label not in own_set) for label, score in best.items()]
        tags.sort(key=lambda tag: (-tag.score, tag.index))
        results.append(tags)
    return results


def propagate_sum(vocab: LabelVocabulary, leaf_probs: np.ndarray) -> np.ndarray:
    """Score every label of a hierarchy from a softmax over its first ``n_leaves`` labels.

    For a single-label classifier (e.g. ImageNet-1k) whose outputs are labels
    ``0..n_leaves-1`` of ``vocab`` (``n_leaves = leaf_probs.shape[1]``) and
    whose ancestor concepts have indices ``>= n_leaves``. The score of label
    ``i`` is the summed probability of the distinct model outputs that are
    ``i`` itself or below it: the probability that the image shows some kind
    of ``i``. An output is counted once however it is reached. Output labels
    keep their own probability (plus that of any output below them), and
    labels with no output below them score 0.

    Returns ``(n_images, len(vocab))`` scores in ``leaf_probs``'s float dtype
    (float32 for non-float input): ``leaf_probs @ vocab.leaf_membership(n_leaves)``,
    computed from the matrix's non-zeros (cached).
    """
    leaf_probs = _as_matrix("leaf_probs", leaf_probs, None, "n_leaves")
    outputs, labels, starts = _sum_plan(vocab, leaf_probs.shape[1])
    dtype = leaf_probs.dtype if np.issubdtype(leaf_probs.dtype, np.floating) else np.float32
    # Equal to ``leaf_probs @ leaf_membership`` but without BLAS: the matrix is ~99% zeros (ImageNet under
    # WordNet: ~12k ones in 1000x1808), and a multithreaded BLAS call on a serving thread competes with the
    # inference engine's threads (measured: +7 ms per Tag request on 2 cores). Sums accumulate in float64.
    sums = np.add.reduceat(leaf_probs[:, outputs].astype(np.float64), starts, axis=1)
    scores = np.zeros((leaf_probs.shape[0], len(vocab)), dtype=dtype)
    scores[:, labels] = sums
    return scores


def _sum_plan(vocab: LabelVocabulary, n_leaves: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The non-zeros of ``leaf_membership(n_leaves)`` grouped by label, cached on the vocabulary.

    Returns (outputs, labels, starts): ``outputs[starts[k]:starts[k+1]]`` are the outputs at or below
    ``labels[k]``; labels with no output below them are absent (they score 0).
    """
    plan = vocab._sum_plan_cache.get(n_leaves)
    if plan is None:
        labels, outputs = np.nonzero(vocab.leaf_membership(n_leaves).T)  # sorted by label, then output
        starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
        plan = (outputs, labels[starts], starts)
        vocab._sum_plan_cache[n_leaves] = plan
    return plan
