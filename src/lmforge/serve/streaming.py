"""Generation between the scheduler and the HTTP answer: choices, token accounting, server-sent events.

A route turns its request into a `Generation` with `plan`, then `respond` submits it to the
scheduler and answers with a stream of server-sent events or one JSON body, shaped by a
`Renderer` (`renderers.py`).

Design choices:
- **Text lives here and in the renderers.** The scheduler and engine see token ids; each choice
  turns its tokens into text with `TextStream` (UTF-8 safe, stop strings held back until they
  cannot match). A choice that hits a stop string is cancelled in the scheduler at once.
- **Disconnects cancel work**: a streamed response is cancelled by Starlette when the client
  goes away and a non-streamed one watches `http.disconnect`; either way the sequences leave
  their slots before the next decode step.
- **One chunk per wake-up.** The scheduler puts a group of tokens on the request's queue after
  every step; the tokens waiting when this side wakes up are fed together, and each choice they
  touched is rendered once.
- `usage` counts the prompt once per prompt and every token generated until the choice finished
  (the end-of-turn token included).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from lmforge.api import TextStream
from lmforge.generate.engine import Request as EngineRequest
from lmforge.generate.engine import Token
from lmforge.serve.errors import (
    ApiError,
    bad_request,
    check_fits,
    check_token_ids,
    json_response,
    require_tokenizer,
    sampling,
    stop_strings,
)
from lmforge.serve.protocol import SamplingFields, Usage
from lmforge.serve.scheduler import QueueFull, Scheduler, Stream, score_prompt
from lmforge.serve.state import Loaded, ServerState

log = logging.getLogger(__name__)

LogprobEntry = tuple[int, float | None, list[tuple[int, float]] | None]  # token, its log-prob, the top ones


@dataclass(eq=False)
class Choice:
    """One choice being generated: its text so far, the tokens behind it, and what was streamed."""

    index: int
    text: TextStream
    output: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    tops: list[list[tuple[int, float]] | None] = field(default_factory=list)
    finish_reason: str | None = None
    sent_chars: int = 0  # characters of `output` already streamed
    sent_tokens: int = 0  # tokens whose log-probs were already streamed
    closed: bool = False  # the chunk with the finish reason went out
    offset: int = 0  # text offset of the next token (completions logprobs)

    def feed(self, token: Token) -> None:
        self.tokens.append(token.token)
        self.logprobs.append(token.logprob)
        self.tops.append(token.top_logprobs)
        self.output += self.text.push(token.token)
        if self.text.stopped:
            self.finish_reason = "stop"
        elif token.finish_reason is not None:
            self.output += self.text.flush()
            self.finish_reason = token.finish_reason

    def unsent(self) -> tuple[str, list[LogprobEntry], str | None]:
        """Text, token entries and finish reason not streamed yet; marks them streamed."""
        text = self.output[self.sent_chars:]
        entries = list(zip(self.tokens, self.logprobs, self.tops))[self.sent_tokens:]
        finish = None if self.closed else self.finish_reason
        self.sent_chars, self.sent_tokens, self.closed = len(self.output), len(self.tokens), self.finish_reason is not None
        return text, entries, finish


@dataclass
class Generation:
    """A validated generation request: one engine request per choice (choice i = prompt i // n)."""

    prompts: list[list[int]]
    requests: list[EngineRequest]
    choices: list[Choice]
    logprobs: int | None  # top log-probs per token; None = no log-probs
    stream: bool
    include_usage: bool
    started: float

    def usage(self) -> Usage:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.tokens) for c in self.choices)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class Renderer(Protocol):
    """Shapes a generation as one endpoint's response, streamed chunk by chunk or whole."""

    def opening(self) -> list[BaseModel]: ...
    def chunk(self, choice: Choice) -> BaseModel | None: ...
    def usage_chunk(self) -> BaseModel: ...
    def full(self) -> BaseModel: ...


@dataclass
class Echo:
    """A prompt repeated in front of its completion, with its tokens' log-probs when asked."""

    text: str
    entries: list[LogprobEntry]


# ----------------------------------------------------------------------------- planning


def plan(state: ServerState, loaded: Loaded, body: SamplingFields, prompts: list[list[int]], *,
         max_new_tokens: int, logprobs: int | None, prompt_param: str, started: float) -> Generation:
    """Check a request against the server's caps and turn it into engine requests."""
    settings, tok = state.settings, require_tokenizer(loaded)
    if loaded.lm.config.kind != "decoder":
        raise bad_request("this model is an encoder (BERT-style); it serves /v1/embeddings, not generation")
    if body.n > settings.max_n:
        raise bad_request(f"n is {body.n} but this server allows at most {settings.max_n} (--max-n)", "n")
    sequences = len(prompts) * body.n
    if sequences > loaded.scheduler.capacity:
        raise bad_request(f"this request needs {sequences} sequences (prompts x n) but the server holds at most "
                          f"{loaded.scheduler.capacity} at once; send fewer prompts or a smaller n", prompt_param)
    stop = stop_strings(body.stop, settings)
    if logprobs is not None:
        logprobs = min(logprobs, loaded.lm.config.vocab_size)
    for ids in prompts:
        check_token_ids(ids, loaded.lm.config.vocab_size, prompt_param)
        check_fits(ids, loaded.max_len, max_new_tokens, prompt_param)
    requests = [loaded.lm.request(ids, max_new_tokens, sampling(body, j, loaded.lm.config.vocab_size),
                                  logprobs=logprobs)
                for ids in prompts for j in range(body.n)] if max_new_tokens > 0 else []
    choices = [Choice(i, TextStream(tok, stop)) for i in range(sequences)]
    for choice in choices if max_new_tokens == 0 else []:
        choice.finish_reason = "length"
    include_usage = body.stream and body.stream_options is not None and body.stream_options.include_usage
    return Generation(prompts, requests, choices, logprobs, body.stream, include_usage, started)


async def prompt_echoes(loaded: Loaded, prompts: list[list[int]], texts: list[str | None],
                        logprobs: int | None) -> list[Echo]:
    """The prompts as `echo` repeats them, scored by the scheduler's thread when log-probs are asked."""
    tok, echoes = require_tokenizer(loaded), []
    for ids, text in zip(prompts, texts):
        entries: list[LogprobEntry] = []
        if logprobs is not None:
            scored = await loaded.scheduler.call(partial(score_prompt, loaded.lm.model, ids, logprobs))
            entries = [(ids[0], None, None)] + [(t, lp, top) for t, (lp, top) in zip(ids[1:], scored)]
        echoes.append(Echo(text if text is not None else tok.decode(ids, skip_special_tokens=True), entries))
    return echoes


# ----------------------------------------------------------------------------- answering


async def respond(request: Request, state: ServerState, loaded: Loaded, gen: Generation,
                  renderer: Renderer) -> Response:
    """Submit the generation and answer with a stream of server-sent events or one JSON body."""
    stream = _submit(loaded.scheduler, gen)
    if gen.stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        events = _events(state, loaded, gen, stream, renderer)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    try:
        finished = await _collect(request, loaded, gen, stream)
    finally:
        state.metrics.e2e.observe(time.perf_counter() - gen.started)
    if not finished:
        return Response(status_code=499)  # the client closed the connection; nobody reads this
    return json_response(renderer.full())


def _submit(scheduler: Scheduler, gen: Generation) -> Stream | None:
    if not gen.requests:
        return None
    try:
        return scheduler.submit(gen.requests)
    except QueueFull as err:
        raise ApiError(429, str(err), type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(err.retry_after)}) from None


async def _token_groups(loaded: Loaded, gen: Generation, stream: Stream | None) -> AsyncIterator[list[Choice]]:
    """Feed the scheduler's tokens into the choices until all finish; yield the choices each wake-up touched."""
    while stream is not None and any(c.finish_reason is None for c in gen.choices):
        items = [await stream.queue.get()]
        while not stream.queue.empty():
            items.append(stream.queue.get_nowait())
        touched: dict[int, Choice] = {}
        for item in items:
            if isinstance(item, BaseException):
                raise ApiError(500, str(item), type="server_error")
            for index, token in item:
                choice = gen.choices[index]
                if choice.finish_reason is not None:  # tokens decoded before a stop-string cancel landed
                    continue
                choice.feed(token)
                touched[index] = choice
                if choice.text.stopped:
                    loaded.scheduler.cancel(stream, index)
        yield list(touched.values())


def _release(loaded: Loaded, gen: Generation, stream: Stream | None) -> None:
    if stream is not None and any(c.finish_reason is None for c in gen.choices):
        loaded.scheduler.cancel(stream)


async def _collect(request: Request, loaded: Loaded, gen: Generation, stream: Stream | None) -> bool:
    """Generate to the end; False when the client disconnected first (its sequences are then cancelled)."""

    async def consume() -> None:
        async for _ in _token_groups(loaded, gen, stream):
            pass

    work = asyncio.ensure_future(consume())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            work.result()
            return True
        return False
    finally:
        work.cancel()
        gone.cancel()
        _release(loaded, gen, stream)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(chunk: BaseModel, include_usage: bool = True) -> str:
    return f"data: {chunk.model_dump_json(exclude=None if include_usage else {'usage'})}\n\n"


async def _events(state: ServerState, loaded: Loaded, gen: Generation, stream: Stream | None,
                  renderer: Renderer) -> AsyncIterator[str]:
    """The server-sent events of a streamed response; Starlette cancels this when the client leaves."""
    try:
        for chunk in renderer.opening():
            yield _sse(chunk, gen.include_usage)
        async for touched in _token_groups(loaded, gen, stream):
            for choice in touched:
                chunk = renderer.chunk(choice)
                if chunk is not None:
                    yield _sse(chunk, gen.include_usage)
        for choice in gen.choices:  # choices that finished without a token (max_tokens=0)
            chunk = renderer.chunk(choice)
            if chunk is not None:
                yield _sse(chunk, gen.include_usage)
        if gen.include_usage:
            yield _sse(renderer.usage_chunk())
    except ApiError as err:
        yield f"data: {err.body().model_dump_json()}\n\n"
    except Exception as err:
        log.exception("streamed response failed", exc_info=err)
        yield f"data: {ApiError(500, 'internal server error', type='server_error').body().model_dump_json()}\n\n"
    finally:
        _release(loaded, gen, stream)
        state.metrics.e2e.observe(time.perf_counter() - gen.started)
    yield "data: [DONE]\n\n"
