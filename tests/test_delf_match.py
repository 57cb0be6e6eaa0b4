"""DELF matching as pure numpy/scipy/scikit-image: nearest neighbours with a distance bound, RANSAC with an
affine model, re-ranking. Real photos are matched through the server in test_delf_e2e.py."""

from __future__ import annotations

import numpy as np
import pytest

from vision.core.errors import InvalidArgument
from vision.tasks.delf import DelfFeatures
from vision.tasks.delf_match import (
    MatchOptions,
    match,
    putative_matches,
    rerank,
    verify,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _features(locations: np.ndarray, descriptors: np.ndarray) -> DelfFeatures:
    n = len(locations)
    return DelfFeatures(640, 480, locations.astype(np.float32), np.ones(n, np.float32), np.ones(n, np.float32), descriptors)


def _pair(n: int = 300, dim: int = 40, outliers: int = 100, seed: int = 0):
    """b = a under a known affine map (rotation 0.3 rad, scale 1.2, shift) with slightly noisy descriptors;
    the last `outliers` of b are unrelated points with unrelated descriptors."""
    rng = np.random.default_rng(seed)
    locations = rng.uniform(0, 600, (n, 2))
    angle, scale, shift = 0.3, 1.2, np.array([15.0, -40.0])
    matrix = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = locations @ matrix.T + shift
    descriptors = _unit(rng.standard_normal((n, dim)))
    noisy = _unit(descriptors + 0.05 * rng.standard_normal((n, dim)))
    moved[-outliers:] = rng.uniform(0, 600, (outliers, 2))
    noisy[-outliers:] = _unit(rng.standard_normal((outliers, dim)))
    expected = np.vstack([np.hstack([matrix, shift[:, None]]), [0, 0, 1]])
    return _features(locations, descriptors), _features(moved, noisy), expected


# 16 and 40: the KD-tree (as the reference); 112 and 1024: the exact matrix-product search.
@pytest.mark.parametrize("dim", [16, 40, 112, 1024])
def test_putative_matches_are_nearest_neighbours_within_the_bound(dim):
    rng = np.random.default_rng(dim)
    a = _unit(rng.standard_normal((400, dim)))
    b = _unit(np.vstack([a[:200] + 0.3 * rng.standard_normal((200, dim)) / np.sqrt(dim), rng.standard_normal((150, dim))]))
    pairs = putative_matches(a, b, 0.8)
    # Exhaustive search in float64: every b row whose nearest a row is within 0.8.
    from scipy.spatial.distance import cdist

    distances = cdist(b.astype(np.float64), a.astype(np.float64))
    nearest = distances.argmin(axis=1)
    expected = [(int(nearest[j]), j) for j in range(len(b)) if distances[j, nearest[j]] <= 0.8]
    assert sorted(map(tuple, pairs.tolist()), key=lambda p: p[1]) == expected
    assert {(j, j) for j in range(200)} <= set(expected)  # the true pairs are found
    assert putative_matches(a[:0], b, 0.8).shape == (0, 2)


def test_ransac_recovers_the_affine_transform_and_its_inliers():
    a, b, expected = _pair()
    result = match(a, b)
    assert result.inliers >= 195 and len(result.putative) >= 200
    assert set(result.inlier_pairs[:, 1].tolist()) <= set(range(200))  # no outlier is an inlier
    assert np.all(result.inlier_pairs[:, 0] == result.inlier_pairs[:, 1])
    np.testing.assert_allclose(result.transform, expected, atol=1e-3)
    again = match(a, b)  # RANSAC is seeded: same features, same answer
    np.testing.assert_array_equal(again.inlier_pairs, result.inlier_pairs)


def test_unrelated_features_give_few_inliers_and_too_few_none():
    rng = np.random.default_rng(5)
    a = _features(rng.uniform(0, 600, (300, 2)), _unit(rng.standard_normal((300, 40))))
    b = _features(rng.uniform(0, 600, (300, 2)), _unit(rng.standard_normal((300, 40))))
    assert match(a, b).inliers <= 5
    two = _features(np.array([[0.0, 0.0], [5.0, 5.0]]), a.descriptors[:2])
    result = match(two, two)
    assert result.inliers == 0 and result.transform is None and len(result.putative) == 2
    # Three pairs always fit an affine map exactly; the reference (image_reranking.MatchFeatures) scores
    # 3 or fewer putative matches 0, and so does this.
    three = _features(np.array([[0.0, 0.0], [50.0, 5.0], [9.0, 70.0]]), a.descriptors[:3])
    assert match(three, three).inliers == 0 and len(match(three, three).putative) == 3
    four = _features(np.array([[0.0, 0.0], [50.0, 5.0], [9.0, 70.0], [40.0, 40.0]]), a.descriptors[:4])
    assert match(four, four).inliers == 4
    transform, inliers = verify(np.zeros((0, 2)), np.zeros((0, 2)))
    assert transform is None and inliers.shape == (0,)


def test_a_degenerate_consensus_is_no_transform_not_a_crash():
    # Keypoints on two locations only (e.g. corner cells of every level matching each other): the refit
    # on the inliers fails, which scikit-image reports with a falsy FailedEstimation.
    src = np.array([[62, 100], [62, 100], [62, 100], [50, 43], [50, 43], [62, 100], [62, 100], [50, 43], [50, 43],
                    [50, 43], [62, 100], [50, 43]], dtype=float)
    dst = np.array([[62, 99], [61, 101], [63, 101], [49, 45], [50, 45], [62, 99], [62, 101], [50, 42], [49, 42],
                    [51, 44], [62, 99], [51, 42]], dtype=float)
    transform, inliers = verify(src, dst, MatchOptions(max_trials=20))
    assert transform is None and not inliers.any()


def test_features_of_different_widths_do_not_match():
    a, b, _ = _pair(dim=40)
    wide = _features(b.locations, _unit(np.ones((len(b), 41))))
    with pytest.raises(InvalidArgument, match="40-d descriptors and b 41-d"):
        match(a, wide)


def test_residual_threshold_and_trials_matter():
    a, b, _ = _pair()
    rng = np.random.default_rng(9)
    jittered = _features(b.locations + rng.normal(0, 6, b.locations.shape), b.descriptors)
    loose = match(a, jittered, MatchOptions(residual_threshold=20.0)).inliers
    tight = match(a, jittered, MatchOptions(residual_threshold=2.0)).inliers
    assert loose > 150 and tight < loose / 2
    assert match(a, b, MatchOptions(max_trials=1)).inliers <= match(a, b).inliers


@pytest.mark.parametrize("kwargs, message", [
    ({"max_descriptor_distance": 0.0}, "max_descriptor_distance"),
    ({"max_descriptor_distance": float("nan")}, "max_descriptor_distance"),
    ({"residual_threshold": -1.0}, "residual_threshold"),
    ({"residual_threshold": float("inf")}, "residual_threshold"),
    ({"max_trials": 0}, "max_trials"),
])
def test_bad_match_options_name_the_parameter(kwargs, message):
    with pytest.raises(InvalidArgument, match=message):
        MatchOptions(**kwargs)


def test_rerank_fits_the_candidate_onto_the_query_so_residuals_are_in_query_pixels():
    # A candidate at a quarter of the query's scale: query = 4 x candidate, half the keypoints then moved 24 px
    # (random directions) in the query. The reference fits index image -> query: residual 24 px > 10, outliers.
    # The reverse fit would measure 6 px in the candidate and call all of them inliers.
    rng = np.random.default_rng(3)
    candidate_xy = rng.uniform(0, 300, (40, 2))
    query_xy = 4.0 * candidate_xy
    angles = rng.uniform(0, 2 * np.pi, 20)
    query_xy[::2] += 24.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    descriptors = _unit(rng.standard_normal((40, 40)))
    query, candidate = _features(query_xy, descriptors), _features(candidate_xy, descriptors)
    ((_, inliers),) = rerank(query, [candidate], MatchOptions(max_descriptor_distance=0.9, residual_threshold=10.0))
    assert inliers == 20
    assert match(query, candidate, MatchOptions(residual_threshold=10.0)).inliers > 30  # the other direction


def test_rerank_moves_verified_candidates_up_and_keeps_ties_in_order():
    query, same, _ = _pair(seed=1)
    rng = np.random.default_rng(2)
    unrelated = [_features(rng.uniform(0, 600, (300, 2)), _unit(rng.standard_normal((300, 40)))) for _ in range(3)]
    ranked = rerank(query, [unrelated[0], unrelated[1], same, unrelated[2]])
    assert ranked[0][0] == 2 and ranked[0][1] >= 190
    assert ranked == sorted(ranked, key=lambda entry: (-entry[1], entry[0]))  # ties keep the given order
