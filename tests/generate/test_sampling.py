"""Tests for lmforge.generate.sampling: validation, filters (by hand and against HF warpers),
penalties, greedy, seeding, per-row batching, and the sampled distribution."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.generate.sampling import (
    SamplingParams,
    apply_penalties,
    filter_min_p,
    filter_top_k,
    filter_top_p,
    init_counts,
    logprobs,
    make_generator,
    next_tokens,
    sampling_logits,
    top_logprobs,
    update_counts,
)

PROBS = [0.5, 0.2, 0.15, 0.1, 0.05]


def kept(logits: torch.Tensor) -> list[set[int]]:
    """The token ids that survive a filter, per row."""
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in logits]


def hand_logits(order: list[int] | None = None) -> torch.Tensor:
    """log(PROBS) as one row, optionally permuted so that token order != likelihood order."""
    probs = torch.tensor(PROBS)
    if order is not None:
        probs = probs[order]
    return probs.log()[None, :]  # (1, 5)


def random_logits(batch: int = 16, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=generator) * 3


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": 1.6e-259}, "repetition_penalty"),  # found by the server fuzz test: 0 in float32
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"frequency_penalty": math.inf}, "frequency_penalty"),
        ({"logit_bias": {3: math.nan}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_parameter(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name) as info:
        SamplingParams(**kwargs)
    assert "\n" not in str(info.value)


def test_valid_edges_are_accepted() -> None:
    SamplingParams(temperature=0, top_p=1.0, min_p=1.0, presence_penalty=-2, frequency_penalty=2, top_k=0)
    SamplingParams(top_p=1e-6, min_p=0.0, repetition_penalty=0.5, logit_bias={0: -100.0}, seed=0)


def test_greedy_property() -> None:
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=0.01).greedy


def test_logit_bias_outside_vocabulary_is_rejected() -> None:
    with pytest.raises(ValueError, match="logit_bias"):
        sampling_logits(torch.zeros(1, 5), [SamplingParams(logit_bias={5: 1.0})])


def test_penalties_without_counts_are_rejected() -> None:
    with pytest.raises(ValueError, match="init_counts"):
        sampling_logits(torch.zeros(1, 5), [SamplingParams(presence_penalty=1.0)])


# ----------------------------------------------------------------------------- filters by hand


@pytest.mark.parametrize(
    ("p", "n_kept"),
    [(0.3, 1), (0.5, 1), (0.51, 2), (0.7, 2), (0.71, 3), (0.85, 3), (0.9, 4), (0.96, 5), (1.0, 5)],
)
def test_top_p_keeps_smallest_set_reaching_p(p: float, n_kept: int) -> None:
    order = [3, 0, 4, 1, 2]  # token ids no longer sorted by probability
    logits = hand_logits(order)
    ranked = sorted(range(5), key=lambda i: -PROBS[order[i]])  # token ids, most likely first
    assert kept(filter_top_p(logits, p)) == [set(ranked[:n_kept])]


@pytest.mark.parametrize(
    ("k", "expected"), [(1, {0}), (2, {0, 1}), (4, {0, 1, 2, 3}), (5, set(range(5))), (0, set(range(5)))]
)
def test_top_k_keeps_k_most_likely(k: int, expected: set[int]) -> None:
    assert kept(filter_top_k(hand_logits(), k)) == [expected]


def test_top_k_keeps_ties_with_the_kth() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    assert kept(filter_top_k(logits, 2)) == [{0, 2, 3}]


def test_top_p_breaks_ties_towards_lower_ids() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])  # four tokens at 0.25
    assert kept(filter_top_p(logits, 0.5)) == [{0, 1}]
    assert kept(filter_top_p(logits, 0.3)) == [{0, 1}]  # 0.25 < 0.3: one more needed
    assert kept(filter_top_p(logits, 0.2)) == [{0}]


@pytest.mark.parametrize(
    ("min_p", "expected"), [(0.0, 5), (0.09, 5), (0.15, 4), (0.25, 3), (0.35, 2), (0.5, 1), (1.0, 1)]
)
def test_min_p_keeps_tokens_above_fraction_of_max(min_p: float, expected: int) -> None:
    # threshold = min_p * max prob (0.5); values chosen away from ties with PROBS: 0.25 -> 0.125 keeps 3
    assert kept(filter_min_p(hand_logits(), min_p)) == [set(range(expected))]


def test_filters_take_per_row_tensors() -> None:
    logits = hand_logits().repeat(3, 1)  # (3, 5)
    assert kept(filter_top_k(logits, torch.tensor([0, 1, 3]))) == [set(range(5)), {0}, {0, 1, 2}]
    assert kept(filter_top_p(logits, torch.tensor([1.0, 0.7, 0.71], dtype=torch.float64))) == [
        set(range(5)),
        {0, 1},
        {0, 1, 2},
    ]
    assert kept(filter_min_p(logits, torch.tensor([0.0, 0.5, 0.3]))) == [set(range(5)), {0}, {0, 1, 2}]


# ----------------------------------------------------------------------------- filters vs transformers


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filters_match_transformers_warpers(seed: int) -> None:
    warpers = pytest.importorskip("transformers.generation.logits_process")
    logits = random_logits(batch=32, vocab=200, seed=seed)
    for k in (1, 5, 50, 199):
        expected = warpers.TopKLogitsWarper(top_k=k)(None, logits.clone())
        assert kept(filter_top_k(logits, k)) == kept(expected), f"top_k={k}"
    for p in (0.05, 0.3, 0.5, 0.9, 0.95, 0.999):
        expected = warpers.TopPLogitsWarper(top_p=p)(None, logits.clone())
        assert kept(filter_top_p(logits, p)) == kept(expected), f"top_p={p}"
    for min_p in (0.01, 0.05, 0.1, 0.5, 0.9):
        expected = warpers.MinPLogitsWarper(min_p=min_p)(None, logits.clone())
        assert kept(filter_min_p(logits, min_p)) == kept(expected), f"min_p={min_p}"


def test_repetition_penalty_matches_transformers() -> None:
    warpers = pytest.importorskip("transformers.generation.logits_process")
    logits = random_logits(batch=4, vocab=30)
    prompts = [[1, 2, 3, 3], [0, 29], [5], [7, 8, 9, 10, 11]]
    _, seen = init_counts(prompts, 30)
    counts = torch.zeros(4, 30, dtype=torch.int32)
    ours = apply_penalties(logits, counts, seen, repetition_penalty=1.3)
    for row, prompt in enumerate(prompts):
        processor = warpers.RepetitionPenaltyLogitsProcessor(penalty=1.3)
        theirs = processor(torch.tensor([prompt]), logits[row : row + 1].clone())
        torch.testing.assert_close(ours[row : row + 1], theirs, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-20, 20, allow_nan=False), min_size=2, max_size=12),
    k=st.integers(0, 12),
    p=st.floats(0.01, 1.0),
    min_p=st.floats(0.0, 1.0),
)
def test_filters_keep_argmax_and_an_upper_set(values: list[float], k: int, p: float, min_p: float) -> None:
    logits = torch.tensor([values])
    for out in (filter_top_k(logits, k), filter_top_p(logits, p), filter_min_p(logits, min_p)):
        keep = torch.isfinite(out[0])
        assert keep[logits[0].argmax()]
        assert torch.equal(out[0][keep], logits[0][keep])  # survivors unchanged
        if (~keep).any():  # every dropped token is no more likely than every kept one
            assert logits[0][~keep].max() <= logits[0][keep].min()


# ----------------------------------------------------------------------------- penalties


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    logits = torch.tensor([[2.0, -2.0, 0.0, 4.0, -1.0]])
    counts, seen = init_counts([[0, 1, 2]], 5)
    out = apply_penalties(logits, counts, seen, repetition_penalty=2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 0.0, 4.0, -1.0]]))


def test_presence_and_frequency_follow_openai_formula() -> None:
    logits = random_logits(batch=2, vocab=6)
    counts, seen = init_counts([[5], [4]], 6)  # prompt tokens: not counted by OpenAI penalties
    for tokens in ([0, 1], [0, 2], [0, 1], [3, 1]):
        update_counts(counts, seen, torch.tensor(tokens))
    expected_counts = torch.tensor([[3, 0, 0, 1, 0, 0], [0, 3, 1, 0, 0, 0]], dtype=torch.int32)
    assert torch.equal(counts, expected_counts)
    assert seen.tolist() == [[True, False, False, True, False, True], [False, True, True, False, True, False]]
    out = apply_penalties(logits, counts, seen, presence_penalty=0.7, frequency_penalty=0.3)
    c = expected_counts.float()
    torch.testing.assert_close(out, logits - c * 0.3 - (c > 0).float() * 0.7)


def test_penalties_change_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    counts, seen = init_counts([[]], 3)
    update_counts(counts, seen, torch.tensor([0]))
    params = [SamplingParams(temperature=0, frequency_penalty=1.0)]
    assert next_tokens(logits, params, [None], counts, seen).tolist() == [1]


def test_logit_bias_is_added() -> None:
    logits = torch.zeros(2, 4)
    params = [SamplingParams(logit_bias={1: 5.0, 3: -2.0}), SamplingParams()]
    out = sampling_logits(logits, params)
    assert out.tolist() == [[0.0, 5.0, 0.0, -2.0], [0.0, 0.0, 0.0, 0.0]]
    assert next_tokens(
        logits, [SamplingParams(temperature=0, logit_bias={2: 1.0})] * 2, [None, None]
    ).tolist() == [2, 2]


# ----------------------------------------------------------------------------- greedy, seeds, batching


def test_greedy_is_argmax_and_ignores_generator() -> None:
    logits = random_logits()
    generator = make_generator(7)
    state = generator.get_state()
    params = [SamplingParams(temperature=0, top_k=3, top_p=0.5)] * logits.shape[0]
    tokens = next_tokens(logits, params, [generator] * logits.shape[0])
    assert torch.equal(tokens, logits.argmax(dim=-1))
    assert torch.equal(generator.get_state(), state)


def test_seeded_sampling_is_reproducible_and_seeds_differ() -> None:
    logits = torch.zeros(1, 1000)  # uniform: different seeds must disagree somewhere
    params = [SamplingParams(seed=1)]

    def draw(seed: int) -> list[int]:
        generator = make_generator(seed)
        return [int(next_tokens(logits, params, [generator])) for _ in range(20)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    assert make_generator(None) is None


def test_per_row_params_in_one_batch_equal_each_row_alone() -> None:
    logits = random_logits(batch=6, vocab=64, seed=3)
    params = [
        SamplingParams(seed=0),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, top_k=5, seed=1),
        SamplingParams(temperature=1.3, top_p=0.8, min_p=0.05, seed=2),
        SamplingParams(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=1.0, seed=3),
        SamplingParams(top_k=10, top_p=0.9, logit_bias={5: 3.0}, seed=4),
    ]
    prompts = [[1, 2], [3], [4, 4, 5], [], [6, 7, 8], [9]]
    counts, seen = init_counts(prompts, 64)
    update_counts(counts, seen, torch.tensor([10, 11, 12, 13, 14, 15]))
    batch_logits = sampling_logits(logits, params, counts, seen)
    batch_generators = [make_generator(p.seed) for p in params]
    batch_tokens = [next_tokens(logits, params, batch_generators, counts, seen).tolist() for _ in range(10)]
    for row, p in enumerate(params):
        one = slice(row, row + 1)
        alone = sampling_logits(logits[one], [p], counts[one], seen[one])
        torch.testing.assert_close(batch_logits[one], alone, rtol=0, atol=0)
        generator = make_generator(p.seed)
        alone_tokens = [
            int(next_tokens(logits[one], [p], [generator], counts[one], seen[one])) for _ in range(10)
        ]
        if p.seed is not None or p.greedy:
            assert alone_tokens == [step[row] for step in batch_tokens], f"row {row}"


def test_low_temperature_approaches_greedy() -> None:
    logits = random_logits(batch=8, vocab=100)
    params = [SamplingParams(temperature=1e-3, seed=s) for s in range(8)]
    tokens = next_tokens(logits, params, [make_generator(p.seed) for p in params])
    assert torch.equal(tokens, logits.argmax(dim=-1))
    probs = sampling_logits(logits, params).softmax(dim=-1)
    torch.testing.assert_close(probs.amax(dim=-1), torch.ones(8))


def test_temperature_scales_logits() -> None:
    logits = random_logits(batch=2, vocab=10)
    out = sampling_logits(logits, [SamplingParams(temperature=0.5), SamplingParams(temperature=2.0)])
    torch.testing.assert_close(out, logits / torch.tensor([[0.5], [2.0]]))


# ----------------------------------------------------------------------------- distribution


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    support = probs > 0
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())


def test_sampling_frequencies_converge_to_filtered_softmax() -> None:
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    p = SamplingParams(temperature=0.8, top_k=6, top_p=0.95, min_p=0.02)
    target = sampling_logits(logits, [p]).softmax(dim=-1)[0]  # (V,)
    assert 2 <= int((target > 0).sum()) <= 6
    n = 20_000
    with torch.random.fork_rng():  # unseeded rows share one batched draw from the global RNG
        torch.manual_seed(0)
        tokens = next_tokens(logits.expand(n, -1), [p] * n, [None] * n)
    counts = torch.bincount(tokens, minlength=logits.shape[-1]).float()
    assert counts[target == 0].sum() == 0  # filtered tokens are never drawn
    df = int((target > 0).sum()) - 1
    assert chi_square(counts, target) < 3 * df + 20  # loose: p-value far below 1e-4 otherwise


def test_seeded_rows_sample_the_same_distribution() -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0, -2.0]])
    p = SamplingParams(top_p=0.9, seed=0)
    target = sampling_logits(logits, [p]).softmax(dim=-1)[0]
    n = 4000
    generator = make_generator(p.seed)
    tokens = next_tokens(logits.expand(n, -1), [p] * n, [generator] * n)
    counts = torch.bincount(tokens, minlength=4).float()
    assert counts[target == 0].sum() == 0
    assert chi_square(counts, target) < 20


# ----------------------------------------------------------------------------- log-probs


def test_logprobs_are_raw_log_softmax() -> None:
    logits = random_logits(batch=3, vocab=20).to(torch.bfloat16)
    out = logprobs(logits)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.exp().sum(dim=-1), torch.ones(3))
    values, ids = top_logprobs(logits, 4)
    assert values.shape == ids.shape == (3, 4)
    assert torch.equal(ids[:, 0], logits.float().argmax(dim=-1))
    torch.testing.assert_close(values, out.gather(-1, ids))
    assert (values[:, :-1] >= values[:, 1:]).all()
