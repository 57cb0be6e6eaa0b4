"""Multi-label metrics, pinned by small cases computed by hand (arithmetic in the comments)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from vision.evaluation.tagging import (
    average_precision,
    best_f1_thresholds,
    binarize,
    evaluate,
    per_label_prf,
    samples_f1,
    top_k_predictions,
)

# Four samples, three labels.
Y_TRUE = np.array(
    [
        [1, 0, 1],
        [0, 1, 1],
        [1, 0, 0],
        [0, 1, 1],
    ]
)
SCORES = np.array(
    [
        [0.9, 0.2, 0.6],
        [0.4, 0.7, 0.3],
        [0.6, 0.1, 0.8],
        [0.2, 0.15, 0.5],
    ]
)
# At threshold 0.5 the predictions are
#   [1,0,1]  [0,1,0]  [1,0,1]  [0,0,1]
# label 0: true {0,2}, predicted {0,2}   -> TP 2, P = 2/2 = 1,   R = 2/2 = 1,   F1 = 1
# label 1: true {1,3}, predicted {1}     -> TP 1, P = 1/1 = 1,   R = 1/2,       F1 = 2·1·½/(1+½) = 2/3
# label 2: true {0,1,3}, predicted {0,2,3} -> TP 2, P = 2/3,     R = 2/3,       F1 = 2/3


def test_per_label_and_class_and_overall_metrics() -> None:
    report = evaluate(Y_TRUE, SCORES, thresholds=0.5)
    np.testing.assert_allclose(report.precision, [1, 1, 2 / 3])
    np.testing.assert_allclose(report.recall, [1, 1 / 2, 2 / 3])
    np.testing.assert_allclose(report.f1, [1, 2 / 3, 2 / 3])
    assert report.support.tolist() == [2, 2, 3]
    assert report.n_predicted.tolist() == [2, 1, 3]
    assert report.true_positives.tolist() == [2, 1, 2]
    assert report.n_labels_evaluated == 3
    # CP = (1 + 1 + 2/3)/3 = 8/9;  CR = (1 + 1/2 + 2/3)/3 = (13/6)/3 = 13/18
    # CF1 = 2·(8/9)·(13/18) / (8/9 + 13/18) = (208/162) / (29/18) = 208/261
    assert report.CP == pytest.approx(8 / 9)
    assert report.CR == pytest.approx(13 / 18)
    assert report.CF1 == pytest.approx(208 / 261)
    # OP = ΣTP/Σpredicted = 5/6;  OR = ΣTP/Σpositives = 5/7;  OF1 = 2·5/(6+7) = 10/13
    assert report.OP == pytest.approx(5 / 6)
    assert report.OR == pytest.approx(5 / 7)
    assert report.OF1 == pytest.approx(10 / 13)
    # samples-F1 = mean of 2|T∩P|/(|T|+|P|):
    #   s0 {0,2} vs {0,2}: 1;  s1 {1,2} vs {1}: 2/3;  s2 {0} vs {0,2}: 2/3;  s3 {1,2} vs {2}: 2/3
    #   -> (1 + 3·2/3)/4 = 3/4
    assert report.samples_f1 == pytest.approx(3 / 4)


def test_average_precision_and_map() -> None:
    # label 0: ranking s0 .9(+) s2 .6(+) s1 .4 s3 .2          -> AP = (1/1 + 2/2)/2 = 1
    # label 1: ranking s1 .7(+) s0 .2 s3 .15(+) s2 .1          -> AP = (1/1 + 2/3)/2 = 5/6
    # label 2: ranking s2 .8 s0 .6(+) s3 .5(+) s1 .3(+)        -> AP = (1/2 + 2/3 + 3/4)/3 = 23/36
    np.testing.assert_allclose(average_precision(Y_TRUE, SCORES), [1, 5 / 6, 23 / 36])
    # mAP = (36/36 + 30/36 + 23/36)/3 = 89/108
    assert evaluate(Y_TRUE, SCORES).mAP == pytest.approx(89 / 108)


def test_average_precision_treats_tied_scores_as_one_threshold() -> None:
    # ranking .9(+), then a tie {.5(+), .5(-)}, then .1(-)
    # thresholds: .9 -> P 1, R 1/2;  .5 -> P 2/3, R 1;  AP = ½·1 + ½·2/3 = 5/6
    # (ordering the tie + first would give 1, - first 5/6: the answer must not depend on sample order)
    y = np.array([[1], [0], [1], [0]])
    s = np.array([[0.5], [0.5], [0.9], [0.1]])
    assert average_precision(y, s)[0] == pytest.approx(5 / 6)
    for order in ([1, 0, 2, 3], [2, 3, 0, 1], [3, 2, 1, 0]):
        assert average_precision(y[order], s[order])[0] == pytest.approx(5 / 6)


def test_average_precision_matches_the_textbook_definition_without_ties() -> None:
    # Without ties, AP = mean over positives of (positives ranked at or above it) / (its rank).
    rng = np.random.default_rng(3)
    y = rng.random((25, 4)) < 0.4
    s = rng.permutation(100)[:100].reshape(25, 4) / 100.0  # distinct scores
    for label in range(4):
        ranked = y[np.argsort(-s[:, label]), label]
        ranks = np.flatnonzero(ranked) + 1
        expected = np.mean(np.arange(1, len(ranks) + 1) / ranks)
        assert average_precision(y, s)[label] == pytest.approx(expected)


def test_label_without_positives_is_left_out_of_class_means_but_not_overall() -> None:
    y = np.array([[1, 0], [1, 0]])
    y_pred = np.array([[1, 1], [0, 0]])
    scores = np.array([[0.9, 0.8], [0.3, 0.2]])
    report = evaluate(y, scores, y_pred=y_pred)
    # label 0: TP 1, predicted 1, positives 2 -> P 1, R 1/2
    # label 1: no positives, one (false) prediction -> P 0, R 0 (convention), F1 0, AP undefined
    np.testing.assert_allclose(report.precision, [1, 0])
    np.testing.assert_allclose(report.recall, [0.5, 0])
    assert report.n_labels_evaluated == 1
    # CP, CR over label 0 only: CP = 1, CR = 1/2, CF1 = 2·1·½/(3/2) = 2/3
    assert (report.CP, report.CR) == (1.0, 0.5)
    assert report.CF1 == pytest.approx(2 / 3)
    # OP pools label 1's false positive: 1/2;  OR = 1/2;  OF1 = 1/2
    assert (report.OP, report.OR, report.OF1) == (0.5, 0.5, 0.5)
    # samples: s0 {0} vs {0,1}: 2/3;  s1 {0} vs {}: 0  -> 1/3
    assert report.samples_f1 == pytest.approx(1 / 3)
    # AP: label 0 ranks .9(+) .3(+) -> 1; label 1 NaN and excluded: mAP = 1
    assert report.average_precision[0] == 1.0 and np.isnan(report.average_precision[1])
    assert report.mAP == 1.0
    as_dict = report.as_dict()
    assert as_dict["per_label"][1]["average_precision"] is None
    json.dumps(as_dict, allow_nan=False)  # JSON-clean


def test_label_never_predicted_and_empty_samples() -> None:
    y = np.array([[1, 0], [0, 0], [1, 1]])
    y_pred = np.array([[0, 0], [0, 0], [0, 1]])
    precision, recall, f1 = per_label_prf(y, y_pred)
    # label 0: positives 2, never predicted -> P 0 (no predictions), R 0, F1 0
    # label 1: TP 1 of 1 predicted, 1 positive -> 1, 1, 1
    np.testing.assert_allclose(precision, [0, 1])
    np.testing.assert_allclose(recall, [0, 1])
    np.testing.assert_allclose(f1, [0, 1])
    # samples: s0 {0} vs {}: 0;  s1 {} vs {}: 1 (nothing to find, nothing claimed);  s2 {0,1} vs {1}: 2/3
    #   -> (0 + 1 + 2/3)/3 = 5/9
    assert samples_f1(y, y_pred) == pytest.approx(5 / 9)


def test_perfect_predictions() -> None:
    report = evaluate(Y_TRUE, Y_TRUE.astype(float) * 0.5 + 0.25)  # positives 0.75, negatives 0.25
    for value in (
        report.CP,
        report.CR,
        report.CF1,
        report.OP,
        report.OR,
        report.OF1,
        report.samples_f1,
        report.mAP,
    ):
        assert value == 1.0
    np.testing.assert_array_equal(report.f1, 1.0)


def test_no_label_has_positives() -> None:
    y = np.zeros((2, 2), dtype=int)
    report = evaluate(y, np.zeros((2, 2)))
    assert report.n_labels_evaluated == 0
    assert (report.CP, report.CR, report.CF1, report.mAP) == (0.0, 0.0, 0.0, 0.0)
    assert (report.OP, report.OR, report.OF1) == (0.0, 0.0, 0.0)  # every score 0 < 0.5: nothing predicted
    assert report.samples_f1 == 1.0


def test_predictions_only_and_top_k() -> None:
    report = evaluate(Y_TRUE, y_pred=binarize(SCORES, 0.5), label_names=["a", "b", "c"])
    assert report.mAP is None and report.average_precision is None
    assert report.CF1 == pytest.approx(208 / 261)
    assert [entry["name"] for entry in report.as_dict()["per_label"]] == ["a", "b", "c"]
    # top-1 per sample: s0 label 0, s1 label 1, s2 label 2, s3 label 2 (0.5 beats 0.2 and 0.15)
    top1 = top_k_predictions(SCORES, 1)
    assert top1.astype(int).tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]]
    # ties go to the lower index
    assert top_k_predictions(np.array([[0.5, 0.5, 0.1]]), 1).tolist() == [[True, False, False]]
    # per-label thresholds
    assert binarize(SCORES, [0.95, 0.0, 0.55]).astype(int).tolist() == [
        [0, 1, 1],
        [0, 1, 0],
        [0, 1, 1],
        [0, 1, 0],
    ]


def test_report_is_frozen_and_arrays_read_only() -> None:
    report = evaluate(Y_TRUE, SCORES)
    with pytest.raises(AttributeError):
        report.CP = 0.0  # type: ignore[misc]
    with pytest.raises(ValueError):
        report.precision[0] = 0.0


def test_input_errors_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match=r"y_true must contain only 0 and 1; found -1 at sample 0, label 1"):
        evaluate(np.array([[1, -1]]), np.array([[0.5, 0.5]]))
    with pytest.raises(ValueError, match=r"scores has shape \(1, 3\) but y_true has shape \(1, 2\)"):
        evaluate(np.array([[1, 0]]), np.ones((1, 3)))
    with pytest.raises(ValueError, match="y_true must be 2-D"):
        evaluate(np.array([1, 0]), np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="needs scores, y_pred, or both"):
        evaluate(Y_TRUE)
    with pytest.raises(ValueError, match="scores contain NaN"):
        average_precision(Y_TRUE, np.full(Y_TRUE.shape, np.nan))
    with pytest.raises(ValueError, match="pass scores= to threshold"):
        evaluate(Y_TRUE, y_pred=SCORES)


def test_best_f1_thresholds() -> None:
    y = np.array(
        [
            [1, 1, 0, 1],
            [1, 0, 0, 0],
            [0, 0, 0, 0],
            [1, 1, 0, 0],
            [0, 0, 0, 0],
        ]
    )
    s = np.array(
        [
            [0.9, 0.9, 0.3, 0.5],
            [0.8, 0.8, 0.2, 0.5],
            [0.7, 0.7, 0.1, 0.5],
            [0.4, 0.6, 0.9, 0.5],
            [0.2, 0.1, 0.8, 0.5],
        ]
    )
    # F1 when keeping the top k = 2·TP_k / (k + positives).
    # label 0 (3 positives): k=1 2/4, k=2 4/5, k=3 4/6, k=4 6/7, k=5 6/8 -> best k=4;
    #   cut between 0.4 (kept) and 0.2 -> 0.3
    # label 1 (2 positives): k=1 2/3, k=2 2/4, k=3 2/5, k=4 4/6, k=5 4/7 -> k=1 and k=4 tie at 2/3,
    #   the higher threshold wins: cut between 0.9 and 0.8 -> 0.85
    # label 2: no positives -> fallback 0.5, not fitted
    # label 3 (1 positive, all scores tied): the only cut keeps all 5: F1 = 2/(5+1) = 1/3, threshold 0.5
    selection = best_f1_thresholds(y, s, fallback=0.5)
    np.testing.assert_allclose(selection.thresholds, [0.3, 0.85, 0.5, 0.5])
    np.testing.assert_allclose(selection.f1, [6 / 7, 2 / 3, np.nan, 1 / 3])
    assert selection.fitted.tolist() == [True, True, False, True]
    # Applying the thresholds reproduces the chosen F1 on the validation set.
    _, _, f1 = per_label_prf(y, binarize(s, selection.thresholds))
    np.testing.assert_allclose(f1[selection.fitted], selection.f1[selection.fitted])
    assert selection.as_dict()["f1"][2] is None
    json.dumps(selection.as_dict(), allow_nan=False)


def test_best_f1_thresholds_never_beaten_by_another_cut() -> None:
    rng = np.random.default_rng(1)
    y = rng.random((40, 6)) < 0.3
    s = np.round(rng.random((40, 6)), 1)  # coarse scores: many ties
    selection = best_f1_thresholds(y, s)
    _, _, chosen = per_label_prf(y, binarize(s, selection.thresholds))
    for label in range(6):
        for cut in np.unique(s[:, label]):
            _, _, f1 = per_label_prf(y[:, [label]], s[:, [label]] >= cut)
            assert chosen[label] >= f1[0] - 1e-12


def test_best_f1_tie_rule_is_exact_where_rounded_ratios_are_not() -> None:
    # 2 positives, ranked 4th and 10th of 10: keeping 4 gives F1 = 2·1/(4+2) = 1/3, keeping 10 gives
    # 2·2/(10+2) = 1/3, every other cut less. The higher threshold must win. F1 from
    # precision_recall_curve's P and R rounds the two apart (0.3333333333333333 vs
    # 0.33333333333333337) and would pick the lower one.
    s = np.linspace(1.0, 0.1, 10)[:, None]
    y = np.zeros((10, 1), dtype=int)
    y[[3, 9]] = 1
    selection = best_f1_thresholds(y, s)
    assert selection.thresholds[0] == pytest.approx((s[3, 0] + s[4, 0]) / 2)  # keeps the top 4
    assert selection.f1[0] == 1 / 3


def test_infinite_scores_are_rejected() -> None:
    # sklearn's ranking metrics refuse them; the error names the first one.
    s = SCORES.copy()
    s[2, 1] = -np.inf
    with pytest.raises(ValueError, match=r"scores contain an infinite value \(first at sample 2, label 1\)"):
        evaluate(Y_TRUE, s)


# --------------------------------------------------------------------------------------
# Agreement with direct scikit-learn calls
# --------------------------------------------------------------------------------------


def _random_case(seed: int, *, n_samples: int = 80, n_labels: int = 9, ties: bool) -> tuple:
    """Random multi-label data with two labels lacking positives, one label always positive,
    and samples with no true and no predicted labels at threshold 0.5."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n_samples, n_labels)) < 0.3).astype(int)
    s = rng.random((n_samples, n_labels))
    if n_labels > 3:
        y[:, [1, n_labels - 2]] = 0
        y[:, 2] = 1
    y[:4] = 0
    s[:4] *= 0.4  # -> empty predictions too
    if ties:
        s = np.round(s, 1)
    return y, s


CASES = {
    "distinct scores": _random_case(10, ties=False),
    "tied scores": _random_case(11, ties=True),
    "many samples, tied": _random_case(12, n_samples=700, n_labels=30, ties=True),
    "one label": _random_case(13, n_labels=1, ties=True),
}


def _same(actual: object, expected: object) -> None:
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_thresholded_metrics_match_sklearn(case: str) -> None:
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    y, s = CASES[case]
    p = s >= 0.5
    report = evaluate(y, s)
    one_label = y.shape[1] == 1
    # sklearn reads a single column as a binary target: ask for the positive class as the one label.
    kwargs: dict = {"labels": [1]} if one_label else {}
    precision, recall, f1, support = precision_recall_fscore_support(
        y, p, average=None, zero_division=0, **kwargs
    )
    for got in (per_label_prf(y, p), (report.precision, report.recall, report.f1)):
        _same(got[0], precision)
        _same(got[1], recall)
        _same(got[2], f1)
    assert report.support.tolist() == support.tolist()

    op, or_, of1, _ = precision_recall_fscore_support(y, p, average="micro", zero_division=0, **kwargs)
    _same([report.OP, report.OR, report.OF1], [op, or_, of1])

    evaluated = np.flatnonzero(y.sum(axis=0))
    assert report.n_labels_evaluated == len(evaluated)
    if not one_label:
        # CP and CR are sklearn's macro average restricted to the labels with positives.
        cp, cr, _, _ = precision_recall_fscore_support(
            y, p, labels=evaluated, average="macro", zero_division=0
        )
        _same([report.CP, report.CR], [cp, cr])
        _same(report.CF1, 2 * cp * cr / (cp + cr))

        # samples-F1 is sklearn's with zero_division=1, which only raises each sample with no
        # true and no predicted labels from 0 to 1.
        empty = (~y.any(axis=1) & ~p.any(axis=1)).sum()
        assert empty > 0
        _same(report.samples_f1, f1_score(y, p, average="samples", zero_division=1))
        _same(report.samples_f1, f1_score(y, p, average="samples", zero_division=0) + empty / len(y))
        _same(samples_f1(y, p), report.samples_f1)


@pytest.mark.parametrize("case", list(CASES))
def test_average_precision_matches_sklearn(case: str) -> None:
    from sklearn.metrics import average_precision_score

    y, s = CASES[case]
    ap = evaluate(y, s).average_precision
    has_positives = y.any(axis=0)
    assert np.isnan(ap[~has_positives]).all()
    expected = [average_precision_score(y[:, j], s[:, j]) for j in np.flatnonzero(has_positives)]
    _same(ap[has_positives], expected)
    _same(evaluate(y, s).mAP, np.mean(expected))
    # sklearn's curve, hence AP, does not depend on the order of tied samples; nor does ours.
    order = np.random.default_rng(0).permutation(len(y))
    _same(average_precision(y[order], s[order]), ap)


@pytest.mark.parametrize("case", list(CASES))
def test_best_f1_thresholds_match_the_sklearn_curve(case: str) -> None:
    from sklearn.metrics import f1_score, precision_recall_curve

    y, s = CASES[case]
    selection = best_f1_thresholds(y, s, fallback=0.25)
    for j in range(y.shape[1]):
        if not y[:, j].any():
            assert not selection.fitted[j] and selection.thresholds[j] == 0.25
            continue
        precision, recall, cuts = precision_recall_curve(y[:, j], s[:, j])
        with np.errstate(invalid="ignore"):
            curve_f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
        best = curve_f1.max()
        _same(selection.f1[j], best)
        _same(f1_score(y[:, j], s[:, j] >= selection.thresholds[j]), best)
        # The highest threshold among the best cuts: the lowest score kept is that cut.
        highest_best_cut = cuts[np.abs(curve_f1 - best) < 1e-12].max()
        assert s[s[:, j] >= selection.thresholds[j], j].min() == highest_best_cut
