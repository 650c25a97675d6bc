"""Results as OpenAI response objects: chat completions, text completions, log-probs, usage, vectors.

Each renderer implements `streaming.Renderer` for one endpoint: the chunks that open a stream,
one chunk per choice that moved, the closing usage chunk, and the whole body when not streamed.

Design choices:
- **Token text is the token decoded alone**, special tokens included, so every log-prob entry
  names the token it scores; the answer's text comes from the choice's `TextStream` instead.
- Completions follow vLLM where OpenAI is silent: `echo` with `logprobs` scores the prompt (its
  first token has no log-prob, null), `top_logprobs` entries hold the k most likely tokens and
  the chosen one, and text offsets count the text each token adds to the answer.
- Embeddings go out as JSON floats or, with `encoding_format="base64"`, as the little-endian
  float32 bytes the openai client decodes.
"""

from __future__ import annotations

import base64
import uuid

from pydantic import BaseModel
from torch import Tensor

from lmforge.serve.errors import require_tokenizer
from lmforge.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    Delta,
    TokenLogprob,
    TopLogprob,
    Usage,
    now,
)
from lmforge.serve.state import Loaded, ServerState
from lmforge.serve.streaming import Choice, Echo, Generation, LogprobEntry
from lmforge.tokenizer import Tokenizer


class ChatRenderer:
    """`chat.completion` and `chat.completion.chunk` bodies."""

    def __init__(self, state: ServerState, loaded: Loaded, gen: Generation) -> None:
        self.gen, self.tok, self.model = gen, require_tokenizer(loaded), state.settings.model_name
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", now()

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def opening(self) -> list[BaseModel]:
        return [self._chunk([ChatChunkChoice(index=c.index, delta=Delta(role="assistant", content=""))])
                for c in self.gen.choices]

    def chunk(self, choice: Choice) -> BaseModel | None:
        text, entries, finish = choice.unsent()
        logprobs = self._logprobs(entries) if self.gen.logprobs is not None and entries else None
        if not text and logprobs is None and finish is None:
            return None
        delta = Delta(content=text) if text else Delta()
        return self._chunk([ChatChunkChoice(index=choice.index, delta=delta, logprobs=logprobs, finish_reason=finish)])

    def usage_chunk(self) -> BaseModel:
        return self._chunk([], self.gen.usage())

    def full(self) -> BaseModel:
        choices = [
            ChatChoice(index=c.index, message=AssistantMessage(content=c.output), finish_reason=c.finish_reason,
                       logprobs=self._logprobs(list(zip(c.tokens, c.logprobs, c.tops)))
                       if self.gen.logprobs is not None else None)
            for c in self.gen.choices
        ]
        return ChatCompletion(id=self.id, created=self.created, model=self.model, choices=choices,
                              usage=self.gen.usage())

    def _logprobs(self, entries: list[LogprobEntry]) -> ChatLogprobs:
        content = []
        for token, logprob, tops in entries:
            text = _token_text(self.tok, token)
            top = [TopLogprob(token=t, logprob=v, bytes=list(t.encode()))
                   for t, v in ((_token_text(self.tok, i), v) for i, v in tops or [])]
            content.append(TokenLogprob(token=text, logprob=logprob if logprob is not None else 0.0,
                                        bytes=list(text.encode()), top_logprobs=top))
        return ChatLogprobs(content=content)


class CompletionRenderer:
    """`text_completion` bodies, streamed or whole, with the legacy log-probs shape."""

    def __init__(self, state: ServerState, loaded: Loaded, gen: Generation, n: int, echoes: list[Echo] | None) -> None:
        self.gen, self.n, self.echoes = gen, n, echoes
        self.tok, self.model = require_tokenizer(loaded), state.settings.model_name
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", now()

    def _echo(self, choice: Choice) -> Echo | None:
        return self.echoes[choice.index // self.n] if self.echoes is not None else None

    def _completion(self, choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def opening(self) -> list[BaseModel]:
        chunks: list[BaseModel] = []
        for choice in self.gen.choices:
            echo = self._echo(choice)
            if echo is None:
                continue
            logprobs = self._logprobs(echo.entries, 0)[0] if self.gen.logprobs is not None else None
            choice.offset = len(echo.text)
            chunks.append(self._completion([CompletionChoice(index=choice.index, text=echo.text, logprobs=logprobs)]))
        return chunks

    def chunk(self, choice: Choice) -> BaseModel | None:
        text, entries, finish = choice.unsent()
        if not text and not (entries and self.gen.logprobs is not None) and finish is None:
            return None
        logprobs = None
        if self.gen.logprobs is not None:
            logprobs, choice.offset = self._logprobs(entries, choice.offset)
        return self._completion([CompletionChoice(index=choice.index, text=text, logprobs=logprobs,
                                                  finish_reason=finish)])

    def usage_chunk(self) -> BaseModel:
        return self._completion([], self.gen.usage())

    def full(self) -> BaseModel:
        choices = []
        for c in self.gen.choices:
            echo = self._echo(c)
            prefix = echo.text if echo is not None else ""
            logprobs = None
            if self.gen.logprobs is not None:
                generated, _ = self._logprobs(list(zip(c.tokens, c.logprobs, c.tops)), len(prefix))
                logprobs = _join_logprobs(self._logprobs(echo.entries, 0)[0], generated) if echo else generated
            choices.append(CompletionChoice(index=c.index, text=prefix + c.output, logprobs=logprobs,
                                            finish_reason=c.finish_reason))
        return self._completion(choices, self.gen.usage())

    def _logprobs(self, entries: list[LogprobEntry], offset: int) -> tuple[CompletionLogprobs, int]:
        """The legacy shape for `entries`, the first at text offset `offset`; also the offset after them.
        Offsets count the text each token adds to the answer: special tokens add none."""
        out = CompletionLogprobs()
        for token, logprob, tops in entries:
            text = _token_text(self.tok, token)
            out.tokens.append(text)
            out.token_logprobs.append(logprob)
            out.text_offset.append(offset)
            if logprob is None:
                out.top_logprobs.append(None)
            else:
                top: dict[str, float] = {}
                for i, v in [*(tops or []), (token, logprob)]:  # most likely first: keep its value when texts collide
                    top.setdefault(_token_text(self.tok, i), v)
                out.top_logprobs.append(top)
            offset += len(self.tok.decode([token], skip_special_tokens=True))
        return out, offset


def _join_logprobs(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=first.tokens + second.tokens,
                              token_logprobs=first.token_logprobs + second.token_logprobs,
                              top_logprobs=first.top_logprobs + second.top_logprobs,
                              text_offset=first.text_offset + second.text_offset)


def _token_text(tok: Tokenizer, token: int) -> str:
    return tok.decode([token])


def encode_vector(row: Tensor, encoding: str) -> list[float] | str:
    """One embedding as `encoding_format` asks: a list of floats, or base64 of float32 bytes."""
    if encoding == "base64":  # little-endian float32, what the openai client decodes
        return base64.b64encode(row.numpy().astype("<f4").tobytes()).decode("ascii")
    return row.tolist()
