"""Collapse metrics on hand-computable texts; self-BLEU against sacrebleu's own sentence BLEU."""

from __future__ import annotations

import random

import pytest
import sacrebleu

from lmforge.evaluate.diversity import (
    distinct_n,
    diversity_report,
    mean_length,
    reference_pieces,
    repetition_rate,
    self_bleu,
)


def test_distinct_n_pools_ngrams_over_texts():
    texts = ["a b a", "b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 5)  # a b a b c: {a, b, c}
    assert distinct_n(texts, 2) == 1.0  # (a b) (b a) (b c): n-grams never cross texts
    assert distinct_n(["a a a a"], 2) == pytest.approx(1 / 3)
    assert distinct_n(["a"], 2) == 0.0 and distinct_n([], 1) == 0.0


def test_repetition_rate_is_seq_rep_4():
    # 8 words -> 5 four-grams, "a b c d" twice: 1 - 4/5; "x y" has no 4-gram and is left out
    assert repetition_rate(["a b c d a b c d", "x y"]) == pytest.approx(0.2)
    assert repetition_rate(["a a b", "c d e"], n=1) == pytest.approx((1 / 3 + 0) / 2)
    assert repetition_rate(["short text"]) == 0.0


def test_mean_length_counts_whitespace_words():
    assert mean_length(["a b", "c  d\ne f", ""]) == pytest.approx(2.0)
    assert mean_length([]) == 0.0


def test_self_bleu_bounds():
    assert self_bleu(["the cat sat on the mat"] * 3) == pytest.approx(100.0)
    assert self_bleu(["a b c d", "e f g h", "i j k l"]) == 0.0
    assert self_bleu(["only one"]) == 0.0 and self_bleu([]) == 0.0


def test_self_bleu_equals_sacrebleu_sentence_bleu():
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", ",", "ran", "."]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 14))) for _ in range(9)]
    texts += [texts[0], ""]  # a duplicate (ties in the best reference count) and an empty text
    expected = [sacrebleu.sentence_bleu(t, texts[:i] + texts[i + 1 :]).score for i, t in enumerate(texts)]
    assert self_bleu(texts) == pytest.approx(sum(expected) / len(expected), abs=1e-9)


def test_reference_pieces_are_seeded_spans_of_the_corpus():
    corpus = " ".join(f"w{i}" for i in range(50))
    pieces = reference_pieces(corpus, count=4, length=5, seed=1)
    assert len(pieces) == 4 and all(len(p.split()) == 5 and p in corpus for p in pieces)
    assert len({p.split()[0] for p in pieces}) == 4 and all(int(p.split()[0][1:]) % 5 == 0 for p in pieces)
    assert len(reference_pieces(corpus, count=20, length=5)) == 10  # only 10 pieces that do not overlap
    assert pieces == reference_pieces(corpus, count=4, length=5, seed=1)
    assert pieces != reference_pieces(corpus, count=4, length=5, seed=2)
    assert reference_pieces(["x y", "z"], count=3, length=10) == ["x y z"]


def test_diversity_report_with_reference():
    texts = ["a b c d", "a b e f"]
    report = diversity_report(texts, reference="z " * 100)
    assert report["distinct_1"] == pytest.approx(6 / 8) and report["distinct_2"] == pytest.approx(5 / 6)
    assert report["mean_length"] == 4.0 and report["repetition_rate"] == 0.0
    # the reference is one word repeated: two pieces of 4 words, all the same
    assert report["reference_distinct_1"] == pytest.approx(1 / 8)
    assert report["reference_self_bleu"] == pytest.approx(100.0)
    assert report["reference_mean_length"] == 4.0
    keys = ["distinct_1", "distinct_2", "distinct_3", "self_bleu", "repetition_rate", "mean_length"]
    assert set(report) == {*keys, *(f"reference_{k}" for k in keys)}
    assert set(diversity_report(texts)) == set(keys)
