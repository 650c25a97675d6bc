"""Reading requests and refusing bad ones: body parsing, parameter checks, OpenAI-style errors.

Design choices:
- **The body is read and parsed by hand**, not by FastAPI: the size cap is enforced on
  Content-Length and again while reading, and pydantic's JSON parser tells malformed JSON (400
  `invalid_json`) from a schema violation (400 naming the field). Every error, including 404 for
  an unknown route and the catch-all for bugs, has OpenAI's shape
  `{"error": {"message", "type", "param", "code"}}`; a traceback never reaches a client.
- **Statuses**: 400 bad input (OpenAI and vLLM answer schema violations with 400, so this server
  never uses 422), 401 missing or wrong key, 404 unknown model (OpenAI's `model_not_found`) or
  route, 413 body too large, 429 queue full (with Retry-After), 503 while the model loads.
- **Ranges in `protocol.py`, caps here.** The field constraints of the request models hold
  OpenAI's documented ranges; the checks below (and `streaming.plan`, which calls them) hold
  what depends on the server: the operator's `Settings`, the vocabulary and the context window.
- **Defaults follow OpenAI**: temperature 1. With `seed` and `n > 1`, choice j uses `seed + j`,
  so the choices differ and the whole answer is reproducible.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.generate.sampling import InvalidSamplingParams, SamplingParams
from lmforge.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ErrorDetail,
    ErrorResponse,
    SamplingFields,
    TokenizeRequest,
)
from lmforge.serve.state import Loaded, ServerState, Settings, server_state
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

B = TypeVar("B", ChatCompletionRequest, CompletionRequest, EmbeddingRequest, TokenizeRequest, DetokenizeRequest)
MAX_LOGIT_BIAS = 300  # entries per request, as OpenAI; each costs a little on every decode step


# ----------------------------------------------------------------------------- errors and their answers


class ApiError(Exception):
    """An error answered in OpenAI's shape with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def json_response(body: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body.model_dump_json(), status_code=status, headers=headers, media_type="application/json")


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error in OpenAI's shape: ours, Starlette's (404, 405), FastAPI's, and bugs."""
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_bug)


def _error_response(err: ApiError) -> Response:
    return json_response(err.body(), err.status, err.headers)


async def _on_api_error(request: Request, err: Exception) -> Response:
    assert isinstance(err, ApiError)
    return _error_response(err)


async def _on_http_error(request: Request, err: Exception) -> Response:
    assert isinstance(err, StarletteHTTPException)
    kind = "not_found" if err.status_code == 404 else "invalid_request_error"
    message = f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail)
    return _error_response(ApiError(err.status_code, message, type=kind, headers=dict(err.headers or {})))


async def _on_validation_error(request: Request, err: Exception) -> Response:
    return _error_response(bad_request(f"invalid request: {err}"))


async def _on_bug(request: Request, err: Exception) -> Response:
    # Starlette re-raises the error after this answer, so the server log gets its traceback once
    log.error("unexpected error on %s %s: %r", request.method, request.url.path, err)
    return _error_response(ApiError(500, "internal server error (logged on the server)", type="server_error"))


# ----------------------------------------------------------------------------- reading a request


def require_ready(request: Request) -> tuple[ServerState, Loaded]:
    """The server's state and its model, or 503 while the model loads (or after it failed to)."""
    state = server_state(request)
    if state.loaded is None:
        message = f"the model failed to load: {state.load_error}" if state.load_error else "the model is still loading"
        raise ApiError(503, message, type="service_unavailable", code="model_not_ready", headers={"Retry-After": "1"})
    return state, state.loaded


def require_tokenizer(loaded: Loaded) -> Tokenizer:
    if loaded.lm.tokenizer is None:
        raise bad_request("this model folder has no tokenizer.json, so the server cannot read or write text")
    return loaded.lm.tokenizer


async def read_request(request: Request, model: type[B]) -> tuple[ServerState, Loaded, B]:
    """The ready server, and the body parsed as `model`, which must name the served model if any."""
    state, loaded = require_ready(request)
    body = await _parse(request, model, state.settings)
    _check_model(body.model, state.settings)
    return state, loaded, body


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise bad_request(f"Content-Length must be a number of bytes, got {declared!r:.40}")
        if int(declared) > limit:
            raise _too_large(limit, f"{int(declared)} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():  # also counted: a body sent without Content-Length (chunked)
        size += len(chunk)
        if size > limit:
            raise _too_large(limit, f"more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int, size: str) -> ApiError:
    return ApiError(413, f"the request body has {size}; this server accepts at most {limit} (--max-body-bytes)",
                    code="request_too_large")


async def _parse(request: Request, model: type[B], settings: Settings) -> B:
    raw = await _read_body(request, settings.max_body_bytes)
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        raise _validation_problem(err) from None


def _validation_problem(err: ValidationError) -> ApiError:
    problems = err.errors(include_url=False, include_input=False)
    first = problems[0]
    if first["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first['msg']}", code="invalid_json")
    where = ".".join(str(part) for part in first["loc"])
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    message = f"invalid request: {where + ': ' if where else ''}{first['msg']}{more}"
    return bad_request(message, param=str(first["loc"][0]) if first["loc"] else None)


def _check_model(name: str | None, settings: Settings) -> None:
    if name is not None and name != settings.model_name:
        raise ApiError(404, f"the model {name!r:.100} does not exist; this server serves {settings.model_name!r}",
                       param="model", code="model_not_found")


# ----------------------------------------------------------------------------- checking parameters


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    bad = next((i for i in ids if i >= vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary (ids 0..{vocab_size - 1})", param)


def check_fits(ids: list[int], max_len: int, max_new_tokens: int, param: str) -> None:
    if not ids:
        raise bad_request("the prompt is empty; give at least one token", param)
    limit = max_len if max_new_tokens == 0 else max_len - 1  # room for one generated token
    if len(ids) > limit:
        raise bad_request(f"the prompt has {len(ids)} tokens but the context window holds {max_len} "
                          f"(at most {limit} prompt tokens here); shorten the prompt", param,
                          code="context_length_exceeded")


def max_new_tokens(requested: int | None, default: int, settings: Settings, param: str) -> int:
    if requested is None:
        return max(min(default, settings.max_tokens), 0)
    if requested > settings.max_tokens:
        raise bad_request(f"{param} is {requested} but this server allows at most {settings.max_tokens} "
                          "(--max-tokens)", param)
    return requested


def stop_strings(stop: str | list[str] | None, settings: Settings) -> list[str]:
    items = [stop] if isinstance(stop, str) else list(stop or [])
    if len(items) > settings.max_stop:
        raise bad_request(f"stop has {len(items)} strings; at most {settings.max_stop}", "stop")
    if any(len(s) > settings.max_stop_chars for s in items):
        raise bad_request(f"stop strings may have at most {settings.max_stop_chars} characters", "stop")
    return [s for s in items if s]


def sampling(body: SamplingFields, offset: int, vocab_size: int) -> SamplingParams:
    """Sampling for choice `offset` of the request (seeded `seed + offset` when a seed is given)."""
    try:
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=min(max(body.top_k or 0, 0), vocab_size),  # k >= the vocabulary keeps every token
            top_p=1.0 if body.top_p is None else body.top_p,
            min_p=body.min_p or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=_logit_bias(body.logit_bias, vocab_size),
            seed=None if body.seed is None else body.seed + offset,
        )
    except InvalidSamplingParams as err:
        raise bad_request(str(err), str(err).split(" ", 1)[0]) from None


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not bias:
        return None
    if len(bias) > MAX_LOGIT_BIAS:
        raise bad_request(f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS}", "logit_bias")
    if not all(key.isascii() and key.isdigit() and int(key) < vocab_size for key in bias):
        raise bad_request(f"logit_bias keys must be token ids between 0 and {vocab_size - 1}", "logit_bias")
    return {int(key): value for key, value in bias.items()}
