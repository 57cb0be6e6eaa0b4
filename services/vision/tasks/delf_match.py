"""DELF matching: nearest neighbours in descriptor space, then RANSAC with an affine model.

As the reference (tensorflow/models research/delf `delf/python/examples/match_images.py`, checked 2026-11
with the search tool): a KD-tree (`scipy.spatial.cKDTree`) over image A's descriptors is queried with each
of image B's descriptors, with a distance bound of 0.8 (`_DISTANCE_THRESHOLD`); the putative pairs are
verified by `skimage.measure.ransac` with `skimage.transform.AffineTransform`, `min_samples=3`,
`residual_threshold=20` (pixels), `max_trials=1000`. RANSAC's generator is seeded, so the same features
always give the same answer. The inlier count is the match score (and what re-ranking sorts by). As the
reference's `image_reranking.MatchFeatures`, 3 or fewer putative pairs score 0 inliers: an affine map has 6
unknowns, so 3 pairs always fit exactly and verify nothing.

Re-ranking runs the way `image_reranking.MatchFeatures` does, not match_images.py's: the tree is built over
the index (candidate) image's descriptors and queried with the query's, and RANSAC fits index image → query,
so the residual threshold is in the query image's pixels, the same for every candidate of one query.

Pure numpy/scipy/scikit-image; no gRPC.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vision.core.errors import InvalidArgument, Unimplemented
from vision.tasks.delf import DelfFeatures

DISTANCE_THRESHOLD = 0.8
RANSAC_MIN_SAMPLES = 3
RESIDUAL_THRESHOLD = 20.0
MAX_TRIALS = 1000
MAX_TRIALS_LIMIT = 100_000
RANSAC_SEED = 0


@dataclass(frozen=True)
class MatchOptions:
    max_descriptor_distance: float = DISTANCE_THRESHOLD
    residual_threshold: float = RESIDUAL_THRESHOLD
    max_trials: int = MAX_TRIALS

    def __post_init__(self) -> None:
        # L2-normalised descriptors are at most 2 apart.
        if not 0 < self.max_descriptor_distance <= 2:  # also false for NaN
            raise InvalidArgument(f"max_descriptor_distance must be in (0, 2], got {self.max_descriptor_distance}")
        if not 0 < self.residual_threshold < math.inf:
            raise InvalidArgument(f"residual_threshold must be a positive number of pixels, got {self.residual_threshold}")
        if not 1 <= self.max_trials <= MAX_TRIALS_LIMIT:
            raise InvalidArgument(f"max_trials must be between 1 and {MAX_TRIALS_LIMIT}, got {self.max_trials}")


@dataclass(frozen=True, eq=False)
class MatchResult:
    # Pairs (index in A, index in B) that passed the descriptor-distance bound.
    putative: np.ndarray
    # The putative pairs RANSAC kept, (M, 2).
    inlier_pairs: np.ndarray
    # 3x3 affine matrix mapping A's (x, y) to B's, or None when verification found no model.
    transform: np.ndarray | None

    @property
    def inliers(self) -> int:
        return len(self.inlier_pairs)


# Above this width a KD-tree degenerates into a slow exhaustive search (1000 x 1000 at 1024-d: 300 ms with
# cKDTree, 30 ms as one matrix product here); below it (the reference's 40-d PCA descriptors) it is fastest.
KD_TREE_MAX_DIM = 64


def _matching_libraries():  # noqa: ANN202 - (cKDTree, ransac, AffineTransform)
    """scipy and scikit-image, imported on first use: the slim image leaves them out, and Match says so."""
    try:
        from scipy.spatial import cKDTree
        from skimage.measure import ransac
        from skimage.transform import AffineTransform
    except ImportError as exc:
        raise Unimplemented(
            f"DELF matching needs scipy and scikit-image, which this server lacks ({exc.name} is missing: the slim "
            "image); Extract works here, Match on a server from the full image"
        ) from None
    return cKDTree, ransac, AffineTransform


def putative_matches(a: np.ndarray, b: np.ndarray, max_distance: float = DISTANCE_THRESHOLD) -> np.ndarray:
    """(K, 2) pairs (index in a, index in b): each row of b with its nearest row of a (Euclidean) within
    `max_distance`. A KD-tree as the reference for narrow descriptors, an exact matrix-product search for
    wide ones (the same nearest neighbours)."""
    if not len(a) or not len(b):
        return np.zeros((0, 2), dtype=np.int64)
    if a.shape[1] <= KD_TREE_MAX_DIM:
        cKDTree, _, _ = _matching_libraries()
        distances, indices = cKDTree(a).query(b, k=1, distance_upper_bound=max_distance)
        found = np.flatnonzero(np.isfinite(distances))
        return np.stack([indices[found], found], axis=1).astype(np.int64)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    squared = (b64 * b64).sum(axis=1)[:, None] - 2.0 * (b64 @ a64.T) + (a64 * a64).sum(axis=1)[None, :]
    nearest = squared.argmin(axis=1)
    best = np.maximum(squared[np.arange(len(b)), nearest], 0.0)
    found = np.flatnonzero(best <= max_distance * max_distance)
    return np.stack([nearest[found], found], axis=1).astype(np.int64)


def verify(src: np.ndarray, dst: np.ndarray, options: MatchOptions = MatchOptions()) -> tuple[np.ndarray | None, np.ndarray]:
    """RANSAC affine fit of src → dst (N, 2 each): (3x3 matrix or None, boolean inlier mask)."""
    _, ransac, AffineTransform = _matching_libraries()
    none = np.zeros(len(src), dtype=bool)
    if len(src) <= RANSAC_MIN_SAMPLES:
        return None, none
    with warnings.catch_warnings():
        # Degenerate samples (collinear points) make single trials fail with a warning; RANSAC moves on.
        warnings.simplefilter("ignore")
        model, inliers = ransac(
            (src.astype(np.float64), dst.astype(np.float64)),
            AffineTransform,
            min_samples=RANSAC_MIN_SAMPLES,
            residual_threshold=options.residual_threshold,
            max_trials=options.max_trials,
            rng=RANSAC_SEED,
        )
    # scikit-image 0.26 answers a degenerate consensus (all inliers on two locations, say) with a falsy
    # FailedEstimation instead of None.
    if model is None or not model or inliers is None or not np.isfinite(model.params).all():
        return None, none
    return np.asarray(model.params, dtype=np.float64), inliers.astype(bool)


def check_comparable(a: DelfFeatures, b: DelfFeatures) -> None:
    if a.descriptors.shape[1] != b.descriptors.shape[1]:
        raise InvalidArgument(
            f"a has {a.descriptors.shape[1]}-d descriptors and b {b.descriptors.shape[1]}-d ones; features of "
            "different models (or PCA) cannot be matched"
        )


def match(a: DelfFeatures, b: DelfFeatures, options: MatchOptions = MatchOptions()) -> MatchResult:
    """Geometrically verified correspondences from a to b."""
    check_comparable(a, b)
    pairs = putative_matches(a.descriptors, b.descriptors, options.max_descriptor_distance)
    transform, inliers = verify(a.locations[pairs[:, 0]], b.locations[pairs[:, 1]], options)
    return MatchResult(pairs, pairs[inliers], transform)


def rerank(
    query: DelfFeatures, candidates: Sequence[DelfFeatures], options: MatchOptions = MatchOptions()
) -> list[tuple[int, int]]:
    """(candidate index, inliers) by inliers, most first; ties keep the given (e.g. global-descriptor)
    order, so re-ranking a shortlist only moves candidates that DELF verifies better. Each candidate is
    matched onto the query (`match(candidate, query)`: residuals in the query's pixels), as the reference."""
    counts = [match(c, query, options).inliers for c in candidates]
    order = sorted(range(len(candidates)), key=lambda i: -counts[i])
    return [(i, counts[i]) for i in order]


# Re-ranking a retrieval shortlist matches as the reference's detect_to_retrieve/image_reranking.py
# (`RerankByGeometricVerification`) does: a looser descriptor bound (0.9) and a tighter RANSAC threshold (10 px)
# than match_images.py's 0.8 and 20 px, the Match RPC's defaults.
RERANK_OPTIONS = MatchOptions(max_descriptor_distance=0.9, residual_threshold=10.0)


def rerank_rankings(
    rankings: Sequence[Sequence[str]],
    queries: Sequence[DelfFeatures],
    database: Mapping[str, DelfFeatures],
    top: int,
    options: MatchOptions = RERANK_OPTIONS,
) -> list[list[str]]:
    """Each query's ranked database names with its first `top` re-ordered by DELF inliers (`rerank`), the rest
    left where the global ranking put them. `database` needs the features of every name in any query's top."""
    out: list[list[str]] = []
    for ranked, query in zip(rankings, queries, strict=True):
        head = list(ranked[:top])
        order = rerank(query, [database[name] for name in head], options)
        out.append([head[i] for i, _ in order] + list(ranked[top:]))
    return out
