"""The OpenAI-compatible HTTP server: FastAPI routes over one scheduler, plus the chat page.

Routes: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (both stream as
server-sent events), `POST /v1/embeddings`, `POST /tokenize`, `POST /detokenize`, `GET /health`,
`GET /metrics`, `GET /tokenizer_info` (vLLM's, for lm-eval's remote tokenizer), and the chat page
at `/`. A route reads its request (`errors.py`), plans the generation and streams it
(`streaming.py`), and shapes the answer (`renderers.py`).

Design choices:
- **Prompts become tokens here**: the routes render chat templates and tokenize prompts; the
  scheduler and engine see token ids only.
- **Every route but the page and /health needs the key** when the server has one
  (`Authorization: Bearer KEY`, compared in constant time).
- **The model loads after the server listens**: a background thread loads it while `/health`
  answers 503, then starts the scheduler; a failed load stops the server with the reason.
- **Defaults follow OpenAI**: `max_tokens` 16 for completions and the rest of the context (up to
  the server cap) for chat.
- **One core is left to the event loop**: `run_server` gives torch one thread fewer than the
  machine has cores (unless OMP_NUM_THREADS or `threads` says otherwise). With torch spinning on
  every core the loop that streams tokens starves; `benchmarks/serve_load.py` shows the cost.
- Completions follow vLLM where OpenAI is silent: string prompts get the tokenizer's special
  tokens (BOS) and `max_tokens=0` only scores (with `echo` and `logprobs`).
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from lmforge.api import LM, load
from lmforge.errors import LmforgeError
from lmforge.generate.engine import Engine
from lmforge.generate.engine import Request as EngineRequest
from lmforge.serve.errors import (
    ApiError,
    add_error_handlers,
    bad_request,
    check_token_ids,
    json_response,
    max_new_tokens,
    read_request,
    require_ready,
    require_tokenizer,
)
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
)
from lmforge.serve.renderers import ChatRenderer, CompletionRenderer, encode_vector
from lmforge.serve.scheduler import Scheduler
from lmforge.serve.state import Loaded, ServerState, Settings, server_state
from lmforge.serve.streaming import plan, prompt_echoes, respond
from lmforge.serve.support import assistant_of, list_handovers, open_support, support_chat
from lmforge.support import Assistant
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the app


def create_app(lm: LM | Callable[[], LM], settings: Settings | None = None, *,
               on_ready: Callable[[LM, int], None] | None = None,
               on_load_error: Callable[[str], None] | None = None, support: Assistant | None = None) -> FastAPI:
    """The FastAPI app serving `lm`, or the model `lm()` loads in a background thread once the
    server listens. `on_ready(lm, context_length)` and `on_load_error(message)` report the outcome.
    With `support`, chat completions go through the support assistant (`serve/support.py`)."""
    settings = settings or Settings()
    page = resources.files("lmforge.serve").joinpath("static/index.html").read_bytes()
    state = ServerState(settings, ServerMetrics(), page)
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=partial(_lifespan, state, lm, on_ready, on_load_error))
    app.state.lmforge = state
    app.state.support = support
    add_error_handlers(app)
    open_routes = [("/", chat_page, "GET"), ("/health", health, "GET")]
    keyed_routes = [
        ("/metrics", metrics, "GET"),
        ("/v1/models", list_models, "GET"),
        ("/v1/chat/completions", chat_completions, "POST"),
        ("/v1/completions", completions, "POST"),
        ("/v1/embeddings", embeddings, "POST"),
        ("/tokenize", tokenize, "POST"),
        ("/detokenize", detokenize, "POST"),
        ("/tokenizer_info", tokenizer_info, "GET"),
    ] + ([("/v1/support/handovers", list_handovers, "GET")] if support is not None else [])
    for path, endpoint, method in open_routes:
        app.add_api_route(path, endpoint, methods=[method], include_in_schema=False)
    for path, endpoint, method in keyed_routes:
        app.add_api_route(path, endpoint, methods=[method], dependencies=[Depends(_authorize)])
    return app


@asynccontextmanager
async def _lifespan(state: ServerState, source: LM | Callable[[], LM], on_ready: Callable[[LM, int], None] | None,
                    on_load_error: Callable[[str], None] | None, app: FastAPI) -> AsyncIterator[None]:
    if isinstance(source, LM):
        _install(state, source, on_ready)
    else:
        threading.Thread(target=_load_in_background, args=(state, source, on_ready, on_load_error),
                         name="lmforge-load", daemon=True).start()
    try:
        yield
    finally:
        state.closing = True
        if state.loaded is not None:
            state.loaded.scheduler.stop()


def _load_in_background(state: ServerState, loader: Callable[[], LM], on_ready: Callable[[LM, int], None] | None,
                        on_load_error: Callable[[str], None] | None) -> None:
    try:
        lm = loader()
        if not state.closing:
            _install(state, lm, on_ready)
    except Exception as err:  # reported through /health and on_load_error, never raised into a thread
        state.load_error = str(err) if isinstance(err, LmforgeError) else f"{type(err).__name__}: {err}"
        log.error("could not load the model: %s", state.load_error, exc_info=not isinstance(err, LmforgeError))
        if on_load_error is not None:
            on_load_error(state.load_error)


def _install(state: ServerState, lm: LM, on_ready: Callable[[LM, int], None] | None) -> None:
    """Build the engine (decoders only), warm it up, start the scheduler, and mark the server ready."""
    engine = None
    max_len = lm.config.max_seq_len
    if lm.config.kind == "decoder":
        engine = Engine(lm.model, n_slots=state.settings.n_slots)
        engine.generate([EngineRequest([0], max_new_tokens=2)])  # first-call costs paid before any client
        max_len = engine.max_len
    scheduler = Scheduler(engine, state.metrics, max_queue=state.settings.max_queue,
                          stats_every=state.settings.stats_every)
    scheduler.start()
    state.metrics.watch(lambda: scheduler.running, lambda: scheduler.waiting, lambda: scheduler.n_slots)
    state.loaded = Loaded(lm, scheduler, max_len)
    if on_ready is not None:
        on_ready(lm, max_len)


# ----------------------------------------------------------------------------- keys and simple routes


def _authorize(request: Request) -> None:
    """Require `Authorization: Bearer KEY` when the server has a key (constant-time comparison)."""
    key = server_state(request).settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key; send 'Authorization: Bearer KEY'", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


async def chat_page(request: Request) -> Response:
    headers = {
        "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                   "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                                   "frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }
    return Response(server_state(request).page, media_type="text/html; charset=utf-8", headers=headers)


async def health(request: Request) -> Response:
    require_ready(request)
    return Response('{"status":"ok"}', media_type="application/json")


async def metrics(request: Request) -> Response:
    return Response(server_state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def list_models(request: Request) -> Response:
    state, loaded = require_ready(request)
    card = ModelCard(id=state.settings.model_name, created=loaded.created, max_model_len=loaded.max_len,
                     quantization=loaded.lm.quantization)
    return json_response(ModelList(data=[card]))


async def tokenize(request: Request) -> Response:
    _, loaded, body = await read_request(request, TokenizeRequest)
    tok = require_tokenizer(loaded)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give either 'prompt' (text) or 'messages' (a conversation), not both or neither")
    if body.messages is not None:
        ids = _chat_prompt(tok, body.messages, body.add_generation_prompt)
    else:
        ids = tok.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
    return json_response(TokenizeResponse(tokens=ids, count=len(ids), max_model_len=loaded.max_len))


async def detokenize(request: Request) -> Response:
    _, loaded, body = await read_request(request, DetokenizeRequest)
    check_token_ids(body.tokens, loaded.lm.config.vocab_size, "tokens")
    return json_response(DetokenizeResponse(prompt=require_tokenizer(loaded).decode(body.tokens)))


async def tokenizer_info(request: Request) -> Response:
    """The tokenizer's special tokens, chat template and the context: with it and /tokenize, lm-eval's
    local-completions model (tokenizer_backend auto or remote) needs no copy of the tokenizer."""
    _, loaded = require_ready(request)
    tok = require_tokenizer(loaded)
    names = {k: v for k, v in tok.special_tokens.items() if k in TokenizerInfoResponse.model_fields}
    return json_response(TokenizerInfoResponse(**names, chat_template=tok.chat_template, model_max_length=loaded.max_len))


async def embeddings(request: Request) -> Response:
    """Mean-pooled, L2-normalised final hidden states (`LM.embed`), for encoders and decoders alike."""
    state, loaded, body = await read_request(request, EmbeddingRequest)
    settings = state.settings
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts:
        raise bad_request("input is empty; give a text or a list of texts", "input")
    if not all(isinstance(t, str) for t in texts):
        raise bad_request("token-id inputs are not supported for embeddings; send the text", "input")
    if len(texts) > settings.max_embedding_inputs:
        raise bad_request(f"input has {len(texts)} texts; at most {settings.max_embedding_inputs} per request", "input")
    dim = loaded.lm.config.dim
    if body.dimensions is not None and body.dimensions != dim:
        raise bad_request(f"dimensions={body.dimensions} is not supported; this model's embeddings have {dim}",
                          "dimensions")
    tok, limit = require_tokenizer(loaded), loaded.lm.config.max_seq_len
    counts = [max(len(tok.encode(t, add_special_tokens=True)), 1) for t in texts]  # type: ignore[arg-type]
    too_long = next((i for i, c in enumerate(counts) if c > limit), None)
    if too_long is not None:
        raise bad_request(f"input {too_long} has {counts[too_long]} tokens but the context window holds {limit}",
                          "input")
    data: list[Embedding] = []
    for start in range(0, len(texts), settings.embedding_batch):
        batch = texts[start:start + settings.embedding_batch]
        vectors = await loaded.scheduler.call(partial(loaded.lm.embed, batch))  # (batch, dim)
        for row in vectors.float().cpu():
            data.append(Embedding(index=len(data), embedding=encode_vector(row, body.encoding_format)))
    usage = EmbeddingUsage(prompt_tokens=sum(counts), total_tokens=sum(counts))
    return json_response(EmbeddingList(data=data, model=settings.model_name, usage=usage))


# ----------------------------------------------------------------------------- chat completions


async def chat_completions(request: Request) -> Response:
    if assistant_of(request) is not None:
        return await support_chat(request, assistant_of(request))  # type: ignore[arg-type]
    started = time.perf_counter()
    state, loaded, body = await read_request(request, ChatCompletionRequest)
    if body.tools:
        raise bad_request("tools (function calling) are not supported by this server", "tools")
    if body.response_format is not None and body.response_format.get("type", "text") != "text":
        raise bad_request("only response_format {'type': 'text'} is supported", "response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
    ids = _chat_prompt(require_tokenizer(loaded), body.messages, add_generation_prompt=True)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_new = max_new_tokens(requested, max(loaded.max_len - len(ids), 1), state.settings, param)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    gen = plan(state, loaded, body, [ids], max_new_tokens=max_new, logprobs=logprobs, prompt_param="messages",
               started=started)
    return await respond(request, state, loaded, gen, ChatRenderer(state, loaded, gen))


def _chat_prompt(tok: Tokenizer, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
    plain = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "\n".join(part.text for part in m.content or [])
        message = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.name is not None:
            message["name"] = m.name
        plain.append(message)
    try:
        return tok.apply_chat_template(plain, add_generation_prompt=add_generation_prompt)
    except LmforgeError as err:
        raise bad_request(str(err), "messages") from None


# ----------------------------------------------------------------------------- text completions


async def completions(request: Request) -> Response:
    started = time.perf_counter()
    state, loaded, body = await read_request(request, CompletionRequest)
    if body.suffix:
        raise bad_request("suffix (insertion) is not supported by this server", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of is not supported (only best_of = n)", "best_of")
    tok = require_tokenizer(loaded)
    prompts, texts = _completion_prompts(tok, body.prompt)
    max_new = max_new_tokens(body.max_tokens, 16, state.settings, "max_tokens")
    gen = plan(state, loaded, body, prompts, max_new_tokens=max_new, logprobs=body.logprobs, prompt_param="prompt",
               started=started)
    echoes = await prompt_echoes(loaded, prompts, texts, body.logprobs) if body.echo else None
    return await respond(request, state, loaded, gen, CompletionRenderer(state, loaded, gen, body.n, echoes))


def _completion_prompts(tok: Tokenizer, prompt: str | list[Any]) -> tuple[list[list[int]], list[str | None]]:
    """Token ids of each prompt, and its text when it came as text (for `echo`)."""
    if isinstance(prompt, str):
        return [tok.encode(prompt, add_special_tokens=True)], [prompt]
    if not prompt:
        raise bad_request("prompt is an empty list; give a text, texts, token ids or lists of token ids", "prompt")
    if isinstance(prompt[0], str):
        return [tok.encode(p, add_special_tokens=True) for p in prompt], list(prompt)
    if isinstance(prompt[0], int):
        return [list(prompt)], [None]
    return [list(p) for p in prompt], [None] * len(prompt)


# ----------------------------------------------------------------------------- running the server


def run_server(model_path: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               n_slots: int = 16, max_queue: int = 64, max_tokens: int = 2048, max_n: int = 8,
               max_body_bytes: int = 1 << 20, model_name: str | None = None, stats_every: float = 10.0,
               access_log: bool = False, threads: int | None = None, support: str | Path | None = None) -> None:
    """Serve the model in `model_path` until interrupted (the `lmforge serve` command).

    The socket is bound first (so a busy port fails at once, and `port=0` picks a free one), the
    server starts listening, and the model loads in the background while /health answers 503.
    `threads` sets torch's intra-op threads; by default (unless OMP_NUM_THREADS is set) one core is
    left to the HTTP event loop: when torch's threads spin on every core, the loop that streams the
    tokens waits for them (`benchmarks/serve_load.py` measures the throughput).
    `support`: a support.yaml; its index, embedder and classifier load before the server listens, and
    the served model is the assistant's chat model.
    """
    folder = Path(model_path)
    if not folder.exists():
        raise LmforgeError(f"model {folder} does not exist; pass a run folder, a Hugging Face folder or a GGUF file")
    settings = Settings(model_name=model_name or folder.resolve().name, api_key=api_key or None, n_slots=n_slots,
                        max_queue=max_queue, max_tokens=max_tokens, max_n=max_n, max_body_bytes=max_body_bytes,
                        stats_every=stats_every)
    _configure_logging()
    _set_threads(threads)
    sock = _bind(host, port)
    url = _url(host, sock.getsockname()[1])
    failures: list[str] = []
    server: uvicorn.Server | None = None

    def ready(lm: LM, context: int) -> None:
        log.info("ready: %s serves %s (%s, context %d tokens, %d slots, queue %d); API key %s",
                 url, settings.model_name, lm.config.kind, context, settings.n_slots, settings.max_queue,
                 "required" if settings.api_key else "not required")

    def failed(message: str) -> None:
        failures.append(message)
        if server is not None:
            server.should_exit = True

    assistant = open_support(support) if support else None
    app = create_app(partial(load, folder), settings, on_ready=ready, on_load_error=failed, support=assistant)
    config = uvicorn.Config(app, log_level="info", access_log=access_log, timeout_graceful_shutdown=5,
                            server_header=False, lifespan="on")
    server = uvicorn.Server(config)
    log.info("listening on %s (chat page at %s/); loading %s as %r; API key %s", url, url, folder,
             settings.model_name, "required" if settings.api_key else "not required")
    server.run(sockets=[sock])
    if failures:
        raise LmforgeError(f"could not load the model from {folder}: {failures[0]}")


def _configure_logging() -> None:
    """INFO lines from the server (startup, stats) even when the command logs only warnings."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logger = logging.getLogger("lmforge.serve")
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)


def _set_threads(threads: int | None) -> None:
    if threads is None and "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads if threads is not None else max(cores - 1, 1))


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        raise LmforgeError(f"cannot listen on {host}:{port} ({err.strerror or err}); "
                           "choose another --port or --host") from None
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
