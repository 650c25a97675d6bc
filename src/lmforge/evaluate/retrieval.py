"""Retrieval metrics: recall@k and mean reciprocal rank from the rank of each query's right answer.

A rank is 1-based; None means the answer was not among the results looked at (it counts as a miss
for every k and adds 0 to the MRR). `dense_ranks` ranks passages by the inner product of unit
vectors (the cosine), as a flat FAISS index does.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

Rank = int | None  # 1-based rank of the right answer; None = not found


def rank_of(results: Sequence[Hashable], answer: Hashable) -> Rank:
    """1-based position of `answer` among the distinct `results` (in order), or None."""
    distinct = list(dict.fromkeys(results))
    return distinct.index(answer) + 1 if answer in distinct else None


def retrieval_scores(ranks: Sequence[Rank], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """`{"recall@K": share of ranks <= K for each K, "mrr": mean of 1 / rank}` over all queries."""
    n = max(len(ranks), 1)
    scores = {f"recall@{k}": sum(r is not None and r <= k for r in ranks) / n for k in ks}
    scores["mrr"] = sum(1 / r for r in ranks if r) / n
    return scores


def dense_ranks(queries: Tensor, passages: Tensor, answers: Sequence[int]) -> list[int]:
    """Rank (1-based) of passage `answers[i]` for query i among all passages, by cosine similarity.

    `queries` (Q, dim) and `passages` (P, dim) need not be normalised. Ties count against the
    answer (a passage scoring the same ranks before it), so a constant embedder scores no better
    than the worst case.
    """
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    p = torch.nn.functional.normalize(passages.float(), dim=-1)
    scores = q @ p.T  # (Q, P)
    right = scores[torch.arange(len(answers)), torch.as_tensor(list(answers))]  # (Q,)
    return ((scores >= right[:, None]).sum(-1)).tolist()  # (Q,) passages scoring at least as well, itself included


__all__ = ["Rank", "dense_ranks", "rank_of", "retrieval_scores"]
