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
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.generate.sampling import (
    SamplingParams,
    init_counts,
    logprobs,
    make_generator,
    next_tokens,
    sampling_logits,
    update_counts,
)
from lmforge.models.kv_cache import CacheView, KVCache

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


def last_logits(model: nn.Module, ids: Tensor, positions: Tensor, cache: CacheView) -> Tensor:
    """Logits (B, V) of the last position only: the output projection is skipped for the rest of a prompt."""
    hidden = model.hidden_states(ids, positions=positions, cache=cache)[-1][:, -1]  # (B, dim)
    return model.lm_head(hidden)  # (B, V)


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
        logits = last_logits(self.model, ids, positions, self.cache.view(first, stop))  # (n, V)
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
        logits = last_logits(self.model, tokens, positions, self.cache.view(0, hi))  # (slots, V)
        return self._emit(runs, logits if slots == list(range(hi)) else logits[slots])

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


def _changed(sampling: SamplingParams, reference: SamplingParams, names: Iterable[str]) -> str:
    """The settings among `names` where `sampling` differs from `reference`: "name=value, ..." or ""."""
    changed = [n for n in names if getattr(sampling, n) != getattr(reference, n)]
    return ", ".join(f"{n}={getattr(sampling, n)!r}" for n in changed)


@torch.inference_mode()
def beam_search(
    model: nn.Module, request: Request, *, width: int = 4, length_penalty: float = 1.0
) -> list[Token]:
    """The most likely continuation under beam search, as the tokens `Engine.stream` would report.

    It follows transformers' `generate(num_beams=width, early_stopping=True)`, so results can be
    checked against it: each step keeps the best `width` candidates that do not stop; a candidate
    ending in a stop token is set aside as finished when it ranks among the best `width`; the
    search ends once `width` have finished, or at `max_new_tokens` or the end of the context,
    where the best `width` candidates finish. Finished beams are ranked by
    sum(log p) / length ** length_penalty (length counts the stop token), so a penalty above 0
    favours longer ones. The search is deterministic: sampling settings it would silently ignore
    are refused.
    """
    if width < 1:
        raise LmforgeError(f"num_beams must be >= 1 (1 = no beam search); got {width}")
    ignored = _changed(request.sampling, GREEDY, [f.name for f in fields(SamplingParams) if f.name != "seed"])
    if ignored:
        raise LmforgeError(f"beam search picks the most likely tokens and cannot honour {ignored}; "
                           "drop those settings, or use num_beams=1 to sample")
    if request.logprobs is not None:
        raise LmforgeError("beam search does not report log-probs; ask for them without num_beams")
    param = next(model.parameters())
    device = param.device
    cache = KVCache(model.config, width, dtype=param.dtype, device=device)
    prompt = fit_prompt(request.prompt, cache.max_positions, request.truncate_left, request.max_new_tokens)
    T = len(prompt)
    logits = last_logits(model, torch.tensor([prompt], device=device), torch.arange(T, device=device)[None],
                         cache.view(0, 1))  # (1, V): the prompt once, then copied into every beam's slot
    cache.reorder(torch.zeros(width, dtype=torch.long, device=device))
    scores = torch.full((width, 1), float("-inf"), device=device)  # (width, 1)
    scores[0] = 0.0  # all beams start identical: expand only the first
    vocab = logits.shape[-1]
    n_candidates = min((len(request.stop_ids) + 1) * width, width * vocab)  # enough that `width` do not stop
    beams: list[list[int]] = [[] for _ in range(width)]
    finished: list[tuple[float, list[int]]] = []
    for step in range(request.max_new_tokens):
        top, flat = (scores + logprobs(logits)).view(-1).topk(n_candidates)  # (n_candidates,) over (width, V)
        # at the last step no candidate is fed back: the best `width` finish
        last = step + 1 == request.max_new_tokens or T + step >= cache.max_positions
        keep: list[tuple[int, int, float]] = []  # (source beam, token, score)
        for rank, (score, index) in enumerate(zip(top.tolist(), flat.tolist())):
            src, token = divmod(index, vocab)
            stops = token in request.stop_ids
            if rank < width and (stops or last):
                seq = [*beams[src], token]
                finished.append((score / len(seq) ** length_penalty, seq))
            elif not stops and len(keep) < width:
                keep.append((src, token, score))
        if last or len(finished) >= width:
            break
        cache.reorder(torch.tensor([src for src, _, _ in keep], device=device))
        beams = [[*beams[src], token] for src, token, _ in keep]
        scores = torch.tensor([[score] for _, _, score in keep], device=device)  # (width, 1)
        tokens = torch.tensor([[token] for _, token, _ in keep], device=device)  # (width, 1)
        positions = torch.full((width, 1), T + step, device=device)  # (width, 1)
        logits = last_logits(model, tokens, positions, cache.view())  # (width, V)
    if not finished:
        return []
    best = max(finished, key=lambda f: f[0])[1]
    events = [Token(0, t) for t in best]
    events[-1].finish_reason = "stop" if best[-1] in request.stop_ids else "length"
    return events


# ------------------------------------------------------------------ speculative decoding


PENALTIES = ("repetition_penalty", "presence_penalty", "frequency_penalty")


@dataclass
class SpeculationStats:
    """What `speculative_stream` counted; pass one in to read it afterwards."""

    proposed: int = 0  # draft tokens the target checked
    accepted: int = 0  # of those, the ones it kept

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposed, 1)


def _probs(logits: Tensor, sampling: SamplingParams) -> Tensor:
    """The distribution (n, V) each row's token is drawn from under `sampling` (greedy: one-hot)."""
    processed = sampling_logits(logits, [sampling] * logits.shape[0])  # (n, V)
    if sampling.greedy:
        return torch.nn.functional.one_hot(processed.argmax(-1), processed.shape[-1]).float()
    return processed.softmax(-1)


def _logits(model: nn.Module, cache: KVCache, ids: list[int], start: int) -> Tensor:
    """Logits (n, V) of `ids` at positions start, start + 1, ... of the cache's one slot."""
    device = cache.key_pos.device
    positions = torch.arange(start, start + len(ids), device=device)[None]  # (1, n)
    return model(torch.tensor([ids], device=device), positions=positions, cache=cache.view())[0]  # (n, V)


def _check_draft(target: nn.Module, draft: nn.Module, request: Request, k: int) -> None:
    """Refuse what speculative decoding cannot do exactly, before any work."""
    if k < 1:
        raise LmforgeError(f"the draft must propose at least 1 token per step; got k={k}")
    if target.config.kind != "decoder" or draft.config.kind != "decoder":
        raise LmforgeError("speculative decoding needs two decoder models; one of them is an encoder "
                           "(BERT-style)")
    if draft.config.vocab_size != target.config.vocab_size:
        raise LmforgeError(
            f"the draft model has a vocabulary of {draft.config.vocab_size} tokens but the target has "
            f"{target.config.vocab_size}; use a draft that shares the target's tokenizer "
            "(a smaller model of its family)"
        )
    devices = {next(target.parameters()).device, next(draft.parameters()).device}
    if len(devices) > 1:
        raise LmforgeError(f"the draft and target models are on different devices "
                           f"({sorted(map(str, devices))}); load them onto the same one")
    penalties = _changed(request.sampling, SamplingParams(), PENALTIES)
    if penalties:
        raise LmforgeError(f"speculative decoding cannot apply {penalties} (a penalty depends on every "
                           "accepted token in turn; it may come from the model's generation_config.json); "
                           "turn it off (repetition 1, presence and frequency 0) or generate without a draft")
    if request.logprobs is not None:
        raise LmforgeError("speculative decoding does not report log-probs; ask for them without a draft")


@torch.inference_mode()
def speculative_stream(
    target: nn.Module,
    draft: nn.Module,
    request: Request,
    *,
    k: int = 4,
    stats: SpeculationStats | None = None,
) -> Iterator[Token]:
    """Yield the tokens of `request` as `Engine.stream` would, by speculative decoding
    (Leviathan et al., 2023; Chen et al., 2023).

    Why: a decode step reads every weight of the target to make one token. Here the small draft
    proposes k tokens and the target checks them all in one pass, so each target pass yields
    between 1 and k + 1 tokens. Each draft token x is kept with probability min(1, p(x) / q(x));
    at the first rejection a token is drawn from normalise(max(0, p - q)); if all are kept, one
    more comes from p. The output has the target's distribution under `request.sampling` exactly
    (though not the same draws as plain sampling with the same seed), and greedy output is the
    target's greedy output token for token. Penalties are refused: they depend on the accepted
    history token by token. `benchmarks/decode.py` measures the speed-up and acceptance rate.
    """
    _check_draft(target, draft, request, k)
    sampling, stats = request.sampling, stats if stats is not None else SpeculationStats()
    device = next(target.parameters()).device
    gen = make_generator(sampling.seed, device)
    caches = [KVCache(m.config, 1, spare=k + 1, dtype=next(m.parameters()).dtype, device=device)
              for m in (target, draft)]
    max_len = caches[0].max_positions  # the target's context ends the output, as in plain decoding
    both = min(c.max_positions for c in caches)  # the draft proposes while both contexts have room
    prompt = fit_prompt(request.prompt, max_len, request.truncate_left, request.max_new_tokens)

    def draw(p: Tensor) -> int:
        return int(p.argmax()) if sampling.greedy else int(torch.multinomial(p, 1, generator=gen))

    emitted = 0

    def event(token: int, position: int) -> Token:
        nonlocal emitted
        emitted += 1
        finish = "stop" if token in request.stop_ids else None
        if finish is None and (emitted >= request.max_new_tokens or position >= max_len):
            finish = "length"  # like the engine: a token at the last position is reported, never fed back
        return Token(0, token, finish_reason=finish)

    pending = prompt[-1]  # the last known token, in neither cache
    n = len(prompt) - 1  # the tokens both caches hold
    if n:  # the prompt but its last token into the caches (the head runs on one position only)
        ids = torch.tensor([prompt[:-1]], device=device)  # (1, n)
        positions = torch.arange(n, device=device)[None]  # (1, n)
        last_logits(target, ids, positions, caches[0].view())
        if n + k < both:
            last_logits(draft, ids, positions, caches[1].view())
    while n + k < both:  # room for the target to check pending + k drafts at positions n .. n + k
        q_rows, drafted, token = [], [], pending
        for i in range(k):
            q_rows.append(_probs(_logits(draft, caches[1], [token], n + i), sampling)[0])  # (V,)
            token = draw(q_rows[-1])
            drafted.append(token)
        p_rows = _probs(_logits(target, caches[0], [pending, *drafted], n), sampling)  # (k + 1, V)
        kept = 0
        for p, q, x in zip(p_rows, q_rows, drafted):
            if sampling.greedy:
                keep = int(p.argmax()) == x
            else:
                keep = bool(torch.rand((), generator=gen, device=device) < p[x] / q[x])
            if not keep:
                break
            kept += 1
        if kept < k:
            residual = (p_rows[kept] - q_rows[kept]).clamp(min=0)  # (V,); greedy: p's one-hot
            last = draw(residual / residual.sum() if residual.sum() > 0 else p_rows[kept])
        else:
            last = draw(p_rows[k])
            _logits(draft, caches[1], drafted[-1:], n + k)  # the draft has not yet seen its own last token
        stats.proposed, stats.accepted = stats.proposed + k, stats.accepted + kept
        for offset, token in enumerate([*drafted[:kept], last]):
            t = event(token, n + 1 + offset)
            yield t
            if t.finish_reason is not None:
                return
        n += 1 + kept  # pending and the kept drafts stay in both caches
        for cache in caches:
            cache.rollback(0, n)
        pending = last
    while True:  # near the end of the context: one token at a time with the target alone
        pending = draw(_probs(_logits(target, caches[0], [pending], n), sampling)[0])
        n += 1
        t = event(pending, n)
        yield t
        if t.finish_reason is not None:
            return
