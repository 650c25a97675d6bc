"""The model side of the harness: log-likelihoods, rolling perplexity windows and greedy generation.

Text becomes tokens exactly as lm-eval's `hf` backend makes them (the tokenizer's own special
tokens; trailing spaces of a context moved to its continuation; the whole pair encoded and split
after the context's tokens; an empty context replaced by the BOS, else EOS, token), so the same
model gives the same numbers. What differs is how the model is run:
- **Sorted, padded batches.** Requests are sorted by length, longest first (as lm-eval), and
  each batch is one right-padded forward pass; padding never changes a causal model's earlier
  positions, so no attention mask is needed.
- **Shared contexts are encoded once.** Requests with the same input (one-token choices of a
  multiple-choice question) share one run. Requests whose inputs share everything before the
  scored tokens (longer choices) are grouped: the shared prefix is run once into a KV cache, copied
  to one cache row per input, and only the continuations run after it.
- **Logits only where scored.** The output projection and log-softmax run on the continuation
  positions alone, not on every position of the batch (for a large vocabulary, most of the cost).
- Generation goes through the engine (`generate/engine.py`), greedy, all requests of a task
  sharing its slots, each stopping at an end-of-sequence token, at `max_gen_toks`, or at the
  first `until` string, cut where lm-eval cuts it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.evaluate.logprobs import eval_mode
from lmforge.generate.engine import GREEDY, Engine, Request
from lmforge.generate.sampling import SamplingParams
from lmforge.models.kv_cache import KVCache
from lmforge.tokenizer import Tokenizer

Pair = tuple[list[int], list[int]]  # (context tokens, continuation tokens)
MakeRequest = Callable[[list[int], int, SamplingParams], Request]  # `LM.request`: adds the stop token ids
Progress = Callable[[int], None]  # called with the number of requests just finished


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[Pair]:
    """lm-eval's `get_rolling_token_windows` (context_len 1) made disjoint: windows of the model's
    context scoring every token once, the first one conditioned on the prefix token."""
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix, *tokens[:first - 1]], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        windows.append((tokens[end - max_len - 1 : end - 1], tokens[end - n : end]))
        done = end
    return [(ctx[: len(ctx) - (len(cont) - 1)], cont) for ctx, cont in windows]


@dataclass
class _Row:
    """One scoring request as model input: `prefix` (not scored) then `suffix` (scored from its start)."""

    index: int
    prefix: tuple[int, ...]
    suffix: list[int]  # the input tokens whose next-token log-probs are scored
    targets: list[int]  # the tokens scored


class Scorer:
    """A causal LM and its tokenizer, answering the harness's three kinds of request."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, *, batch_size: int = 16,
                 make_request: MakeRequest | None = None) -> None:
        if getattr(model.config, "kind", "decoder") != "decoder" or not hasattr(model, "hidden_states"):
            raise LmforgeError("evaluation needs a causal language model; this folder holds an encoder or a "
                               "classifier/reward head")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, max(1, batch_size)
        self.max_len = model.config.max_seq_len
        self.device = next(model.parameters()).device
        self.prefix_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if self.prefix_id is None:
            raise LmforgeError("the tokenizer has neither a BOS nor an EOS token; scoring a text from its start "
                               "needs one (set bos_token or eos_token in tokenizer_config.json)")
        self.make_request = make_request or (lambda ids, n, sampling: Request(ids, n, sampling))

    # ------------------------------------------------------------ text -> tokens (lm-eval's hf backend)

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """The tokenizer's encoding with its special tokens, unless the text already starts with BOS."""
        if add_special_tokens is None:
            add_special_tokens = not text.startswith(self.tokenizer.decode([self.prefix_id]))
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode_pair(self, context: str, continuation: str) -> Pair:
        """Context and continuation tokens, split where lm-eval splits them."""
        if context == "":
            cont = self.encode(continuation, add_special_tokens=False)
            return ([self.prefix_id], cont) if not cont or cont[0] != self.prefix_id else (cont[:1], cont[1:])
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    # ------------------------------------------------------------ log-likelihoods

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], progress: Progress | None = None) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives the continuation) per pair."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in pairs], progress)

    def loglikelihood_rolling(self, texts: Sequence[str], progress: Progress | None = None) -> list[float]:
        """log p(text) of whole texts, scored in disjoint windows of the model's context."""
        windows, owner = [], []
        for i, text in enumerate(texts):
            for pair in rolling_windows(self.encode(text), self.prefix_id, self.max_len):
                windows.append(pair)
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (logp, _) in zip(owner, self.loglikelihood_tokens(windows)):
            totals[i] += logp
        if progress is not None:
            progress(len(texts))
        return totals

    def loglikelihood_tokens(self, pairs: Sequence[Pair], progress: Progress | None = None) -> list[tuple[float, bool]]:
        """Scores of token pairs, in their order; batched longest first, shared prefixes run once."""
        rows = [self._row(i, ctx, cont) for i, (ctx, cont) in enumerate(pairs)]
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        with eval_mode(self.model):
            for batch in self._batches(rows):
                for row, score in zip(batch, self._score(batch)):
                    out[row.index] = score
                if progress is not None:
                    progress(len(batch))
        return out

    def _row(self, index: int, ctx: list[int], cont: list[int]) -> _Row:
        if not ctx or not cont:
            raise LmforgeError("a scoring request has an empty context or continuation after tokenization; "
                               "check the task's templates")
        full = (ctx + cont)[-(self.max_len + 1):]  # left-truncated to the model's context, as lm-eval
        # a continuation longer than the context (which lm-eval refuses with an assertion) is scored on
        # the tokens that fit: its last max_len ones
        inp, n = full[:-1], min(len(cont), self.max_len)
        return _Row(index, tuple(inp[: len(inp) - n]), inp[len(inp) - n:], full[-n:])

    def _batches(self, rows: list[_Row]) -> Iterator[list[_Row]]:
        """Rows grouped by shared prefix, groups longest first, about `batch_size` distinct inputs per batch."""
        groups: dict[tuple[int, ...], list[_Row]] = {}
        for row in rows:
            groups.setdefault(row.prefix, []).append(row)
        ordered = sorted(groups.values(), key=lambda g: -(len(g[0].prefix) + max(len(r.suffix) for r in g)))
        batch: list[_Row] = []
        for group in ordered:
            if batch and len(_inputs(batch)) + len(_inputs(group)) > self.batch_size:
                yield batch
                batch = []
            batch.extend(group)
        if batch:
            yield batch

    def _score(self, batch: list[_Row]) -> list[tuple[float, bool]]:
        """Each row's (log p, greedy); rows with the same input (the one-token choices of a question) share
        one run, and inputs that differ only after a shared prefix share that prefix's run."""
        inputs = _inputs(batch)
        unique = [_Row(-1, prefix, list(suffix), []) for prefix, suffix in inputs]
        prefixes = list(dict.fromkeys(u.prefix for u in unique))
        shared = (len(prefixes) < len(unique) and _cache_width(prefixes, unique) <= self.max_len
                  and self.model.config.sliding_window is None)
        hidden = self._shared_forward(unique, prefixes) if shared else self._plain_forward(unique)  # (U, T, dim)
        lengths = [len(r.suffix) for r in batch]
        picked = torch.cat([hidden[inputs[(r.prefix, tuple(r.suffix))], :n] for r, n in zip(batch, lengths)])  # (sum n, dim)
        logps = self.model.lm_head(picked).float().log_softmax(-1)  # (sum n, V)
        targets = torch.tensor([t for r in batch for t in r.targets], device=self.device)
        token_lp = logps.gather(-1, targets[:, None])[:, 0]
        greedy = logps.argmax(-1) == targets
        return [(float(lp.sum()), bool(ok.all())) for lp, ok in zip(token_lp.split(lengths), greedy.split(lengths))]

    def _plain_forward(self, batch: list[_Row]) -> Tensor:
        """Hidden states (R, T, dim) of the suffixes, each row run in full (prefix + suffix)."""
        inputs = [list(r.prefix) + r.suffix for r in batch]
        ids = _right_padded(inputs, self.device)  # (R, T)
        hidden = self.model.hidden_states(ids)[-1]  # (R, T, dim)
        return torch.stack([_shifted(h, len(r.prefix), hidden.shape[1]) for h, r in zip(hidden, batch)])

    def _shared_forward(self, batch: list[_Row], prefixes: list[tuple[int, ...]]) -> Tensor:
        """Hidden states (R, S, dim) of the suffixes, each distinct prefix run once into a KV cache."""
        cache = KVCache(self.model.config, len(batch), capacity=_cache_width(prefixes, batch),
                        dtype=next(self.model.parameters()).dtype, device=self.device)
        slot = {p: i for i, p in enumerate(prefixes)}
        if any(prefixes):
            ids = _right_padded([list(p) or [self.prefix_id] for p in prefixes], self.device)  # (G, P)
            positions = torch.arange(ids.shape[1], device=self.device).expand_as(ids)  # (G, P)
            self.model.hidden_states(ids, positions=positions, cache=cache.view(0, len(prefixes)))
            for p, i in slot.items():
                cache.rollback(i, len(p))  # forget the padding (and the stand-in of an empty prefix)
        cache.reorder(torch.tensor([slot[r.prefix] for r in batch], device=self.device))
        ids = _right_padded([r.suffix for r in batch], self.device)  # (R, S)
        starts = torch.tensor([len(r.prefix) for r in batch], device=self.device)
        positions = starts[:, None] + torch.arange(ids.shape[1], device=self.device)  # (R, S)
        return self.model.hidden_states(ids, positions=positions, cache=cache.view(0, len(batch)))[-1]  # (R, S, dim)

    # ------------------------------------------------------------ generation

    def generate(self, contexts: Sequence[str], until: Sequence[str], max_gen_toks: int,
                 progress: Progress | None = None) -> list[str]:
        """Greedy continuations of the contexts, cut at the first stop string (the EOS text included)."""
        stops = [s for s in until if s]
        eos = self.tokenizer.eos_id
        if eos is not None and self.tokenizer.decode([eos]) not in stops:
            stops.append(self.tokenizer.decode([eos]))
        limit = self.max_len - max_gen_toks
        if limit <= 0:
            raise LmforgeError(f"max_gen_toks {max_gen_toks} leaves no room for a prompt in the model's context of "
                               f"{self.max_len} tokens; lower it in generation_kwargs")
        special = not (contexts and self.tokenizer.bos_token and contexts[0].startswith(self.tokenizer.bos_token))
        engine = Engine(self.model, n_slots=min(self.batch_size, max(1, len(contexts))))
        ids = {}
        for i, text in enumerate(contexts):
            prompt = self.tokenizer.encode(text, add_special_tokens=special)[-limit:] or [self.prefix_id]
            ids[engine.submit(self.make_request(prompt, max_gen_toks, GREEDY))] = i
        tokens: dict[int, list[int]] = {seq: [] for seq in ids}
        while engine.busy:
            for t in engine.step():
                tokens[t.seq_id].append(t.token)
                text = self.tokenizer.decode(tokens[t.seq_id], skip_special_tokens=True)
                done = t.finish_reason is not None or any(s in text for s in stops)
                if done and t.finish_reason is None:
                    engine.cancel(t.seq_id)
                if done and progress is not None:
                    progress(1)
        out = [""] * len(contexts)
        for seq, i in ids.items():
            text = self.tokenizer.decode(tokens[seq], skip_special_tokens=True)
            for stop in stops:
                text = text.split(stop)[0]
            out[i] = text
        return out


def _inputs(rows: Sequence[_Row]) -> dict[tuple[tuple[int, ...], tuple[int, ...]], int]:
    """The distinct (prefix, suffix) inputs of the rows, numbered in first-seen order."""
    return {key: i for i, key in enumerate(dict.fromkeys((r.prefix, tuple(r.suffix)) for r in rows))}


def _cache_width(prefixes: list[tuple[int, ...]], batch: list[_Row]) -> int:
    """Positions the shared-prefix passes use: the longest prefix (its stand-in when empty) + the longest suffix."""
    return max(max(len(p) for p in prefixes), 1) + max(len(r.suffix) for r in batch)


def _right_padded(rows: Sequence[Sequence[int]], device: torch.device) -> Tensor:
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)  # (R, T); pad id never attended to
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return ids


def _shifted(hidden: Tensor, start: int, width: int) -> Tensor:
    """Row `hidden` (T, dim) from position `start` on, zero-padded back to `width` rows."""
    tail = hidden[start:]
    return torch.cat([tail, tail.new_zeros(width - tail.shape[0], tail.shape[1])]) if start else tail


__all__ = ["Scorer", "rolling_windows"]
