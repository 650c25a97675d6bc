"""Perplexity and bits per byte from a mean negative log-likelihood, by hand."""

from __future__ import annotations

import math

import pytest

from lmforge.evaluate.perplexity import bits_per_byte, perplexity


def test_perplexity_is_exp_of_the_mean_nll():
    assert perplexity(2.5) == pytest.approx(math.exp(2.5))
    assert perplexity(0.0) == 1.0
    assert perplexity(800.0) == math.inf  # exp would overflow


def test_bits_per_byte_converts_nats_per_unit():
    assert bits_per_byte(3 * math.log(2), bytes_per_unit=1.5) == pytest.approx(2.0)  # 3 bits a token of 1.5 bytes
    assert bits_per_byte(math.log(2)) == pytest.approx(1.0)  # nats per byte: one bit
