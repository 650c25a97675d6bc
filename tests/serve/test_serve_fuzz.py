"""Fuzzing the POST routes with random JSON: whatever arrives, the answer is never a 5xx.

Bodies mix plausible fields (near-valid values, so requests reach generation and its checks)
with junk: wrong types, huge numbers, NaN and infinities, nested lists and objects, raw bytes.
The main server caps max_tokens at 64 and n at 4, so a valid request stays quick; everything
goes to 127.0.0.1, and the example count is fixed.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
from _serve_servers import Server
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize", "/detokenize"]

LEAF = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30))
JUNK = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                       max_size=4), max_leaves=10)


def near(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly plausible values, sometimes junk."""
    return st.one_of(values, values, values, JUNK)


TOKEN = st.integers(min_value=-2, max_value=400)
MESSAGE = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "wizard"]),
    "content": near(st.text(max_size=30) | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                             "text": st.text(max_size=10)}),
                                                      max_size=2)),
})
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": near(st.just("tiny")),
    "prompt": near(st.text(max_size=40) | st.lists(TOKEN, max_size=8) | st.lists(st.text(max_size=10), max_size=3)
                   | st.lists(st.lists(TOKEN, max_size=4), max_size=3)),
    "messages": near(st.lists(MESSAGE, max_size=3)),
    "input": near(st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=3) | st.lists(TOKEN, max_size=3)),
    "tokens": near(st.lists(TOKEN, max_size=6)),
    "max_tokens": near(st.integers(-3, 80)),
    "max_completion_tokens": near(st.integers(-3, 80)),
    "temperature": near(st.floats(-1, 3)),
    "top_p": near(st.floats(-0.5, 1.5)),
    "top_k": near(st.integers(-3, 500)),
    "min_p": near(st.floats(-0.5, 1.5)),
    "presence_penalty": near(st.floats(-3, 3)),
    "frequency_penalty": near(st.floats(-3, 3)),
    "repetition_penalty": near(st.floats(-1, 12)),
    "seed": near(st.integers(-(2**70), 2**70)),
    "n": near(st.integers(-1, 6)),
    "stop": near(st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=6)),
    "stream": near(st.booleans()),
    "stream_options": near(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "logprobs": near(st.booleans() | st.integers(-1, 25)),
    "top_logprobs": near(st.integers(-1, 25)),
    "echo": near(st.booleans()),
    "logit_bias": near(st.dictionaries(st.text(max_size=5) | TOKEN.map(str), st.floats(-200, 200), max_size=3)),
    "encoding_format": near(st.sampled_from(["float", "base64", "int8"])),
    "dimensions": near(st.integers(-1, 100)),
    "add_special_tokens": near(st.booleans()),
    "add_generation_prompt": near(st.booleans()),
    "suffix": JUNK,
    "best_of": JUNK,
    "tools": JUNK,
    "response_format": JUNK,
}
BASES: dict[str, dict[str, Any]] = {  # one valid body per route, for the mutations to start from
    "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
    "/v1/completions": {"model": "tiny", "prompt": "Hello", "max_tokens": 8},
    "/v1/embeddings": {"model": "tiny", "input": "Hello"},
    "/tokenize": {"model": "tiny", "prompt": "Hello"},
    "/detokenize": {"model": "tiny", "tokens": [72, 101]},
}


def encode(body: Any) -> bytes:
    return json.dumps(body).encode()  # allow_nan: NaN and Infinity go out as such


def bodies(route: str) -> st.SearchStrategy[bytes]:
    """A valid body with up to 3 fields replaced (reaches generation), any mix of fields, or junk."""
    changes = st.lists(st.sampled_from(sorted(FIELDS)), max_size=3, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({key: FIELDS[key] for key in keys}))
    mutated = changes.map(lambda change: encode({**BASES[route], **change}))
    return st.one_of(mutated, mutated, mutated, st.fixed_dictionaries({}, optional=FIELDS).map(encode),
                     JUNK.map(encode), st.binary(max_size=64))


REQUESTS = st.sampled_from(ROUTES).flatmap(lambda route: st.tuples(st.just(route), bodies(route)))


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(request=REQUESTS)
@example(request=("/v1/chat/completions", encode({**BASES["/v1/chat/completions"], "repetition_penalty": 1.58e-259})))
def test_random_bodies_never_get_a_5xx(main_server: Server, request: tuple[str, bytes]) -> None:
    route, body = request
    response = httpx.post(main_server.url + route, content=body, timeout=60,
                          headers={**main_server.headers, "Content-Type": "application/json"})
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n") and '"error"' not in response.text
    else:
        assert "error" not in response.json()
