"""How far a candidate model's logits are from a reference's on the same images: the int8 report's and the
registry gate's measure (top-1 agreement, top-5 overlap, softmax KL)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# Held-out agreement the quantizer's report and the registry's gate expect by default (issue targets).
MIN_TOP1_AGREEMENT = 0.99
MIN_TOP5_OVERLAP = 0.97


@dataclass
class Agreement:
    """How far a candidate model's answers are from a reference's on the same images."""

    images: int
    top1_agreement: float
    top5_overlap: float
    # Mean KL(reference softmax || candidate softmax), in nats.
    mean_kl: float
    # (image, reference top-1, candidate top-1) where they differ.
    changed: list[tuple[str, int, int]] = field(default_factory=list)

    def passes(self, min_top1: float = MIN_TOP1_AGREEMENT, min_top5: float = MIN_TOP5_OVERLAP) -> bool:
        return self.top1_agreement >= min_top1 and self.top5_overlap >= min_top5

    def summary(self) -> str:
        return (f"top-1 agreement {self.top1_agreement:.2%} ({self.images - len(self.changed)}/{self.images}), "
                f"top-5 overlap {self.top5_overlap:.2%}, mean KL {self.mean_kl:.4f}")


def agreement(reference: np.ndarray, candidate: np.ndarray, names: Sequence[str] | None = None) -> Agreement:
    """Top-1 agreement, top-5 overlap and mean softmax KL divergence of two (n, classes) logit arrays."""
    from scipy.special import rel_entr, softmax

    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if reference.shape != candidate.shape or reference.ndim != 2 or reference.shape[0] == 0:
        raise ValueError(f"logits of different or empty shapes: {reference.shape} vs {candidate.shape}")
    names = list(names) if names is not None else [str(i) for i in range(reference.shape[0])]
    top1_ref, top1_cand = reference.argmax(axis=1), candidate.argmax(axis=1)
    k = min(5, reference.shape[1])
    top5_ref = np.argpartition(-reference, k - 1, axis=1)[:, :k]
    top5_cand = np.argpartition(-candidate, k - 1, axis=1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top5_ref, top5_cand, strict=True)])
    kl = rel_entr(softmax(reference, axis=1), softmax(candidate, axis=1)).sum(axis=1)
    changed = [(names[i], int(top1_ref[i]), int(top1_cand[i])) for i in np.flatnonzero(top1_ref != top1_cand)]
    return Agreement(
        images=reference.shape[0],
        top1_agreement=float(np.mean(top1_ref == top1_cand)),
        top5_overlap=float(overlap),
        mean_kl=float(np.mean(kl)),
        changed=changed,
    )
