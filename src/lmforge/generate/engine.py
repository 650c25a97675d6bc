"""The generation engine: token ids in, token ids out.

Design choices:
- **Slots, not a fixed batch.** The engine owns one preallocated `KVCache` with `n_slots`
  rows. A request is admitted into a free slot and prefilled there alone; every `step()`
  then decodes one token for all running slots together. Requests can join and leave between
  steps (continuous batching), which is what the server's scheduler loop drives.
- **Text-free.** Stop strings, chat templates and detokenizing live above (api.py, serve/);
  here a sequence stops on a stop token id, on `max_new_tokens`, on a full context, or when
  the caller cancels it.
- **Decode is one forward of (slots, 1) tokens** over contiguous slot rows; idle rows in that
  range carry a dummy token whose result is ignored, so the step never reshapes the cache.
- Beam search and speculative decoding are functions beside the engine that reuse the same
  cache and sampling pieces.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.generate.sampling import (
    SamplingParams,
    init_counts,
    logprobs,
    make_generator,
    next_tokens,
    update_counts,
)
from lmforge.models.kv_cache import KVCache

GREEDY = SamplingParams(temperature=0.0)


@dataclass
class Request:
    """One sequence to generate."""

    prompt: list[int]
    max_new_tokens: int = 64
    sampling: SamplingParams = GREEDY
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # None: no log-probs; 0: the chosen token's; n: also the n most likely
    truncate_left: bool = False  # drop the oldest prompt tokens that do not fit, instead of failing

    def __post_init__(self) -> None:
        if not self.prompt:
            raise LmforgeError("the prompt is empty; give at least one token (e.g. the BOS token)")
        if self.max_new_tokens < 0:
            raise LmforgeError(f"max_new_tokens must be >= 0; got {self.max_new_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise LmforgeError(f"logprobs must be between 0 and 20; got {self.logprobs}")


@dataclass
class Token:
    """One generated token, as reported by `Engine.step`."""

    seq_id: int
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" (a stop token), "length", or None while running


@dataclass
class _Running:
    seq_id: int
    request: Request
    slot: int
    length: int  # tokens in the cache + the pending one
    last_token: int = 0
    generated: int = 0
    generator: torch.Generator | None = None


@dataclass
class Result:
    tokens: list[int]
    finish_reason: str
    logprobs: list[float] = field(default_factory=list)


def fit_prompt(prompt: list[int], max_len: int, truncate_left: bool, max_new_tokens: int = 1) -> list[int]:
    """The prompt, or with truncation its newest tokens, leaving room for up to `max_new_tokens`
    (at most half the window) new ones. Without truncation a prompt that leaves no room fails."""
    if len(prompt) < max_len:
        return prompt
    if truncate_left:
        keep = max_len - max(1, min(max_new_tokens, max_len // 2))
        return prompt[-keep:]
    raise LmforgeError(
        f"the prompt has {len(prompt)} tokens but the context window holds {max_len} "
        f"(at most {max_len - 1} prompt tokens, to leave room for one generated); shorten it or ask for left truncation"
    )


class Engine:
    """Batched, KV-cached decoding over independent slots."""

    def __init__(self, model: nn.Module, *, n_slots: int = 8, max_len: int | None = None) -> None:
        self.model = model.eval()
        self.config = model.config
        if self.config.kind != "decoder":
            raise LmforgeError("generation needs a decoder model; this one is an encoder (BERT-style)")
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache = KVCache(self.config, n_slots, capacity=max_len, dtype=self.dtype, device=self.device)
        self.max_len = self.cache.max_positions
        self.waiting: deque[tuple[int, Request]] = deque()
        self.running: dict[int, _Running] = {}
        self._free = list(range(n_slots))
        self._ids = itertools.count()
        self._counts: Tensor | None = None  # (n_slots, V) generated-token counts, for penalties
        self._seen: Tensor | None = None  # (n_slots, V) prompt ∪ generated

    # -------------------------------------------------------------- queue

    def submit(self, request: Request) -> int:
        """Queue a request; returns its sequence id. Fails at once if the prompt cannot fit."""
        request.prompt = fit_prompt(request.prompt, self.max_len, request.truncate_left, request.max_new_tokens)
        seq_id = next(self._ids)
        self.waiting.append((seq_id, request))
        return seq_id

    def cancel(self, seq_id: int) -> None:
        """Drop a waiting or running sequence; its slot is free for the next step."""
        self.waiting = deque((i, r) for i, r in self.waiting if i != seq_id)
        running = self.running.pop(seq_id, None)
        if running is not None:
            self._release(running.slot)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    # -------------------------------------------------------------- stepping

    @torch.inference_mode()
    def step(self) -> list[Token]:
        """Admit waiting requests into free slots (their first token), then decode one token for the others."""
        decoding = list(self.running.values())
        events = [self._decode(decoding)] if decoding else []
        flat = [t for batch in events for t in batch]
        while self.waiting and self._free:
            flat.extend(self._admit())
        return flat

    def _admit(self) -> list[Token]:
        """Prefill the next waiting request, together with the ones queued right after it that
        have the same prompt length while consecutive slots are free: one forward pass for all
        (a batch of equal prompts reads the weights once, not once per prompt)."""
        first, length = self._free[0], len(self.waiting[0][1].prompt)
        group: list[tuple[int, Request]] = []
        while (self.waiting and len(self.waiting[0][1].prompt) == length
               and first + len(group) in self._free):
            group.append(self.waiting.popleft())
        stop = first + len(group)
        self._free = [s for s in self._free if not first <= s < stop]
        self.cache.reset(first, stop)
        ids = torch.tensor([request.prompt for _, request in group], device=self.device)  # (n, T)
        positions = torch.arange(length, device=self.device)[None].expand(len(group), -1)  # (n, T)
        logits = self._last_logits(ids, positions, self.cache.view(first, stop))  # (n, V)
        runs = []
        for slot, (seq_id, request) in enumerate(group, start=first):
            run = _Running(seq_id, request, slot, length=length, generator=make_generator(request.sampling.seed, self.device))
            self.running[seq_id] = run
            if self._needs_counts(request.sampling):
                self._init_counts(slot, request.prompt)
            runs.append(run)
        return self._emit(runs, logits)

    def _decode(self, runs: list[_Running]) -> list[Token]:
        hi = max(r.slot for r in runs) + 1
        tokens = torch.zeros(hi, 1, dtype=torch.long, device=self.device)  # (slots, 1)
        positions = torch.zeros(hi, 1, dtype=torch.long, device=self.device)  # (slots, 1)
        slots = [r.slot for r in runs]
        tokens[slots, 0] = torch.tensor([r.last_token for r in runs], device=self.device)
        positions[slots, 0] = torch.tensor([r.length - 1 for r in runs], device=self.device)
        logits = self._last_logits(tokens, positions, self.cache.view(0, hi))  # (slots, V)
        return self._emit(runs, logits if slots == list(range(hi)) else logits[slots])

    def _last_logits(self, ids: Tensor, positions: Tensor, cache) -> Tensor:
        """Logits of the last position only: the output projection is skipped for the rest of a prompt."""
        hidden = self.model.hidden_states(ids, positions=positions, cache=cache)[-1][:, -1]  # (B, dim)
        return self.model.lm_head(hidden)  # (B, V)

    def _emit(self, runs: list[_Running], logits: Tensor) -> list[Token]:
        """Choose each run's next token from its logits (runs, V) and report it."""
        params = [r.request.sampling for r in runs]
        counts = seen = None
        if self._counts is not None:
            rows = torch.tensor([r.slot for r in runs], device=self.device)
            counts, seen = self._counts[rows], self._seen[rows]
        chosen = next_tokens(logits, params, [r.generator for r in runs], counts, seen)  # (runs,)
        if self._counts is not None:
            update_counts(counts, seen, chosen)
            self._counts[rows], self._seen[rows] = counts, seen
        want_lp = any(r.request.logprobs is not None for r in runs)
        lp = logprobs(logits) if want_lp else None  # (runs, V)
        return [self._advance(r, int(chosen[i]), None if lp is None else lp[i]) for i, r in enumerate(runs)]

    def _advance(self, run: _Running, token: int, lp: Tensor | None) -> Token:
        run.last_token, run.generated, run.length = token, run.generated + 1, run.length + 1
        event = Token(run.seq_id, token)
        if lp is not None and run.request.logprobs is not None:
            event.logprob = float(lp[token])
            if run.request.logprobs > 0:
                values, ids = lp.topk(run.request.logprobs)  # lp is already log-probabilities
                event.top_logprobs = list(zip(ids.tolist(), values.tolist()))
        if token in run.request.stop_ids:
            event.finish_reason = "stop"
        elif run.generated >= run.request.max_new_tokens or run.length > self.max_len:
            event.finish_reason = "length"
        if event.finish_reason is not None:
            self.running.pop(run.seq_id)
            self._release(run.slot)
        return event

    def _release(self, slot: int) -> None:
        self._free.append(slot)
        self._free.sort()

    # -------------------------------------------------------------- penalties

    @staticmethod
    def _needs_counts(p: SamplingParams) -> bool:
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

    def _init_counts(self, slot: int, prompt: list[int]) -> None:
        vocab = self.config.vocab_size
        if self._counts is None:
            self._counts, self._seen = init_counts([[]] * self.cache.n_slots, vocab, self.device)
        counts, seen = init_counts([prompt], vocab, self.device)
        self._counts[slot], self._seen[slot] = counts[0], seen[0]

    # -------------------------------------------------------------- conveniences

    def generate(self, requests: Iterable[Request]) -> list[Result]:
        """Run requests to completion (more requests than slots wait their turn); results in order."""
        ids = [self.submit(r) for r in requests]
        results = {i: Result([], "length") for i in ids}
        while self.busy:
            for t in self.step():
                _record(results[t.seq_id], t)
        return [results[i] for i in ids]

    def stream(self, request: Request, stop: Callable[[], bool] | None = None) -> Iterator[Token]:
        """Yield the tokens of one request as they are chosen; `stop()` returning True cancels it."""
        seq_id = self.submit(request)
        done = False
        while not done:
            if stop is not None and stop():
                self.cancel(seq_id)
                return
            for t in self.step():
                if t.seq_id == seq_id:
                    done = t.finish_reason is not None
                    yield t


def _record(result: Result, t: Token) -> None:
    if t.finish_reason != "stop":
        result.tokens.append(t.token)
    if t.logprob is not None:
        result.logprobs.append(t.logprob)
    if t.finish_reason is not None:
        result.finish_reason = t.finish_reason


# ------------------------------------------------------------------ beam search


@torch.inference_mode()
def beam_search(
    model: nn.Module,
    prompt: list[int],
    *,
    width: int = 4,
    max_new_tokens: int = 32,
    length_penalty: float = 1.0,
    stop_ids: frozenset[int] = frozenset(),
) -> list[int]:
    """The most likely continuation under beam search; finished beams are ranked by
    sum(log p) / length ** length_penalty (the usual normalisation)."""
    param = next(model.parameters())
    cache = KVCache(model.config, width, dtype=param.dtype, device=param.device)
    prompt = fit_prompt(prompt, cache.max_positions, False)
    T = len(prompt)
    ids = torch.tensor([prompt] * width, device=param.device)  # (width, T)
    logits = model(ids, positions=torch.arange(T, device=param.device).expand(width, T), cache=cache.view())[:, -1]
    scores = torch.full((width,), float("-inf"), device=param.device)
    scores[0] = 0.0  # all beams start identical: expand only the first
    beams: list[list[int]] = [[] for _ in range(width)]
    finished: list[tuple[float, list[int]]] = []
    for step in range(max_new_tokens):
        total = scores[:, None] + logprobs(logits)  # (width, V)
        top, flat = total.view(-1).topk(2 * width)  # extra candidates replace beams that finish
        vocab = logits.shape[-1]
        keep_src, keep_tok, keep_score = [], [], []
        for s, f in zip(top.tolist(), flat.tolist()):
            src, tok = divmod(f, vocab)
            seq = [*beams[src], tok]
            if tok in stop_ids:
                finished.append((s / len(seq) ** length_penalty, seq[:-1]))
            elif len(keep_src) < width:
                keep_src.append(src), keep_tok.append(tok), keep_score.append(s)
        if len(finished) >= width or len(keep_src) < width or T + step + 1 >= cache.max_positions:
            break
        order = torch.tensor(keep_src, device=param.device)
        cache.reorder(order)
        beams = [[*beams[s], t] for s, t in zip(keep_src, keep_tok)]
        scores = torch.tensor(keep_score, device=param.device)
        pos = torch.full((width, 1), T + step, device=param.device)
        logits = model(torch.tensor(keep_tok, device=param.device)[:, None], positions=pos, cache=cache.view())[:, -1]
    finished += [(float(s) / max(len(b), 1) ** length_penalty, b) for s, b in zip(scores.tolist(), beams)]
    return max(finished, key=lambda x: x[0])[1]


# ------------------------------------------------------------------ speculative decoding


@dataclass
class SpeculativeResult:
    tokens: list[int]
    acceptance_rate: float  # accepted draft tokens / proposed draft tokens


def _probs(logits: Tensor, sampling: SamplingParams) -> Tensor:
    """The distribution a token is drawn from under `sampling` (one-hot argmax when greedy)."""
    if sampling.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    from lmforge.generate.sampling import sampling_logits

    return sampling_logits(logits, [sampling] * logits.shape[0]).softmax(-1)


@torch.inference_mode()
def speculative_generate(
    target: nn.Module,
    draft: nn.Module,
    prompt: list[int],
    *,
    max_new_tokens: int = 64,
    k: int = 4,
    sampling: SamplingParams = GREEDY,
    stop_ids: frozenset[int] = frozenset(),
) -> SpeculativeResult:
    """Speculative decoding (Leviathan et al., 2023; Chen et al., 2023).

    The draft proposes k tokens; the target scores them in one forward pass. Each draft token
    x is kept with probability min(1, p(x) / q(x)); at the first rejection a token is drawn
    from normalise(max(0, p - q)); if all are kept, one more comes from p. The output has the
    target's distribution exactly, and under greedy settings equals the target's greedy output.
    Penalties are not supported here (they depend on the accepted history token by token).
    """
    device = next(target.parameters()).device
    gen = make_generator(sampling.seed, device)
    caches = [KVCache(m.config, 1, spare=k + 1, dtype=next(m.parameters()).dtype, device=device) for m in (target, draft)]
    max_len = min(c.max_positions for c in caches)
    prompt = fit_prompt(prompt, max_len, False)

    def run(model: nn.Module, cache: KVCache, ids: list[int], start: int) -> Tensor:
        pos = torch.arange(start, start + len(ids), device=device)[None]  # (1, n)
        return model(torch.tensor([ids], device=device), positions=pos, cache=cache.view())[0]  # (n, V)

    def draw(p: Tensor) -> int:
        return int(p.argmax()) if sampling.greedy else int(torch.multinomial(p, 1, generator=gen))

    out: list[int] = []
    if len(prompt) > 1:  # both caches hold the prompt but its last token
        run(target, caches[0], prompt[:-1], 0)
        run(draft, caches[1], prompt[:-1], 0)
    pending = prompt[-1]  # last known token, not yet in either cache
    n = len(prompt) - 1  # tokens in both caches
    proposed = accepted = 0
    while len(out) < max_new_tokens and n + k + 2 <= max_len:
        # draft k tokens
        q_list, drafted, tok = [], [], pending
        for i in range(k):
            q = _probs(run(draft, caches[1], [tok], n + i)[-1:], sampling)[0]  # (V,)
            tok = draw(q)
            q_list.append(q), drafted.append(tok)
        # target scores pending + drafted in one pass
        p_all = _probs(run(target, caches[0], [pending, *drafted], n), sampling)  # (k + 1, V)
        kept = 0
        new_tokens: list[int] = []
        for i, x in enumerate(drafted):
            p, q = p_all[i], q_list[i]
            u = torch.rand((), generator=gen, device=device) if not sampling.greedy else torch.tensor(0.0)
            if (sampling.greedy and int(p.argmax()) == x) or (not sampling.greedy and u < torch.clamp(p[x] / q[x], max=1.0)):
                kept += 1
                new_tokens.append(x)
                continue
            residual = torch.clamp(p - q, min=0)
            new_tokens.append(draw(residual / residual.sum()) if not sampling.greedy else int(p.argmax()))
            break
        else:
            new_tokens.append(draw(p_all[k]))
            run(draft, caches[1], drafted[-1:], n + k)  # the draft has not yet seen its own last token
        proposed += k
        accepted += kept
        # keep in cache: pending + accepted drafts; the last new token becomes pending
        n += 1 + kept
        for cache in caches:
            cache.rollback(0, n)
        for t in new_tokens:
            out.append(t)
            if t in stop_ids or len(out) >= max_new_tokens:
                return SpeculativeResult(out[:max_new_tokens], accepted / max(proposed, 1))
        pending = new_tokens[-1]
    # near the end of the context: finish one token at a time with the target alone
    while len(out) < max_new_tokens and n + 1 < max_len:
        p = _probs(run(target, caches[0], [pending], n)[-1:], sampling)[0]
        n += 1
        pending = draw(p)
        out.append(pending)
        if pending in stop_ids:
            break
    return SpeculativeResult(out, accepted / max(proposed, 1))
