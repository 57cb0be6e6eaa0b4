"""Tagging: model outputs → a variable number of tags per image, with per-label thresholds and a hierarchy.

Pure numpy and files: no gRPC. A `Tagger` is built once per served model at start-up (`load_tagger`) and
turns a batch of logits into tags. Two scoring modes, chosen by the model's head:

``max`` — multi-label heads (``task="multilabel"``, sigmoid per output).
    An output label is *predicted* when its sigmoid score ≥ its threshold. Every ancestor of a predicted
    label is tagged too, scored by the maximum over its predicted descendants (and its own score when it
    was predicted itself), so an ancestor never scores below a tagged child (`vocab.propagate_max`).
    Tags are ordered by score, highest first; ties (an ancestor and its best child) list the more
    specific label first.

``sum`` — single-label classifiers (``task="classification"``, softmax) with a hierarchy over their classes,
    e.g. ImageNet-1k under WordNet. The score of a concept is the summed probability of the model's classes
    at or below it (`vocab.propagate_sum`): the probability that the image shows *some kind of* that concept,
    so an ancestor never scores below a child. A concept is tagged when its score ≥ its threshold. Concepts
    that contain every model output (WordNet's root ``entity``) score 1 whatever the image and are never
    returned. Tags are ordered **most specific first**: every tag precedes its ancestors, and the next
    tag is always the highest-scoring one whose tagged descendants are all listed already. So sibling
    classes come before their parent (tabby, Egyptian cat, tiger cat, domestic cat, cat, ...), and a branch
    is followed upwards while it stays the most confident. With the default threshold 0.5 the tags form
    one chain, listed from the leaf to the root.

Both modes:

* Thresholds: the model's per-label thresholds (a calibration file, `load_thresholds`) or its default
  (0.5). A request's ``threshold`` replaces them all for that request.
* ``min_score`` then drops tags whose final score (after propagation) is below it; ``max_tags`` keeps the
  first ``max_tags`` tags in the order above (by score for ``max``, most specific first for ``sum``).
* ``from_hierarchy`` is True when the label's own model output did not pass its threshold (or the label has
  no output): the tag is there only because of labels below it.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from vision.core.errors import ConfigurationError, InvalidArgument
from vision.labels.vocab import LabelVocabulary, propagate_max, propagate_sum
from vision.media.views import CENTER, ViewSpec
from vision.models.card import TAGGING as TASK
from vision.models.signature import LOGITS
from vision.tasks.classification import sigmoid, softmax

if TYPE_CHECKING:
    from vision.models.card import ModelCard
    from vision.tasks.contract import ViewOutputs

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
# `hierarchy` values of a model configuration that are not file paths.
HIERARCHY_WORDNET = "wordnet"
HIERARCHY_NONE = "none"

Mode = Literal["max", "sum"]


@dataclass(frozen=True, slots=True)
class Tag:
    index: int
    label: str
    wnid: str
    score: float
    from_hierarchy: bool
    depth: int


@dataclass(frozen=True)
class TagOptions:
    """Per-request knobs; None means "not set". Invalid values raise `InvalidArgument` on construction."""

    threshold: float | None = None
    max_tags: int | None = None
    min_score: float | None = None

    def __post_init__(self) -> None:
        for name in ("threshold", "min_score"):
            value = getattr(self, name)
            # `not 0 <= x <= 1` is also true for NaN.
            if value is not None and not 0.0 <= value <= 1.0:
                raise InvalidArgument(f"{name} must be between 0 and 1, got {value}")
        if self.max_tags is not None and self.max_tags < 1:
            raise InvalidArgument(
                f"max_tags must be at least 1 (leave it unset for no limit), got {self.max_tags}"
            )


# --------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Thresholds:
    """One threshold per label of a tag vocabulary; `per_label` is read-only float64, shape (n_labels,)."""

    default: float
    per_label: np.ndarray
    # Labels whose threshold the file set explicitly (the rest use `default`).
    n_calibrated: int = 0
    source: str = ""

    @classmethod
    def constant(cls, n_labels: int, value: float = DEFAULT_THRESHOLD) -> Thresholds:
        per_label = np.full(n_labels, value, dtype=np.float64)
        per_label.setflags(write=False)
        return cls(default=value, per_label=per_label)


# Keys a thresholds file may have. "fallback", "f1" and "fitted" are what
# `vision.evaluation.tagging.ThresholdSelection.as_dict()` writes, so its output can be saved as-is.
_THRESHOLD_KEYS = ("default", "fallback", "thresholds", "f1", "fitted", "metadata")


def _threshold_value(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigurationError(f"{where} must be a number between 0 and 1, got {json.dumps(value)}")
    return float(value)


def load_thresholds(path: Path, vocab: LabelVocabulary, n_outputs: int) -> Thresholds:
    """Read a thresholds (calibration) file for a model whose tag vocabulary is `vocab`.

    JSON object::

        {"default": 0.5,                                  # optional; 0.5 when absent
         "thresholds": {"2": 0.35, "n02121620": 0.7}}     # label index or WordNet id -> threshold

    or ``"thresholds": [t0, t1, ...]`` with one value per label of the vocabulary, or one per model output
    (hierarchy concepts then use ``default``). Every value is in [0, 1]. The output of
    ``vision.evaluation.tagging.best_f1_thresholds(...).as_dict()`` (keys thresholds, fallback, f1, fitted) is
    accepted as written, its ``fallback`` serving as ``default``. Raises `ConfigurationError` naming the
    file and the offending entry.
    """
    where = str(path)
    if not path.is_file():
        raise ConfigurationError(f"thresholds file {path} does not exist")
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ConfigurationError(
            f"{where}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})"
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{where}: not UTF-8 text ({exc})") from None
    if not isinstance(document, dict):
        raise ConfigurationError(f'{where}: expected a JSON object with "default" and/or "thresholds"')
    unknown = sorted(set(document) - set(_THRESHOLD_KEYS))
    if unknown:
        raise ConfigurationError(f"{where}: unknown key(s) {unknown}; allowed: {list(_THRESHOLD_KEYS)}")
    default = DEFAULT_THRESHOLD
    if "default" in document:
        default = _threshold_value(document["default"], f'{where}: "default"')
    if "fallback" in document:
        fallback = _threshold_value(document["fallback"], f'{where}: "fallback"')
        if "default" in document and fallback != default:
            raise ConfigurationError(
                f'{where}: "default" ({default}) and "fallback" ({fallback}) disagree; keep one'
            )
        default = fallback

    n_labels = len(vocab)
    per_label = np.full(n_labels, default, dtype=np.float64)
    given = document.get("thresholds", {})
    calibrated = 0
    if isinstance(given, list):
        if len(given) not in (n_labels, n_outputs):
            sizes = (
                f"{n_labels}"
                if n_labels == n_outputs
                else f"{n_labels} (every label) or {n_outputs} (model outputs)"
            )
            raise ConfigurationError(
                f'{where}: "thresholds" has {len(given)} values; the model needs {sizes}'
            )
        for index, value in enumerate(given):
            per_label[index] = _threshold_value(value, f'{where}: "thresholds"[{index}]')
        calibrated = len(given)
    elif isinstance(given, dict):
        for key, value in given.items():
            entry = f'{where}: "thresholds"["{key}"]'
            if key.isdigit():
                index = int(key)
                if index >= n_labels:
                    raise ConfigurationError(
                        f"{entry}: no label {index}; the vocabulary has labels 0..{n_labels - 1}"
                    )
            elif key in vocab:
                index = vocab.by_wnid(key).index
            else:
                raise ConfigurationError(
                    f"{entry}: keys must be label indices (0..{n_labels - 1}) or WordNet ids of the vocabulary"
                )
            per_label[index] = _threshold_value(value, entry)
        calibrated = len(given)
    else:
        raise ConfigurationError(f'{where}: "thresholds" must be a list (one value per label) or an object')
    per_label.setflags(write=False)
    return Thresholds(default=default, per_label=per_label, n_calibrated=calibrated, source=where)


# --------------------------------------------------------------------------------------
# The tagger
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Tagger:
    """Turns logits of a model's `n_outputs` outputs into tags over `vocabulary`.

    Labels ``0..n_outputs-1`` of the vocabulary are the model's outputs, in output order; labels from
    `n_outputs` on (if any) are hierarchy concepts without an output of their own.
    """

    mode: Mode
    vocabulary: LabelVocabulary
    n_outputs: int
    thresholds: Thresholds
    _depth: np.ndarray = field(init=False, repr=False)
    _never: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n_labels = len(self.vocabulary)
        if self.mode not in ("max", "sum"):
            raise ValueError(f"mode must be 'max' or 'sum', got {self.mode!r}")
        if not 0 < self.n_outputs <= n_labels:
            raise ConfigurationError(
                f"{self.vocabulary.source}: has {n_labels} labels, fewer than the model's {self.n_outputs} outputs"
            )
        if self.thresholds.per_label.shape != (n_labels,):
            raise ValueError(
                f"thresholds cover {self.thresholds.per_label.shape[0]} labels, the vocabulary {n_labels}"
            )
        depth = np.array([self.vocabulary.depth(i) for i in range(n_labels)], dtype=np.int32)
        never = np.zeros(n_labels, dtype=bool)
        if self.mode == "sum":
            # The membership matrix and propagate_sum's index are cached by the vocabulary: building them
            # here means the first request does not pay for it.
            covered = self.vocabulary.leaf_membership(self.n_outputs).sum(axis=0)
            never = covered >= self.n_outputs
            propagate_sum(self.vocabulary, np.zeros((1, self.n_outputs), dtype=np.float32))
        object.__setattr__(self, "_depth", depth)
        object.__setattr__(self, "_never", never)

    @property
    def has_hierarchy(self) -> bool:
        return self.vocabulary.has_hierarchy

    def __len__(self) -> int:
        return len(self.vocabulary)

    def tag(self, logits: np.ndarray, options: TagOptions = TagOptions()) -> list[list[Tag]]:
        """One list of tags per row of `logits` (n_images, n_outputs), ordered as the module docstring says."""
        logits = np.asarray(logits, dtype=np.float32)
        if logits.ndim != 2 or logits.shape[1] != self.n_outputs:
            raise ValueError(f"logits must have shape (n, {self.n_outputs}), got {logits.shape}")
        if self.mode == "max":
            rows = self._tag_max(logits, options)
        else:
            rows = self._tag_sum(logits, options)
        if options.max_tags is not None:
            rows = [row[: options.max_tags] for row in rows]
        return rows

    def _threshold_for_outputs(self, options: TagOptions) -> np.ndarray | float:
        if options.threshold is not None:
            return options.threshold
        return self.thresholds.per_label[: self.n_outputs]

    def _make(self, index: int, score: float, from_hierarchy: bool) -> Tag:
        label = self.vocabulary[index]
        return Tag(index, label.name, label.wnid, score, from_hierarchy, int(self._depth[index]))

    def _tag_max(self, logits: np.ndarray, options: TagOptions) -> list[list[Tag]]:
        probs = sigmoid(logits)
        predicted = probs >= self._threshold_for_outputs(options)
        n_images, n_labels = probs.shape[0], len(self.vocabulary)
        if n_labels > self.n_outputs:  # concepts without an output are never predicted themselves
            padded = np.zeros((n_images, n_labels), dtype=probs.dtype)
            padded[:, : self.n_outputs] = probs
            padded_predicted = np.zeros((n_images, n_labels), dtype=bool)
            padded_predicted[:, : self.n_outputs] = predicted
            probs, predicted = padded, padded_predicted
        min_score = options.min_score
        rows = []
        for found in propagate_max(self.vocabulary, probs, predicted):
            tags = [
                self._make(t.index, t.score, t.from_hierarchy)
                for t in found
                if min_score is None or t.score >= min_score
            ]
            tags.sort(key=lambda t: (-t.score, -t.depth, t.index))
            rows.append(tags)
        return rows

    def _tag_sum(self, logits: np.ndarray, options: TagOptions) -> list[list[Tag]]:
        probs = softmax(logits)
        # Float rounding can push a sum of probabilities a hair over 1.
        scores = np.minimum(propagate_sum(self.vocabulary, probs), 1.0)
        thresholds: np.ndarray | float = (
            options.threshold if options.threshold is not None else self.thresholds.per_label
        )
        tagged = (scores >= thresholds) & ~self._never
        if options.min_score is not None:
            tagged &= scores >= options.min_score
        own_passed = probs >= self._threshold_for_outputs(options)
        rows = []
        for row, (row_tagged, row_scores) in enumerate(zip(tagged, scores, strict=True)):
            order = self._most_specific_first(np.flatnonzero(row_tagged).tolist(), row_scores)
            rows.append(
                [
                    self._make(i, float(row_scores[i]), not (i < self.n_outputs and bool(own_passed[row, i])))
                    for i in order
                ]
            )
        return rows

    def _most_specific_first(self, tagged: list[int], scores: np.ndarray) -> list[int]:
        """Children before parents; among the tags whose tagged descendants are all listed, highest score next.

        Kahn's topological sort over the tagged labels (each linked to its nearest tagged ancestor) with a
        max-heap on score: siblings come before their parent, and a branch is followed upwards while its
        next concept is the most confident one available.
        """
        members = set(tagged)
        parent_of: dict[int, int | None] = {}
        waiting = dict.fromkeys(tagged, 0)  # tagged children not yet listed
        for index in tagged:
            parent = next((a for a in self.vocabulary.ancestors(index) if a in members), None)
            parent_of[index] = parent
            if parent is not None:
                waiting[parent] += 1
        key = lambda i: (-float(scores[i]), -int(self._depth[i]), i)  # noqa: E731
        ready = [key(i) for i in tagged if waiting[i] == 0]
        heapq.heapify(ready)
        order: list[int] = []
        while ready:
            index = heapq.heappop(ready)[2]
            order.append(index)
            parent = parent_of[index]
            if parent is not None:
                waiting[parent] -= 1
                if waiting[parent] == 0:
                    heapq.heappush(ready, key(parent))
        return order


# --------------------------------------------------------------------------------------
# Building a model's tagger from its configuration
# --------------------------------------------------------------------------------------


def _tag_vocabulary(
    model: str,
    task: str,
    labels_source: str,
    labels: Sequence[str],
    hierarchy: str | None,
    label_vocabulary: LabelVocabulary | None,
) -> LabelVocabulary | None:
    from vision.labels.names import IMAGENET, imagenet_wordnet, read_vocabulary

    n_outputs = len(labels)
    if hierarchy == HIERARCHY_NONE:
        return (
            LabelVocabulary.from_names(labels, source=f"labels of {model}") if task == "multilabel" else None
        )
    if hierarchy == HIERARCHY_WORDNET or (hierarchy is None and labels_source == IMAGENET):
        if n_outputs != 1000:
            if hierarchy is None:
                return None
            raise ConfigurationError(
                f"model {model!r}: the bundled WordNet hierarchy is over the 1000 ImageNet-1k classes, "
                f"but the model has {n_outputs} outputs"
            )
        return imagenet_wordnet()
    if hierarchy is not None:
        return read_vocabulary(hierarchy, "hierarchy")
    vocab = label_vocabulary or read_vocabulary(labels_source, "label")
    if vocab.has_hierarchy or task == "multilabel":
        return vocab
    return None


def tagger_of(card: "ModelCard") -> Tagger | None:
    """The tagger built for `card`'s weights at load, or None when the model cannot tag."""
    return card.artifacts.get(TASK)


def load_tagger(
    *,
    model: str,
    task: str,
    labels_source: str,
    labels: Sequence[str],
    hierarchy: str | None = None,
    thresholds: Path | None = None,
    label_vocabulary: LabelVocabulary | None = None,
) -> Tagger | None:
    """The tagger of a served model, or None when the model cannot tag.

    `labels_source` is the model's label setting ("imagenet" or a file) and `labels` the resolved names of
    its outputs. `hierarchy`: "wordnet" (the bundled ImageNet-1k WordNet hierarchy), "none", or a vocabulary
    file (ML-Images hierarchy format) whose labels ``0..N-1`` are the model's N outputs; None picks the
    label file's own hierarchy, or WordNet for ImageNet labels. `label_vocabulary`: the label file already
    read by the caller (it is then not read again). Multi-label models can always tag (without
    a hierarchy, over their flat labels); classification models only with a hierarchy.
    """
    if task not in ("classification", "multilabel"):
        vocab = None
    else:
        vocab = _tag_vocabulary(model, task, labels_source, labels, hierarchy, label_vocabulary)
    if vocab is None:
        if thresholds is not None:
            raise ConfigurationError(
                f"model {model!r} has a thresholds file but cannot tag: a {task} model needs a label hierarchy "
                "(hierarchy=wordnet or hierarchy=FILE)"
            )
        return None
    n_outputs = len(labels)
    if len(vocab) < n_outputs:
        raise ConfigurationError(
            f"model {model!r}: hierarchy {vocab.source} has {len(vocab)} labels, fewer than the model's "
            f"{n_outputs} outputs (its labels 0..{n_outputs - 1} must be the outputs)"
        )
    mismatched = [i for i in range(n_outputs) if vocab[i].name != labels[i]]
    if mismatched:
        i = mismatched[0]
        log.warning(
            "model %s: %d output names differ between its labels and hierarchy %s (first: output %d is %r vs %r); "
            "check that the hierarchy lists the outputs in model order",
            model,
            len(mismatched),
            vocab.source,
            i,
            labels[i],
            vocab[i].name,
        )
    table = (
        load_thresholds(thresholds, vocab, n_outputs)
        if thresholds is not None
        else Thresholds.constant(len(vocab))
    )
    tagger = Tagger("max" if task == "multilabel" else "sum", vocab, n_outputs, table)
    if table.n_calibrated:
        log.info(
            "model %s: %d per-label thresholds from %s (default %.3g)",
            model,
            table.n_calibrated,
            table.source,
            table.default,
        )
    if not math.isclose(table.default, DEFAULT_THRESHOLD):
        log.info("model %s: default tag threshold %.3g", model, table.default)
    return tagger


class Tagging:
    """The data plane's view of tagging: centre crop, logits, the model's tagger."""

    name = TASK

    def validate(self, card: "ModelCard", options: TagOptions) -> TagOptions:
        return options  # TagOptions validates itself; every model the repository returns for "tagging" has a tagger

    def views(self, card: "ModelCard", options: TagOptions) -> ViewSpec:
        return CENTER

    def outputs(self, card: "ModelCard", options: TagOptions) -> tuple[str, ...]:
        return (LOGITS,)

    def postprocess(self, card: "ModelCard", outputs: "ViewOutputs", options: TagOptions) -> list[list[Tag]]:
        tagger = tagger_of(card)
        assert tagger is not None  # the repository hands out only tagging-capable models for this task
        return tagger.tag(outputs.stacked(LOGITS), options)


TAGGING = Tagging()
