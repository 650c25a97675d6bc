"""Retrieval metrics: ranks, recall@k and MRR against hand-worked cases; dense ranks against a sort."""

from __future__ import annotations

import torch

from lmforge.evaluate.retrieval import dense_ranks, rank_of, retrieval_scores


def test_rank_of_counts_distinct_results():
    assert rank_of(["a", "a", "b", "c"], "c") == 3
    assert rank_of(["a", "b"], "z") is None


def test_recall_and_mrr():
    scores = retrieval_scores([1, 3, None, 6], ks=(1, 5))
    assert scores == {"recall@1": 0.25, "recall@5": 0.5, "mrr": (1 + 1 / 3 + 1 / 6) / 4}


def test_dense_ranks_equal_a_sort_and_ties_count_against_the_answer():
    torch.manual_seed(0)
    q, p = torch.randn(6, 5), torch.randn(9, 5)
    answers = [0, 3, 8, 2, 2, 5]
    sims = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(p, dim=-1).T
    expected = [sims[i].argsort(descending=True).tolist().index(a) + 1 for i, a in enumerate(answers)]
    assert dense_ranks(q, p, answers) == expected
    assert dense_ranks(torch.ones(1, 3), torch.ones(4, 3), [0]) == [4]
