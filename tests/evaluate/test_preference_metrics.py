"""Preference accuracy and margins: by hand for scores, and for a language model's log-probabilities."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.data.preference import PreferencePair
from lmforge.evaluate.preference import log_prob_preference, pair_metrics


def test_pair_metrics_by_hand():
    m = pair_metrics(torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0.0, 2.0, 1.0]))
    assert m["accuracy"] == pytest.approx(2 / 3) and m["margin"] == pytest.approx((1 - 2 + 2) / 3)
    assert m["chosen_reward"] == pytest.approx(4 / 3) and m["rejected_reward"] == pytest.approx(1.0)


def test_log_prob_preference_swaps_with_the_pair(tiny_lm_dir, one_thread):
    lm = lmforge.load(tiny_lm_dir)
    replies = [" the quick brown fox.", " def add(a, b):", " Héllo wörld", " return a + b", " naïve café!"]
    pairs = [PreferencePair("Q: say something\nA:", a, b) for a in replies for b in replies if a != b]
    forward = log_prob_preference(lm.model, lm.tokenizer, pairs, batch_size=3)
    backward = log_prob_preference(lm.model, lm.tokenizer, [PreferencePair(p.prompt, p.rejected, p.chosen) for p in pairs])
    assert forward["accuracy"] == pytest.approx(0.5)  # every reply pair appears in both orders
    assert forward["margin"] == pytest.approx(0.0, abs=1e-5)
    first = log_prob_preference(lm.model, lm.tokenizer, pairs[:4])
    first_back = log_prob_preference(lm.model, lm.tokenizer, [PreferencePair(p.prompt, p.rejected, p.chosen) for p in pairs[:4]])
    assert first["accuracy"] + first_back["accuracy"] == pytest.approx(1.0)  # no ties between different replies
    assert first["margin"] == pytest.approx(-first_back["margin"], abs=1e-5) and first["margin"] != 0
    assert backward["chosen_reward"] == pytest.approx(forward["rejected_reward"], abs=1e-5)
