"""The support assistant behind the server (`lmforge serve MODEL --support support.yaml`).

With a support config, `POST /v1/chat/completions` answers through the assistant: it retrieves,
answers with the served model grounded in numbered sources, or hands the conversation over. The
response keeps the OpenAI shape (clients that know nothing of support read the text as usual) and
adds one field, `support`:

    "support": {"sources": [{"n", "doc_id", "chunk", "score", "similarity", "url", "cited"}, ...],
                "escalation": null | {"reason", "detail", "handover_id"}}

In a stream the text comes in one chunk and `support` rides on the chunk that carries the finish
reason. `GET /v1/support/handovers?after=ID&limit=N` lists the queue (API key protected like every
`/v1` route). The answer runs on the scheduler thread, between decode steps, as embeddings do.
Sampling comes from the config's `answer` section (grounded answers are greedy by default); a
request's temperature and max_tokens are not applied to them.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from lmforge.serve.errors import bad_request, read_request, require_ready, require_tokenizer
from lmforge.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Delta,
    Usage,
    now,
)
from lmforge.support import Assistant, HandoverQueue, open_assistant, read_support_config
from lmforge.support.handovers import handover_json


def assistant_of(request: Request) -> Assistant | None:
    return getattr(request.app.state, "support", None)


async def support_chat(request: Request, assistant: Assistant) -> Response:
    """A chat completion answered by the assistant, with the `support` field."""
    state, loaded, body = await read_request(request, ChatCompletionRequest)
    if body.tools:
        raise bad_request("tools (function calling) are not supported by this server", "tools")
    messages = [{"role": "system" if m.role == "developer" else m.role,
                 "content": m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content or [])}
                for m in body.messages]
    if not any(m["role"] == "user" for m in messages):
        raise bad_request("the conversation has no user message to answer", "messages")
    chat = loaded.lm if loaded.lm.config.kind == "decoder" else None
    reply = await loaded.scheduler.call(partial(assistant.reply, messages, chat))
    tok = require_tokenizer(loaded)
    prompt = sum(len(tok.encode(m["content"])) for m in messages)
    usage = Usage(prompt_tokens=prompt, completion_tokens=len(tok.encode(reply.text)),
                  total_tokens=prompt + len(tok.encode(reply.text)))
    rid, name = f"chatcmpl-{uuid.uuid4().hex}", state.settings.model_name
    if not body.stream:
        completion = ChatCompletion(id=rid, model=name, usage=usage, choices=[
            ChatChoice(index=0, message=AssistantMessage(content=reply.text), finish_reason="stop")])
        return _json({**completion.model_dump(), "support": reply.extra()})
    created = now()
    chunks: list[dict[str, Any]] = [
        ChatCompletionChunk(id=rid, created=created, model=name, choices=[
            ChatChunkChoice(index=0, delta=Delta(role="assistant", content=reply.text))]).model_dump(),
        {**ChatCompletionChunk(id=rid, created=created, model=name, choices=[
            ChatChunkChoice(index=0, delta=Delta(), finish_reason="stop")]).model_dump(), "support": reply.extra()},
    ]
    if body.stream_options is not None and body.stream_options.include_usage:
        chunks.append(ChatCompletionChunk(id=rid, created=created, model=name, choices=[], usage=usage).model_dump())
    events = "".join(f"data: {json.dumps(c, ensure_ascii=False)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return Response(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def list_handovers(request: Request) -> Response:
    """`GET /v1/support/handovers?after=ID&limit=N`: the queue, oldest first."""
    require_ready(request)
    assistant = assistant_of(request)
    queue: HandoverQueue = assistant.queue  # type: ignore[union-attr]  (the route exists only with support)
    try:
        after = int(request.query_params.get("after", 0))
        limit = min(max(int(request.query_params.get("limit", 100)), 1), 1000)
    except ValueError:
        raise bad_request("after and limit must be integers") from None
    data = [handover_json(h) for h in queue.list(after=after, limit=limit)]
    return _json({"object": "list", "data": data})


def _json(data: dict[str, Any]) -> Response:
    return Response(json.dumps(data, ensure_ascii=False), media_type="application/json")




def open_support(config_path: str | Path) -> Assistant:
    """The assistant a support.yaml describes, with the served model as its chat model (`chat` is ignored)."""
    config = read_support_config(config_path)
    return open_assistant(replace(config, chat=None))


__all__ = ["assistant_of", "list_handovers", "open_support", "support_chat"]
