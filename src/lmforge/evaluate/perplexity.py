"""Perplexity and bits per byte from a mean negative log-likelihood: the language-modelling figures.

The training loop reports its validation loss through these (eval_ppl, eval_bpb), and lm-eval's
rolling-loglikelihood metrics are the same two formulas over other units: word_perplexity is
`perplexity(nll_sum / n_words)`, byte_perplexity `perplexity(nll_sum / n_bytes)`, bits_per_byte
`bits_per_byte(nll_sum / n_bytes)`. Bits per byte compares models with different tokenizers,
since every tokenizer spells the same UTF-8 bytes.
"""

from __future__ import annotations

import math

MAX_EXPONENT = 700  # exp() overflows a float just above 709; report inf instead of raising


def perplexity(mean_nll: float) -> float:
    """exp(mean negative log-likelihood in nats per unit); inf when that overflows."""
    return math.exp(mean_nll) if mean_nll < MAX_EXPONENT else math.inf


def bits_per_byte(mean_nll: float, bytes_per_unit: float = 1.0) -> float:
    """Bits per UTF-8 byte from nats per unit (a token: pass its mean bytes; a byte: 1)."""
    return mean_nll / math.log(2) / bytes_per_unit


__all__ = ["bits_per_byte", "perplexity"]
