"""Reducing several candidate summaries of one dialogue to one.

MBR (minimum Bayes risk): the candidate with the highest (weighted) mean ROUGE against the
other candidates, i.e. the one the others agree with most. Weights (for example each member's
dev ROUGE) make a trusted member's agreement count for more.
"""
from __future__ import annotations

from typing import Optional, Sequence

from summ.scoring import pair_rouge_mean


def mbr_select(candidates: Sequence[str], weights: Optional[Sequence[float]] = None) -> int:
    """Index of the MBR choice among candidates (ties: the earliest)."""
    n = len(candidates)
    if n == 1:
        return 0
    w = list(weights) if weights is not None else [1.0] * n
    best, best_score = 0, float("-inf")
    for i in range(n):
        total = sum(w[j] for j in range(n) if j != i)
        score = sum(w[j] * pair_rouge_mean(candidates[i], candidates[j]) for j in range(n) if j != i)
        score = score / total if total else 0.0
        if score > best_score + 1e-12:
            best, best_score = i, score
    return best
