"""Bad input gets OpenAI-shaped errors with the right status (400/401/404/405/413), never a 500."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from _serve_servers import Server

from lmforge.api import LM

HELLO = [{"role": "user", "content": "Hello"}]


def post(server: Server, path: str, body: Any = None, *, content: Any = None,
         headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(server.url + path, json=body, content=content, timeout=30,
                      headers=server.headers if headers is None else headers)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"), ("POST", "/tokenize"), ("POST", "/detokenize"),
])
def test_keyed_routes_need_the_key(main_server: Server, method: str, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + main_server.key}):
        response = httpx.request(method, main_server.url + path, json={"prompt": "x"}, headers=headers, timeout=10)
        assert error_of(response, 401)["code"] == "invalid_api_key"


def test_wrong_key_through_the_client(main_server: Server) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=main_server.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()


@pytest.mark.parametrize("raw", [b'{"prompt": "x"', b"", b"\xff\xfe", b"[" * 5000, b'{"prompt": "\\ud800"}'])
def test_malformed_json_is_400(main_server: Server, raw: bytes) -> None:
    error = error_of(post(main_server, "/v1/completions", content=raw), 400)
    assert error["code"] == "invalid_json"


@pytest.mark.parametrize("raw", [b"NaN", b"null", b'"text"', b'{"prompt": "x", "temperature": NaN}',
                                 b'{"prompt": "x", "top_p": Infinity}', b'{"prompt": "x", "max_tokens": 1e400}'])
def test_json_that_is_not_a_request_is_400(main_server: Server, raw: bytes) -> None:
    error_of(post(main_server, "/v1/completions", content=raw), 400)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": 2.5}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "n": 5}, "n"),  # the server's cap is 4
    ("/v1/completions", {"prompt": "x", "max_tokens": 65}, "max_tokens"),  # the server's cap is 64
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": "s" * 1000}, "stop"),
    ("/v1/completions", {"prompt": "x", "seed": 2**70}, "seed"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"not-a-token": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": [10**9]}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", [1, 2], None),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ("/v1/chat/completions", {"messages": HELLO, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": HELLO, "max_completion_tokens": 100}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": HELLO, "tools": [{"type": "function"}]}, "tools"),
    ("/v1/embeddings", {"input": []}, "input"),
    ("/v1/embeddings", {"input": [1, 2, 3]}, "input"),
    ("/v1/embeddings", {"input": "x", "dimensions": 3}, "dimensions"),
    ("/tokenize", {}, None),
    ("/detokenize", {"tokens": [10**9]}, "tokens"),
])
def test_bad_values_are_400_naming_the_parameter(main_server: Server, path: str, body: Any, param: str | None) -> None:
    assert error_of(post(main_server, path, body), 400)["param"] == param


def test_unknown_model_is_404(main_server: Server) -> None:
    """OpenAI answers an unknown model with 404 `model_not_found`; so does this server."""
    with pytest.raises(openai.NotFoundError) as caught:
        main_server.client().chat.completions.create(model="gpt-17", messages=HELLO)
    assert caught.value.body["code"] == "model_not_found"


def test_client_errors_for_negative_max_tokens_and_temperature(main_server: Server) -> None:
    client = main_server.client()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=-1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=HELLO, temperature=-1)


def test_oversized_body_is_413(main_server: Server) -> None:
    big = {"prompt": "x" * 70_000}  # the server takes 65,536 bytes
    assert error_of(post(main_server, "/v1/completions", big), 413)["code"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: the size is counted while reading
        yield b'{"prompt": "'
        for _ in range(70):
            yield b"x" * 1000
        yield b'"}'

    assert error_of(post(main_server, "/v1/completions", content=chunked()), 413)["code"] == "request_too_large"


def test_prompt_longer_than_the_context_is_400_with_both_lengths(main_server: Server, local_lm: LM) -> None:
    prompt = "Hello world, how are you today? " * 300
    n_tokens = len(local_lm.tokenizer.encode(prompt, add_special_tokens=True))
    assert n_tokens > 1024
    with pytest.raises(openai.BadRequestError) as caught:
        main_server.client().completions.create(model="tiny", prompt=prompt, max_tokens=4)
    message = caught.value.body["message"]
    assert str(n_tokens) in message and "1024" in message
    assert caught.value.body["code"] == "context_length_exceeded"


def test_unknown_route_and_method(main_server: Server) -> None:
    assert error_of(httpx.get(main_server.url + "/v2/nothing", timeout=10), 404)["type"] == "not_found"
    error_of(httpx.get(main_server.url + "/v1/completions", headers=main_server.headers, timeout=10), 405)
