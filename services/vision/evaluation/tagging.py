"""Multi-label evaluation metrics: per-label P/R/F1, ML-GCN's CP/CR/CF1 and OP/OR/OF1, samples-F1, AP/mAP.

Inputs are ``y_true`` — an ``(n_samples, n_labels)`` array of 0/1 (or bool) —
and either model ``scores`` of the same shape (thresholded into predictions,
and ranked for average precision; they must be finite) or binary predictions
``y_pred``. The arithmetic is scikit-learn's; where a convention below differs
from its default, the code says how it is adjusted.

Conventions (all spelled out because libraries disagree on them):

* A label is *predicted* for a sample when ``score >= threshold``.
* Per-label precision of a label that is never predicted is 0; recall of a
  label with no positives is 0; F1 is 0 when precision + recall is 0. (As
  scikit-learn with ``zero_division=0``.)
* **CP, CR** (ML-GCN's per-class precision and recall) are the means of the
  per-label precision and recall over the *evaluated labels*: those with at
  least one positive in ``y_true``. Labels without positives are left out of
  every per-label mean (CP, CR and mAP), because no prediction on them can be
  right: including them would score an empty-but-correct label as 0. When all
  labels have positives this is exactly ML-GCN's definition. Their false
  positives still count in OP/OF1. **CF1** = 2·CP·CR / (CP + CR), 0 if both are 0.
* **OP, OR, OF1** (overall, i.e. micro-averaged) pool true positives,
  predictions and positives over all labels, including labels without
  positives: OP = ΣTP / Σpredicted, OR = ΣTP / Σpositives, with the same
  zero-division rules.
* **samples-F1** is the mean over samples of 2·|T∩P| / (|T| + |P|). A sample
  with no true labels and no predicted labels scores 1 (it claimed nothing
  and missed nothing); scikit-learn's default scores it 0.
* **Average precision** of a label is the area under its step precision-recall
  curve, Σ (R_k − R_{k−1})·P_k over the distinct score thresholds, highest
  first. Without tied scores this is the mean, over the label's positives, of
  the precision among samples scored at least as high; tied samples are taken
  together, so the result does not depend on sample order. AP is NaN for a
  label with no positives, and **mAP** is the mean AP over evaluated labels.
  When no label has positives, CP, CR, CF1 and mAP are 0 and
  ``n_labels_evaluated`` is 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.sparse import csr_array
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix_at_thresholds,
    f1_score,
    precision_recall_fscore_support,
)

__all__ = [
    "MultiLabelReport",
    "ThresholdSelection",
    "average_precision",
    "best_f1_thresholds",
    "binarize",
    "evaluate",
    "per_label_prf",
    "samples_f1",
    "top_k_predictions",
]


# --------------------------------------------------------------------------------------
# Input checking
# --------------------------------------------------------------------------------------


def _check_truth(y_true: np.ndarray) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 2:
        raise ValueError(f"y_true must be 2-D (n_samples, n_labels), got shape {y.shape}")
    if y.shape[0] == 0 or y.shape[1] == 0:
        raise ValueError(f"y_true is empty (shape {y.shape}); there is nothing to evaluate")
    if y.dtype != bool:
        bad = np.argwhere((y != 0) & (y != 1))
        if bad.size:
            row, col = bad[0]
            raise ValueError(
                f"y_true must contain only 0 and 1; found {y[row, col].item()!r} "
                f"at sample {row}, label {col} "
                f"({len(bad)} such entries; map 'difficult'/-1 labels to 0 or 1 first)"
            )
    return y.astype(bool)


def _check_like(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    a = np.asarray(array)
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape} but y_true has shape {shape}")
    return a


def _check_scores(scores: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    s = _check_like("scores", scores, shape).astype(np.float64, copy=False)
    # sklearn's ranking metrics reject infinities too; say where, as for NaN.
    for problem, found in (("NaN", np.isnan(s)), ("an infinite value", np.isinf(s))):
        if found.any():
            row, col = np.argwhere(found)[0]
            raise ValueError(f"scores contain {problem} (first at sample {row}, label {col})")
    return s


def _check_pred(y_pred: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    p = _check_like("y_pred", y_pred, shape)
    if p.dtype != bool:
        bad = np.argwhere((p != 0) & (p != 1))
        if bad.size:
            row, col = bad[0]
            raise ValueError(
                f"y_pred must contain only 0 and 1 (pass scores= to threshold scores); "
                f"found {p[row, col].item()!r} at sample {row}, label {col}"
            )
    return p.astype(bool)


def _readonly(array: np.ndarray) -> np.ndarray:
    array = np.array(array, copy=True)
    array.setflags(write=False)
    return array


def _indicators(y: np.ndarray, p: np.ndarray) -> tuple[csr_array, csr_array]:
    """Checked ``(y, p)`` as sklearn multi-label input; callers drop any label past the real ones.

    Sparse, because sklearn validates dense multi-label input with np.unique
    over every entry and then converts it to sparse anyway: ~10x slower.
    sklearn reads one column as a binary target (reporting both classes, and
    refusing average="samples"), not as one label. An extra all-zero label
    changes no count — per sample |T|, |P|, |T∩P|, nor the pooled TP,
    predictions and positives — so padding one keeps every metric.
    """
    if y.shape[1] == 1:
        y, p = (np.pad(a, ((0, 0), (0, 1))) for a in (y, p))
    return csr_array(y), csr_array(p)


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def binarize(scores: np.ndarray, thresholds: float | Sequence[float] | np.ndarray = 0.5) -> np.ndarray:
    """Predictions ``scores >= thresholds``; ``thresholds`` is one value or one per label."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D (n_samples, n_labels), got shape {s.shape}")
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != s.shape[1]):
        raise ValueError(
            f"thresholds must be a scalar or have one value per label ({s.shape[1]}), got shape {t.shape}"
        )
    return s >= t


def top_k_predictions(scores: np.ndarray, k: int) -> np.ndarray:
    """Predict each sample's ``k`` highest-scoring labels (ML-GCN's "top-3" protocol).

    Ties go to the lower label index, so the result is deterministic.
    """
    s = np.asarray(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D (n_samples, n_labels), got shape {s.shape}")
    if not 1 <= k <= s.shape[1]:
        raise ValueError(f"k must be in 1..{s.shape[1]} (the number of labels), got {k}")
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    predicted = np.zeros(s.shape, dtype=bool)
    np.put_along_axis(predicted, top, True, axis=1)
    return predicted


def _prf(pair: tuple[csr_array, csr_array], n_labels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    precision, recall, f1, _ = precision_recall_fscore_support(*pair, average=None, zero_division=0)
    return precision[:n_labels], recall[:n_labels], f1[:n_labels]


def _samples_f1(pair: tuple[csr_array, csr_array]) -> float:
    # zero_division applies only where |T| + |P| = 0, i.e. to the empty/empty sample the
    # docstring scores 1 (sklearn's default scores it 0 and warns).
    return float(f1_score(*pair, average="samples", zero_division=1))


def per_label_prf(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-label (precision, recall, F1), each of shape (n_labels,), with the module's 0 conventions."""
    y = _check_truth(y_true)
    return _prf(_indicators(y, _check_pred(y_pred, y.shape)), y.shape[1])


def samples_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean over samples of 2·|T∩P| / (|T| + |P|); a sample with T and P both empty scores 1."""
    y = _check_truth(y_true)
    return _samples_f1(_indicators(y, _check_pred(y_pred, y.shape)))


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-label average precision, shape (n_labels,); NaN for labels with no positives.

    Tied scores are one threshold: every positive in a tie group gets the
    precision at the end of the group (see the module docstring).
    """
    y = _check_truth(y_true)
    s = _check_scores(scores, y.shape)
    # sklearn's curve has one point per distinct score and AP = Σ ΔR·P, the docstring's
    # definition, ties included. It scores a label without positives 0 (with a warning)
    # where ours is undefined, so those labels are never passed to it and stay NaN.
    # Label by label, as sklearn's multi-label path loops anyway: handing it the evaluated
    # columns would copy the scores, and must copy them C-ordered (on numpy's Fortran-ordered
    # column selection its per-label take() made evaluate() 16 s instead of 1.3 s at 5000 x 1000).
    ap = np.full(y.shape[1], np.nan)
    for label in np.flatnonzero(y.any(axis=0)):
        ap[label] = average_precision_score(y[:, label], s[:, label])
    return ap


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _clean(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


@dataclass(frozen=True, eq=False)
class MultiLabelReport:
    """Everything :func:`evaluate` measures. Per-label arrays are read-only, shape (n_labels,).

    ``average_precision`` and ``mAP`` are None when only binary predictions were given.
    """

    n_samples: int
    n_labels: int
    n_labels_evaluated: int
    CP: float
    CR: float
    CF1: float
    OP: float
    OR: float
    OF1: float
    samples_f1: float
    mAP: float | None
    support: np.ndarray
    n_predicted: np.ndarray
    true_positives: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    average_precision: np.ndarray | None
    label_names: tuple[str, ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values; an undefined AP (label with no positives) becomes None."""
        per_label = []
        for i in range(self.n_labels):
            entry: dict[str, Any] = {"index": i}
            if self.label_names is not None:
                entry["name"] = self.label_names[i]
            entry.update(
                support=int(self.support[i]),
                n_predicted=int(self.n_predicted[i]),
                true_positives=int(self.true_positives[i]),
                precision=float(self.precision[i]),
                recall=float(self.recall[i]),
                f1=float(self.f1[i]),
            )
            if self.average_precision is not None:
                entry["average_precision"] = _clean(self.average_precision[i])
            per_label.append(entry)
        return {
            "n_samples": self.n_samples,
            "n_labels": self.n_labels,
            "n_labels_evaluated": self.n_labels_evaluated,
            "CP": self.CP,
            "CR": self.CR,
            "CF1": self.CF1,
            "OP": self.OP,
            "OR": self.OR,
            "OF1": self.OF1,
            "samples_f1": self.samples_f1,
            "mAP": self.mAP,
            "per_label": per_label,
        }


def evaluate(
    y_true: np.ndarray,
    scores: np.ndarray | None = None,
    *,
    y_pred: np.ndarray | None = None,
    thresholds: float | Sequence[float] | np.ndarray = 0.5,
    label_names: Sequence[str] | None = None,
) -> MultiLabelReport:
    """Evaluate multi-label predictions against ``y_true``.

    Give ``scores`` (predictions are ``scores >= thresholds``, and AP/mAP are
    computed), ``y_pred`` (binary; no AP), or both (``y_pred`` is used for the
    thresholded metrics, ``scores`` for AP — e.g. with
    :func:`top_k_predictions`). See the module docstring for the conventions.
    """
    y = _check_truth(y_true)
    if scores is None and y_pred is None:
        raise ValueError("evaluate() needs scores, y_pred, or both")
    s = None if scores is None else _check_scores(scores, y.shape)
    p = _check_pred(y_pred, y.shape) if y_pred is not None else binarize(s, thresholds)  # type: ignore[arg-type]
    if label_names is not None and len(label_names) != y.shape[1]:
        raise ValueError(f"label_names has {len(label_names)} names but y_true has {y.shape[1]} labels")

    support = y.sum(axis=0)
    n_predicted = p.sum(axis=0)
    tp = (y & p).sum(axis=0)
    pair = _indicators(y, p)
    precision, recall, f1 = _prf(pair, y.shape[1])
    evaluated = support > 0
    n_evaluated = int(evaluated.sum())

    # Not sklearn's average="macro": that takes every label, and its F1 is the mean of
    # per-label F1s, where ML-GCN's CF1 is the F1 of CP and CR.
    cp = float(precision[evaluated].mean()) if n_evaluated else 0.0
    cr = float(recall[evaluated].mean()) if n_evaluated else 0.0
    cf1 = 2 * cp * cr / (cp + cr) if cp + cr else 0.0
    op, or_, of1, _ = precision_recall_fscore_support(*pair, average="micro", zero_division=0)

    ap = None if s is None else average_precision(y, s)
    mean_ap = None if ap is None else (float(ap[evaluated].mean()) if n_evaluated else 0.0)
    return MultiLabelReport(
        n_samples=int(y.shape[0]),
        n_labels=int(y.shape[1]),
        n_labels_evaluated=n_evaluated,
        CP=cp,
        CR=cr,
        CF1=cf1,
        OP=float(op),
        OR=float(or_),
        OF1=float(of1),
        samples_f1=_samples_f1(pair),
        mAP=mean_ap,
        support=_readonly(support),
        n_predicted=_readonly(n_predicted),
        true_positives=_readonly(tp),
        precision=_readonly(precision),
        recall=_readonly(recall),
        f1=_readonly(f1),
        average_precision=None if ap is None else _readonly(ap),
        label_names=None if label_names is None else tuple(label_names),
    )


# --------------------------------------------------------------------------------------
# Threshold calibration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ThresholdSelection:
    """Per-label thresholds from :func:`best_f1_thresholds`; arrays are read-only, shape (n_labels,).

    ``fitted[i]`` is False for a label with no positives in the validation
    set: its threshold is the fallback and its ``f1`` is NaN.
    """

    thresholds: np.ndarray
    f1: np.ndarray
    fitted: np.ndarray
    fallback: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "thresholds": [float(t) for t in self.thresholds],
            "f1": [_clean(v) for v in self.f1],
            "fitted": [bool(v) for v in self.fitted],
            "fallback": self.fallback,
        }


def best_f1_thresholds(
    y_true: np.ndarray, scores: np.ndarray, *, fallback: float = 0.5
) -> ThresholdSelection:
    """Choose, for each label, the threshold that maximises that label's F1 on a validation set.

    Only cuts between distinct scores change the predictions, so each cut is
    tried; the returned threshold is the midpoint between the lowest score
    kept and the next lower score (the widest margin on both sides), or the
    lowest score itself when every sample is kept. Applying it as
    ``scores >= threshold`` reproduces the reported F1 on the validation set.
    Among cuts with equal F1 the highest threshold (fewest predictions) wins.
    A label with no positives cannot be fitted and gets ``fallback``.
    """
    y = _check_truth(y_true)
    s = _check_scores(scores, y.shape)
    thresholds = np.full(y.shape[1], float(fallback))
    best = np.full(y.shape[1], np.nan)
    for label in np.flatnonzero(y.any(axis=0)):
        # One entry per distinct score, highest first, counting what ``scores >= cut`` keeps
        # (precision_recall_curve is these counts as ratios). F1 comes from the counts, not from
        # that curve's rounded precision and recall, so that cuts of equal F1 compare equal and
        # the tie rule is exact.
        _, fps, _, tps, cuts = confusion_matrix_at_thresholds(y[:, label], s[:, label])
        f1 = 2 * tps / (tps + fps + tps[-1])  # 2·TP / (kept + positives)
        k = int(np.argmax(f1))  # first maximum = highest threshold
        cut = cuts[k]
        if k + 1 < len(cuts):
            midpoint = (cuts[k] + cuts[k + 1]) / 2
            # The midpoint of two adjacent floats can round onto the lower one; keep the cut exact then.
            if midpoint > cuts[k + 1]:
                cut = midpoint
        thresholds[label], best[label] = cut, f1[k]
    return ThresholdSelection(
        thresholds=_readonly(thresholds),
        f1=_readonly(best),
        fitted=_readonly(~np.isnan(best)),
        fallback=float(fallback),
    )
