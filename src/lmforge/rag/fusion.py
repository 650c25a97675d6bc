"""Reciprocal-rank fusion: several rankings of the same items into one (Cormack, Clarke and Büttcher, 2009).

An item's fused score is the sum over the rankings that hold it of 1 / (k0 + rank), rank counted
from 1. Only ranks matter, so BM25 scores and cosines, which live on different scales, need no
calibration. k0 = 60, the paper's constant, keeps one list's top item from drowning the others.
Ties are broken by the best single rank, then by the order of the rankings (the first list wins).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

RRF_K = 60
Item = TypeVar("Item", bound=Hashable)


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Item]], k0: int = RRF_K) -> list[tuple[Item, float]]:
    """(item, fused score) of every item in any ranking, best first."""
    scores: dict[Item, float] = {}
    best: dict[Item, tuple[int, int]] = {}  # item -> (its best rank, the list where it has it)
    for which, ranking in enumerate(rankings):
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k0 + rank)
            best[item] = min(best.get(item, (rank, which)), (rank, which))
    return sorted(scores.items(), key=lambda pair: (-pair[1], best[pair[0]]))


__all__ = ["RRF_K", "reciprocal_rank_fusion"]
