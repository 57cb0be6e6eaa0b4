"""Retrieval quality as the Oxford5k/Paris6k and Revisited Oxford/Paris protocols define it.

- Ranking: cosine similarity of unit descriptors, the whole database per query (numpy: at 100k x 1280
  with 70 queries a full ranking took 0.81 s against faiss IndexFlatIP's 2.14 s here, because mAP needs
  every rank and faiss's k = N search does not pay off; `loadtest.ranking` measures both).
- AP: the Oxford `compute_ap` definition. Junk images are removed from the ranking, then the precision-
  recall curve is integrated with the trapezoid rule, starting from precision 1 at recall 0.
- Revisited protocol (Radenović et al., CVPR 2018): each query has easy, hard and junk images. Easy:
  positives = easy, junk = junk + hard. Medium: positives = easy + hard, junk = junk. Hard: positives =
  hard, junk = junk + easy. Queries without positives in a setting are left out of its mean.
- mP@k: the Revisited protocol's (revisitop `compute_map`): junk removed, k is lowered per query to the rank of
  its last positive, `kq = min(rank of the last positive, k)`, and the precision is taken among the first kq,
  so a query with 2 positives both at the top scores 100 at k = 5. Comparable with published numbers.
- P@k: plain precision among the first k (junk removed, always divided by k), averaged over queries.

Ground truth comes as an Oxford folder (`<query>_query.txt` with `oxc1_<image> x1 y1 x2 y2`,
`<query>_good.txt`, `_ok.txt`, `_junk.txt`) or a Revisited file (the official `gnd_*.pkl`, or the same
structure as JSON: `imlist`, `qimlist`, `gnd: [{bbx, easy, hard, junk}]`).
"""

from __future__ import annotations

import itertools
import json
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vision.core.errors import ConfigurationError

TOP_K = (1, 5, 10)


@dataclass(frozen=True)
class Query:
    name: str  # image name (file stem) of the query
    bbox: tuple[float, float, float, float] | None  # x1, y1, x2, y2 in the query image, if given
    # Per setting ("oxford", or "easy"/"medium"/"hard"): (positive names, junk names).
    settings: dict[str, tuple[frozenset[str], frozenset[str]]] = field(default_factory=dict)


@dataclass(frozen=True)
class GroundTruth:
    database: tuple[str, ...]  # image names, empty = every image of the database folder
    queries: tuple[Query, ...]
    settings: tuple[str, ...]


def average_precision(ranked: Sequence[str], positives: frozenset[str], junk: frozenset[str]) -> float:
    """Oxford AP of one ranked list of database names."""
    if not positives:
        return float("nan")
    ap, hits, kept = 0.0, 0, 0
    previous_recall, previous_precision = 0.0, 1.0
    for name in ranked:
        if name in junk:
            continue
        kept += 1
        if name in positives:
            hits += 1
        recall, precision = hits / len(positives), hits / kept
        ap += (recall - previous_recall) * (previous_precision + precision) / 2.0
        previous_recall, previous_precision = recall, precision
        if hits == len(positives):
            break
    return ap


def precision_at(ranked: Sequence[str], positives: frozenset[str], junk: frozenset[str], k: int) -> float:
    """Plain precision among the first k non-junk names (P@k)."""
    kept = itertools.islice((name for name in ranked if name not in junk), k)
    return sum(name in positives for name in kept) / k


def protocol_precision_at(ranked: Sequence[str], positives: frozenset[str], junk: frozenset[str], k: int) -> float:
    """The Revisited protocol's precision at k (mP@k once averaged): among the first kq = min(rank of the last
    positive, k) non-junk names. A ranking that holds no positive scores 0."""
    ranks = [rank for rank, name in enumerate((n for n in ranked if n not in junk), start=1) if name in positives]
    if not ranks:
        return 0.0
    kq = min(ranks[-1], k)
    return sum(rank <= kq for rank in ranks) / kq


def rank(database: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Database indices per query, most similar first (ties: lower index first)."""
    return np.argsort(-(queries @ database.T), axis=1, kind="stable")


@dataclass(frozen=True)
class RetrievalReport:
    # setting -> {"mAP": ..., "mP@1": ..., ..., "P@1": ...}, values in percent as the papers report them.
    scores: dict[str, dict[str, float]]
    per_query_ap: dict[str, list[float]]


def evaluate(gt: GroundTruth, database_names: Sequence[str], database: np.ndarray, queries: np.ndarray) -> RetrievalReport:
    """mAP and mP@k of every setting of `gt`, ranking `database` (n, d) for each row of `queries`."""
    names = np.asarray(database_names, dtype=object)
    return evaluate_ranked(gt, [names[row].tolist() for row in rank(database, queries)])


def evaluate_ranked(gt: GroundTruth, ranked_names: Sequence[Sequence[str]]) -> RetrievalReport:
    """mAP and mP@k of every setting of `gt` for one ranked list of database names per query (any ranker:
    cosine similarity, or a re-ranking by local-feature inliers)."""
    aps: dict[str, list[float]] = {setting: [] for setting in gt.settings}
    precisions = {setting: {k: [] for k in TOP_K} for setting in gt.settings}
    plain = {setting: {k: [] for k in TOP_K} for setting in gt.settings}
    for query, ranked in zip(gt.queries, ranked_names, strict=True):
        for setting in gt.settings:
            positives, junk = query.settings[setting]
            if not positives:
                continue
            aps[setting].append(average_precision(ranked, positives, junk))
            for k in TOP_K:
                precisions[setting][k].append(protocol_precision_at(ranked, positives, junk, k))
                plain[setting][k].append(precision_at(ranked, positives, junk, k))
    scores: dict[str, dict[str, float]] = {}
    for setting in gt.settings:
        values = aps[setting]
        scores[setting] = {"mAP": 100 * float(np.mean(values)) if values else float("nan")}
        scores[setting].update(
            {f"mP@{k}": 100 * float(np.mean(v)) if v else float("nan") for k, v in precisions[setting].items()}
        )
        scores[setting].update({f"P@{k}": 100 * float(np.mean(v)) if v else float("nan") for k, v in plain[setting].items()})
    return RetrievalReport(scores, aps)


# --------------------------------------------------------------------------------------
# Ground-truth readers
# --------------------------------------------------------------------------------------


def load_ground_truth(path: Path) -> GroundTruth:
    if path.is_dir():
        return _load_oxford(path)
    if path.suffix in (".pkl", ".json"):
        return _load_revisited(path)
    raise ConfigurationError(f"{path}: expected an Oxford ground-truth folder, or a Revisited gnd .pkl/.json file")


def _names(path: Path) -> frozenset[str]:
    return frozenset(line.strip() for line in path.read_text().splitlines() if line.strip()) if path.is_file() else frozenset()


def _load_oxford(folder: Path) -> GroundTruth:
    queries = []
    for query_file in sorted(folder.glob("*_query.txt")):
        stem = query_file.name[: -len("_query.txt")]
        fields = query_file.read_text().split()
        if len(fields) not in (1, 5):
            raise ConfigurationError(f"{query_file}: expected 'image [x1 y1 x2 y2]', got {' '.join(fields)!r}")
        # Oxford's files prefix the image name with the collection ("oxc1_"); image files have no prefix.
        name = fields[0].removeprefix("oxc1_")
        bbox = tuple(float(v) for v in fields[1:]) if len(fields) == 5 else None
        positives = _names(folder / f"{stem}_good.txt") | _names(folder / f"{stem}_ok.txt")
        queries.append(Query(name, bbox, {"oxford": (positives, _names(folder / f"{stem}_junk.txt"))}))  # type: ignore[arg-type]
    if not queries:
        raise ConfigurationError(f"{folder}: no *_query.txt files (Oxford ground-truth format)")
    return GroundTruth((), tuple(queries), ("oxford",))


def _load_revisited(path: Path) -> GroundTruth:
    try:
        if path.suffix == ".pkl":
            # The official Revisited files are pickles; load only files you trust (pickle can run code).
            with path.open("rb") as fh:
                data = pickle.load(fh)  # noqa: S301
        else:
            data = json.loads(path.read_text())
        imlist, qimlist, gnd = list(data["imlist"]), list(data["qimlist"]), list(data["gnd"])
    except (OSError, KeyError, ValueError, pickle.UnpicklingError) as exc:
        raise ConfigurationError(f"{path}: not a Revisited ground-truth file (imlist, qimlist, gnd): {exc}") from None
    queries = []
    for name, entry in zip(qimlist, gnd, strict=True):
        def pick(key: str) -> frozenset[str]:
            return frozenset(imlist[int(i)] for i in entry.get(key, []))

        easy, hard, junk = pick("easy"), pick("hard"), pick("junk")
        bbox = entry.get("bbx")
        queries.append(
            Query(
                name,
                tuple(float(v) for v in bbox) if bbox is not None else None,  # type: ignore[arg-type]
                {"easy": (easy, junk | hard), "medium": (easy | hard, junk), "hard": (hard, junk | easy)},
            )
        )
    return GroundTruth(tuple(imlist), tuple(queries), ("easy", "medium", "hard"))
