"""The scheduler: the one loop that owns the model and its `Engine`.

Design choices:
- **One thread owns the model.** A background thread runs `Engine.step()` while any sequence
  runs or waits; nothing else touches the engine or runs the model. One-off forward passes
  (embeddings, prompt scoring for `echo`) are handed to the same thread with `call()` and run
  between decode steps, so they never race a step and never need a lock around the model.
- **Requests join and leave between steps.** The event loop never calls the engine: `submit`,
  `cancel` and `call` put work into an inbox under a `threading.Condition` and wake the thread,
  which applies it before its next step (admissions, then cancellations, then calls, then one
  step). A cancelled sequence (a client that went away, a stop string that matched) leaves its
  slot before the next token is decoded.
- **Tokens go back through the request's own asyncio queue.** Each HTTP request gets a
  `Stream` whose `asyncio.Queue` receives lists of `(choice index, Token)`; after every step the
  thread makes one `loop.call_soon_threadsafe` call per event loop that puts each stream's group
  on its queue. One wake-up per step, not per token; a slow consumer simply finds several groups
  waiting and sends them as one chunk.
- **Admission control is a count of sequences.** A request's `n` sequences are accepted when
  the running, waiting and not-yet-admitted sequences stay within `slots + max_queue`; otherwise
  `QueueFull` (the app answers 429) carries a Retry-After estimate from recent sequence durations.
- Token ids only: text and stop strings stay in `streaming.py`, response shapes in `renderers.py`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.generate.engine import Engine, Request, Token
from lmforge.generate.sampling import logprobs as raw_logprobs
from lmforge.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)

T = TypeVar("T")
Group = list[tuple[int, Token]]  # tokens of one step for one stream: (choice index, token)


class QueueFull(LmforgeError):
    """The server holds as many sequences as it may; the client should retry later."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(eq=False)
class Stream:
    """One HTTP request's sequences (one per choice); tokens arrive on `queue` as `Group`s,
    or an exception when the scheduler failed the request."""

    requests: list[Request]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Group | BaseException] = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    # owned by the scheduler thread:
    live: dict[int, int] = field(default_factory=dict)  # choice index -> engine sequence id
    last_token: dict[int, float] = field(default_factory=dict)  # choice index -> time of its last token


class Scheduler:
    """Steps an `Engine` in a background thread; `engine=None` (encoder models) runs `call`s only."""

    def __init__(self, engine: Engine | None, metrics: ServerMetrics, *, max_queue: int,
                 stats_every: float = 10.0) -> None:
        self.engine = engine
        self.metrics = metrics
        self.n_slots = engine.cache.n_slots if engine is not None else 0
        self.capacity = self.n_slots + max_queue  # sequences held at once, running or waiting
        self.stats_every = stats_every
        self._cond = threading.Condition()
        self._inbox: list[Stream] = []
        self._cancels: list[tuple[Stream, int | None]] = []
        self._calls: list[tuple[Callable[[], object], concurrent.futures.Future[object]]] = []
        self._active = 0  # sequences accepted and not finished (inbox, waiting or running)
        self._stopping = False
        self._owner: dict[int, tuple[Stream, int]] = {}  # engine sequence id -> (stream, choice index)
        self._seq_seconds = 1.0  # moving average of a sequence's life, for Retry-After
        self._stats = _StatsWindow(time.perf_counter())
        self._thread = threading.Thread(target=self._run, name="lmforge-scheduler", daemon=True)

    # ------------------------------------------------------------------ called from the event loop

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the current step, fail what is left, and join the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def running(self) -> int:
        return len(self.engine.running) if self.engine is not None else 0

    @property
    def waiting(self) -> int:
        return max(self._active - self.running, 0)

    def submit(self, requests: list[Request]) -> Stream:
        """Accept a request's sequences, or raise `QueueFull`; must run on the event loop."""
        if self.engine is None:
            raise LmforgeError("this model is an encoder (BERT-style); it serves /v1/embeddings, not generation")
        stream = Stream(requests, asyncio.get_running_loop())
        with self._cond:
            if self._active + len(requests) > self.capacity:
                self.metrics.rejected.inc()
                raise QueueFull(
                    f"the server is full ({self._active} sequences running or queued, room for {self.capacity}); "
                    "retry after the Retry-After seconds", self._retry_after())
            self._active += len(requests)
            self._inbox.append(stream)
            self._cond.notify()
        return stream

    def cancel(self, stream: Stream, index: int | None = None) -> None:
        """Drop one choice of `stream` (or all of them) before the next step; its slot is freed."""
        with self._cond:
            self._cancels.append((stream, index))
            self._cond.notify()

    def call(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run `fn()` on the scheduler thread between two steps; await the result."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise LmforgeError("the server is shutting down")
            self._calls.append((fn, future))  # type: ignore[arg-type]
            self._cond.notify()
        return asyncio.wrap_future(future)

    def _retry_after(self) -> int:
        queued = max(self._active - self.n_slots, 0) + 1
        return int(min(max(math.ceil(self._seq_seconds * queued / max(self.n_slots, 1)), 1), 60))

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._inbox or self._cancels or self._calls or self._busy()):
                    self._idle()
                if self._stopping:
                    break
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
                calls, self._calls = self._calls, []
            for stream in inbox:
                self._admit(stream)
            for stream, index in cancels:
                self._cancel(stream, index, "cancelled")
            for fn, future in calls:
                _run_call(fn, future)
            if self._busy():
                self._step()
            self._log_stats()
        self._shutdown()

    def _idle(self) -> None:
        """Wait for work (lock held). A window with activity is logged when due; after an idle wait a
        fresh window starts, so idle hours never dilute the next line's rates."""
        window = self._stats
        if window.generated or window.prompt:
            self._cond.wait(max(window.start + self.stats_every - time.perf_counter(), 0.0))
            self._log_stats()
        else:
            self._cond.wait()
            self._stats = _StatsWindow(time.perf_counter())

    def _busy(self) -> bool:
        return self.engine is not None and self.engine.busy

    def _admit(self, stream: Stream) -> None:
        assert self.engine is not None
        for index, request in enumerate(stream.requests):
            try:
                seq_id = self.engine.submit(request)
            except LmforgeError as err:  # the app checks prompts first; this is a last resort
                self._forget(len(stream.requests) - index)
                self._cancel(stream, None, "error")
                _post(stream.loop, [(stream, err)])
                return
            stream.live[index] = seq_id
            self._owner[seq_id] = (stream, index)

    def _cancel(self, stream: Stream, index: int | None, reason: str) -> None:
        indices = list(stream.live) if index is None else [index]
        for i in indices:
            seq_id = stream.live.pop(i, None)
            if seq_id is None:
                continue
            assert self.engine is not None
            self.engine.cancel(seq_id)
            self._owner.pop(seq_id, None)
            self.metrics.finished.inc(reason=reason)
            self._forget(1)

    def _step(self) -> None:
        assert self.engine is not None
        try:
            tokens = self.engine.step()
        except Exception as err:  # a bug or out of memory: fail everyone, keep serving
            log.exception("engine step failed; failing %d sequences", len(self._owner))
            self._fail_all(LmforgeError(f"generation failed: {err}"))
            return
        now = time.perf_counter()
        groups: dict[Stream, Group] = {}
        for token in tokens:
            owner = self._owner.get(token.seq_id)
            if owner is None:
                continue
            stream, index = owner
            self._observe(stream, index, now)
            groups.setdefault(stream, []).append((index, token))
            if token.finish_reason is not None:
                self._finish(stream, index, token.finish_reason, now)
        self._stats.generated += len(tokens)
        _post_groups(groups)

    def _observe(self, stream: Stream, index: int, now: float) -> None:
        last = stream.last_token.get(index)
        if last is None:
            prompt = len(stream.requests[index].prompt)
            self.metrics.ttft.observe(now - stream.submitted)
            self.metrics.prompt_tokens.inc(prompt)
            self._stats.prompt += prompt
        else:
            self.metrics.itl.observe(now - last)
        stream.last_token[index] = now
        self.metrics.generation_tokens.inc()

    def _finish(self, stream: Stream, index: int, reason: str, now: float) -> None:
        seq_id = stream.live.pop(index)
        self._owner.pop(seq_id, None)
        self.metrics.finished.inc(reason=reason)
        self._seq_seconds = 0.8 * self._seq_seconds + 0.2 * (now - stream.submitted)
        self._forget(1)

    def _forget(self, n: int) -> None:
        with self._cond:
            self._active -= n

    def _fail_all(self, err: BaseException) -> None:
        streams = {stream for stream, _ in self._owner.values()}
        for stream in streams:
            self._cancel(stream, None, "error")
        _post_all(streams, err)

    def _shutdown(self) -> None:
        with self._cond:
            pending, self._inbox = self._inbox, []
            calls, self._calls = self._calls, []
        err = LmforgeError("the server is shutting down")
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(err)
        for stream in pending:
            self._forget(len(stream.requests))
        _post_all(pending, err)
        self._fail_all(err)

    def _log_stats(self) -> None:
        now = time.perf_counter()
        window = self._stats
        if now - window.start < self.stats_every:
            return
        if window.generated or window.prompt or self._busy():
            seconds = now - window.start
            log.info("running %d, waiting %d, generating %.1f tok/s, prefilling %.1f tok/s",
                     self.running, self.waiting, window.generated / seconds, window.prompt / seconds)
        self._stats = _StatsWindow(now)


@dataclass
class _StatsWindow:
    start: float
    generated: int = 0
    prompt: int = 0


def _run_call(fn: Callable[[], object], future: concurrent.futures.Future[object]) -> None:
    if not future.set_running_or_notify_cancel():  # the awaiting request went away
        return
    try:
        future.set_result(fn())
    except BaseException as err:
        future.set_exception(err)


def _post_groups(groups: dict[Stream, Group]) -> None:
    _post_by_loop([(stream, group) for stream, group in groups.items()])


def _post_all(streams: Iterable[Stream], err: BaseException) -> None:
    _post_by_loop([(stream, err) for stream in streams])


def _post(loop: asyncio.AbstractEventLoop, items: list[tuple[Stream, Group | BaseException]]) -> None:
    """Put every item on its stream's queue, from the loop's own thread (one wake-up for all)."""
    with contextlib.suppress(RuntimeError):  # a closed loop: the server is gone, nobody is listening
        loop.call_soon_threadsafe(_put_all, items)


def _post_by_loop(items: list[tuple[Stream, Group | BaseException]]) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Stream, Group | BaseException]]] = {}
    for stream, item in items:
        by_loop.setdefault(stream.loop, []).append((stream, item))
    for loop, batch in by_loop.items():
        _post(loop, batch)


def _put_all(items: list[tuple[Stream, Group | BaseException]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


# ---------------------------------------------------------------------- work run through `call`


@torch.inference_mode()
def score_prompt(model: nn.Module, ids: list[int], top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """For t >= 1: log p(ids[t] | ids[:t]) and the `top` most likely tokens at t, from one forward pass.

    The same computation as `LM.token_logprobs` (float32 log-softmax of the full forward), so the
    values match it; this is what `echo` + `logprobs` reports for prompt tokens.
    """
    x = torch.tensor([ids], device=next(model.parameters()).device)  # (1, T)
    lp = raw_logprobs(model.eval()(x))[0, :-1]  # (T - 1, V)
    chosen = lp.gather(-1, x[0, 1:, None])[:, 0].tolist()  # (T - 1,)
    if top <= 0:
        return [(c, []) for c in chosen]
    values, indices = lp.topk(min(top, lp.shape[-1]), dim=-1)  # (T - 1, top)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, indices.tolist(), values.tolist())]
