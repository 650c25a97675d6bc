"""Logits to the next token: logit bias, penalties, temperature, top-k, top-p, min-p, sampling.

Pure functions over a batch of rows (`logits: [B, V]`), where every row is one sequence of a
continuous-batching engine and may carry its own `SamplingParams`.

Design choices:
- **One pipeline, conventional order**: logit bias → repetition / presence / frequency
  penalties → temperature → top-k → top-p → min-p → sample. `sampling_logits` returns the
  processed logits and `next_tokens` draws from them, so tests and callers can inspect the
  distribution that is actually sampled.
- **Per-row values are tensors `[B]`**: every filter accepts a Python number (all rows alike) or
  a per-row tensor, and both go through the same arithmetic, so a row gives bit-identical
  results alone or inside any batch. A stage that is off for every row is skipped, which keeps
  the common case (all rows share params) cheap; there is never a Python loop over the vocabulary.
- **Hugging Face semantics** for the filters: top-k keeps every token tied with the k-th
  (`TopKLogitsWarper`), top-p drops tokens whose ascending cumulative probability is
  `<= 1 - p` and always keeps the most likely one (`TopPLogitsWarper`), min-p drops tokens with
  `prob < min_p * max_prob` (`MinPLogitsWarper`). Ties in top-p are broken deterministically:
  among equal logits the lower token id counts as more likely (a stable sort).
- **Penalties** read two per-row tables kept by the caller: `token_counts [B, V]` (how often
  each token was *generated*, for OpenAI presence/frequency penalties) and `seen [B, V]`
  (prompt ∪ generated, for the HF/CTRL repetition penalty). `init_counts` builds them from the
  prompts and `update_counts` adds each step's tokens in place, O(B) per step, instead of
  rescanning the whole history.
- **Greedy rows** (temperature 0) take the argmax of the biased and penalised logits and never
  draw from their generator, so seeded rows stay reproducible whatever their neighbours do.
- **Seeds**: one `torch.Generator` per row (`make_generator`); rows are drawn one by one with
  `torch.multinomial` when any row has a generator, in one batched call when none has.
- **Log-probs for responses** (`logprobs`, `top_logprobs`) are those of the model's raw
  distribution, before bias, penalties, temperature and filters: they describe what the model
  believes, are comparable across requests, and never come out as -inf for a token that the
  filters removed.
- Everything is computed in float32 (lower-precision logits are upcast first).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch
from torch import Tensor

from lmforge.errors import LmforgeError

__all__ = [
    "InvalidSamplingParams",
    "SamplingParams",
    "apply_logit_bias",
    "apply_penalties",
    "apply_temperature",
    "filter_min_p",
    "filter_top_k",
    "filter_top_p",
    "init_counts",
    "logprobs",
    "make_generator",
    "next_tokens",
    "sample",
    "sampling_logits",
    "top_logprobs",
    "update_counts",
]


class InvalidSamplingParams(LmforgeError, ValueError):
    """A sampling setting out of range; a `ValueError`, so request validators can catch it."""


# ----------------------------------------------------------------------------- parameters


MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0  # a logit / 1e-259 is inf in float32, and softmax NaN


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its next token. Defaults mean plain sampling from the model."""

    temperature: float = 1.0  # divides the logits; 0 means greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set reaching this cumulative probability; 1 = off
    min_p: float = 0.0  # keep tokens with prob >= min_p * max prob; 0 = off
    repetition_penalty: float = 1.0  # HF/CTRL: seen tokens' logits divided (>0) or multiplied (<0)
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every generated token
    frequency_penalty: float = 0.0  # OpenAI: subtracted once per occurrence of a generated token
    logit_bias: dict[int, float] | None = None  # token id -> value added to its logit
    seed: int | None = None  # seeds this row's generator; None = torch's global RNG

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `InvalidSamplingParams` (a `ValueError`) naming the first bad setting."""
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        ):
            _check_real(name, getattr(self, name))
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            _fail(f"top_k must be an integer (0 = off), got {self.top_k!r}")
        if self.temperature < 0:
            _fail(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k < 0:
            _fail(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            _fail(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            _fail(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            _fail(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}] "
                  f"(1 = off; beyond, penalised logits overflow or vanish), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                _fail(f"{name} must be in [-2, 2] (0 = off), got {getattr(self, name)}")
        for token, bias in (self.logit_bias or {}).items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                _fail(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            _check_real(f"logit_bias[{token}]", bias)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            _fail(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """True when the row takes the argmax instead of sampling."""
        return self.temperature == 0


def _fail(message: str) -> NoReturn:
    raise InvalidSamplingParams(message)


def _check_real(name: str, value: object) -> None:
    """Reject non-numbers and NaN / infinity with a message naming the setting."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        _fail(f"{name} must be finite, got {value}")


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A `torch.Generator` on `device` seeded with `seed`, or None (use the global RNG)."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


# ----------------------------------------------------------------------------- counts


def init_counts(
    prompts: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Penalty tables for new rows: zero generated counts, `seen` marking each prompt's tokens.

    Returns `token_counts` (int32 `[B, V]`) and `seen` (bool `[B, V]`).
    """
    counts = torch.zeros(len(prompts), vocab_size, dtype=torch.int32, device=device)  # (B, V)
    seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)  # (B, V)
    for row, prompt in enumerate(prompts):
        ids = torch.as_tensor(list(prompt), dtype=torch.long, device=device)  # (T,)
        seen[row, ids] = True
    return counts, seen


def update_counts(token_counts: Tensor, seen: Tensor, tokens: Tensor) -> None:
    """Record one new token per row, in place: `token_counts[b, tokens[b]] += 1`, `seen` too.

    The one mutating helper here: rewriting `[B, V]` tables every step would cost O(B·V).
    """
    rows = torch.arange(tokens.shape[0], device=tokens.device)  # (B,)
    token_counts.index_put_(
        (rows, tokens), torch.ones_like(tokens, dtype=token_counts.dtype), accumulate=True
    )
    seen[rows, tokens] = True


# ----------------------------------------------------------------------------- logit transforms

RowValue = float | int | Tensor  # one value for every row, or a tensor [B] with one per row


def _per_row(value: RowValue, logits: Tensor, dtype: torch.dtype) -> Tensor:
    """`value` as a `[B]` tensor on the logits' device; scalars and tensors take the same path."""
    batch = logits.shape[0]
    if isinstance(value, Tensor):
        if value.shape != (batch,):
            raise ValueError(f"per-row value must have shape ({batch},), got {tuple(value.shape)}")
        return value.to(device=logits.device, dtype=dtype)
    return torch.full((batch,), value, dtype=dtype, device=logits.device)  # (B,)


def apply_logit_bias(logits: Tensor, biases: Sequence[Mapping[int, float] | None]) -> Tensor:
    """Add each row's `{token id: bias}` to its logits. Loops over bias entries, not the vocabulary."""
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for row, bias in enumerate(biases):
        for token, value in (bias or {}).items():
            rows.append(row)
            cols.append(token)
            values.append(value)
    if not rows:
        return logits
    vocab_size = logits.shape[-1]
    if max(cols) >= vocab_size:
        raise InvalidSamplingParams(
            f"logit_bias names token {max(cols)}, but the vocabulary has {vocab_size} tokens (0..{vocab_size - 1})"
        )
    index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
    bias = torch.tensor(values, dtype=logits.dtype, device=logits.device)  # (n_entries,)
    return logits.index_put(index, bias, accumulate=True)


def apply_penalties(
    logits: Tensor,
    token_counts: Tensor,
    seen: Tensor,
    repetition_penalty: RowValue = 1.0,
    presence_penalty: RowValue = 0.0,
    frequency_penalty: RowValue = 0.0,
) -> Tensor:
    """Repetition (HF/CTRL, over `seen`), then presence and frequency (OpenAI, over `token_counts`).

    Repetition: a seen token's logit `l` becomes `l / r` if `l > 0`, else `l * r`.
    Presence / frequency: `l - count * frequency - (count > 0) * presence`.
    `token_counts` and `seen` are `[B, V]` like `logits` (see `init_counts`, `update_counts`).
    """
    if token_counts.shape != logits.shape or seen.shape != logits.shape:
        raise ValueError(
            f"token_counts {tuple(token_counts.shape)} and seen {tuple(seen.shape)} must match "
            f"logits {tuple(logits.shape)}; build them with init_counts(prompts, vocab_size)"
        )
    rep = _per_row(repetition_penalty, logits, logits.dtype)[:, None]  # (B, 1)
    presence = _per_row(presence_penalty, logits, logits.dtype)[:, None]  # (B, 1)
    frequency = _per_row(frequency_penalty, logits, logits.dtype)[:, None]  # (B, 1)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)  # (B, V)
    logits = torch.where(seen, penalised, logits)
    counts = token_counts.to(logits.dtype)  # (B, V)
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def apply_temperature(logits: Tensor, temperature: RowValue) -> Tensor:
    """Divide each row by its temperature; rows with temperature 0 (greedy) are left as they are."""
    t = _per_row(temperature, logits, logits.dtype)  # (B,)
    t = torch.where(t == 0, torch.ones_like(t), t)[:, None]  # (B, 1)
    return logits / t


def filter_top_k(logits: Tensor, k: RowValue) -> Tensor:
    """Set to -inf every logit below the row's k-th largest (ties with it are kept); k <= 0 = off."""
    vocab_size = logits.shape[-1]
    if not isinstance(k, Tensor) and not 0 < k < vocab_size:
        return logits
    k_rows = _per_row(k, logits, torch.long)  # (B,)
    active = (k_rows > 0) & (k_rows < vocab_size)  # (B,)
    k_max = int(k_rows.clamp(1, vocab_size).max())
    top_values = logits.topk(k_max, dim=-1).values  # (B, k_max), descending
    kth = top_values.gather(-1, (k_rows.clamp(1, k_max) - 1)[:, None])  # (B, 1)
    remove = (logits < kth) & active[:, None]  # (B, V)
    return logits.masked_fill(remove, -math.inf)


def filter_top_p(logits: Tensor, p: RowValue) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p; p >= 1 = off.

    HF's rule: sort ascending, drop tokens whose cumulative probability is `<= 1 - p`, always
    keep the most likely token. Ties: the lower token id counts as more likely.
    """
    if not isinstance(p, Tensor) and p >= 1:
        return logits
    p_rows = _per_row(p, logits, torch.float64)  # (B,); float64 so 1 - p rounds once, like HF
    threshold = (1 - p_rows).to(logits.dtype)[:, None]  # (B, 1)
    sorted_desc, order_desc = logits.sort(dim=-1, descending=True, stable=True)  # (B, V)
    sorted_asc, order_asc = sorted_desc.flip(-1), order_desc.flip(-1)  # (B, V), least likely first
    cumulative = sorted_asc.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    remove_sorted = cumulative <= threshold  # (B, V)
    remove_sorted[:, -1] = False  # the most likely token always stays
    remove_sorted &= (p_rows < 1)[:, None]
    remove = remove_sorted.scatter(-1, order_asc, remove_sorted)  # (B, V), back to token order
    return logits.masked_fill(remove, -math.inf)


def filter_min_p(logits: Tensor, min_p: RowValue) -> Tensor:
    """Set to -inf every token with `prob < min_p * max_prob`; min_p = 0 = off."""
    if not isinstance(min_p, Tensor) and min_p <= 0:
        return logits
    scale = _per_row(min_p, logits, logits.dtype)[:, None]  # (B, 1)
    probs = logits.softmax(dim=-1)  # (B, V)
    remove = probs < scale * probs.amax(dim=-1, keepdim=True)  # (B, V)
    return logits.masked_fill(remove, -math.inf)


# ----------------------------------------------------------------------------- the pipeline


def _shared_or_per_row(values: list[float], device: torch.device) -> float | Tensor:
    """One Python number when every row agrees (lets a stage skip itself), else a `[B]` tensor."""
    if all(v == values[0] for v in values):
        return values[0]
    return torch.tensor(values, dtype=torch.float64, device=device)  # (B,)


def _is_off(value: float | Tensor, off: float) -> bool:
    return not isinstance(value, Tensor) and value == off


def sampling_logits(
    logits: Tensor,
    params: Sequence[SamplingParams],
    token_counts: Tensor | None = None,
    seen: Tensor | None = None,
) -> Tensor:
    """The logits each row samples from: bias → penalties → temperature → top-k → top-p → min-p.

    `logits` is `[B, V]`, `params` has one entry per row. Greedy rows get bias and penalties, and
    their argmax is unchanged by the filters. Returns float32 `[B, V]` with removed tokens at -inf.
    """
    if len(params) != logits.shape[0]:
        raise ValueError(f"got {len(params)} SamplingParams for {logits.shape[0]} rows of logits")
    logits = logits.float()  # (B, V)
    device = logits.device
    logits = apply_logit_bias(logits, [p.logit_bias for p in params])

    repetition = _shared_or_per_row([p.repetition_penalty for p in params], device)
    presence = _shared_or_per_row([p.presence_penalty for p in params], device)
    frequency = _shared_or_per_row([p.frequency_penalty for p in params], device)
    if not (_is_off(repetition, 1.0) and _is_off(presence, 0.0) and _is_off(frequency, 0.0)):
        if token_counts is None or seen is None:
            raise ValueError(
                "penalties need token_counts and seen; build them with init_counts(prompts, vocab_size)"
            )
        logits = apply_penalties(logits, token_counts, seen, repetition, presence, frequency)

    temperature = _shared_or_per_row([p.temperature for p in params], device)
    if not (_is_off(temperature, 1.0) or _is_off(temperature, 0.0)):
        logits = apply_temperature(logits, temperature)
    top_k = _shared_or_per_row([p.top_k for p in params], device)
    if not _is_off(top_k, 0):
        logits = filter_top_k(logits, top_k)
    top_p = _shared_or_per_row([p.top_p for p in params], device)
    if not _is_off(top_p, 1.0):
        logits = filter_top_p(logits, top_p)
    min_p = _shared_or_per_row([p.min_p for p in params], device)
    if not _is_off(min_p, 0.0):
        logits = filter_min_p(logits, min_p)
    return logits


def sample(logits: Tensor, generators: Sequence[torch.Generator | None]) -> Tensor:
    """Draw one token per row from `softmax(logits)`; each row uses its own generator (or the global RNG)."""
    probs = logits.softmax(dim=-1)  # (B, V)
    if all(g is None for g in generators):
        return torch.multinomial(probs, 1).squeeze(-1)  # (B,)
    return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators)])  # (B,)


def next_tokens(
    logits: Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    token_counts: Tensor | None = None,
    seen: Tensor | None = None,
) -> Tensor:
    """The next token id of every row (`[B]`, int64), each row under its own `SamplingParams`.

    `generators[b]` seeds row b (see `make_generator`); greedy rows take the argmax and leave
    their generator untouched. `token_counts` / `seen` are needed only when a row has penalties.
    """
    if len(generators) != len(params):
        raise ValueError(f"got {len(generators)} generators for {len(params)} SamplingParams")
    processed = sampling_logits(logits, params, token_counts, seen)  # (B, V)
    greedy = [p.greedy for p in params]
    tokens = processed.argmax(dim=-1)  # (B,)
    if all(greedy):
        return tokens
    sampled_rows = [b for b, g in enumerate(greedy) if not g]
    if len(sampled_rows) == len(params):
        return sample(processed, generators)
    index = torch.tensor(sampled_rows, device=processed.device)  # (S,)
    drawn = sample(processed[index], [generators[b] for b in sampled_rows])  # (S,)
    return tokens.index_copy(0, index, drawn)


# ----------------------------------------------------------------------------- log-probs


def logprobs(logits: Tensor) -> Tensor:
    """Log-probabilities of the model's raw distribution, float32, same shape as `logits`."""
    return logits.float().log_softmax(dim=-1)


def top_logprobs(logits: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The n most likely tokens per row of the raw distribution: (log-probs, ids), each `[..., n]`."""
    values, ids = logprobs(logits).topk(n, dim=-1)  # (..., n)
    return values, ids
