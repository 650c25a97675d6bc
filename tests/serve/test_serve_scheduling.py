"""Slots and the queue, seen through /metrics: cancelled requests free their slot, a full queue is 429.

These run on the server with one slot and one queue place. Requests ban the end-of-sequence
tokens with `logit_bias`, so a 1000-token generation is still running when the test acts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from _serve_servers import Server

from lmforge.api import LM

CANCELLED = 'lmforge_sequences_finished_total{reason="cancelled"}'


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture(scope="module")
def long_body(local_lm: LM) -> dict[str, Any]:
    tok = local_lm.tokenizer
    banned = {str(i): -100 for i in {tok.eos_id, tok.eot_id} if i is not None}
    return {"prompt": "Hello", "max_tokens": 1000, "temperature": 0, "logit_bias": banned, "stream": True}


def idle(server: Server) -> bool:
    m = server.metrics()
    return m["lmforge_requests_running"] == 0 and m["lmforge_requests_waiting"] == 0


def test_closing_a_stream_frees_its_slot(queue_server: Server, long_body: dict[str, Any]) -> None:
    assert wait_for(lambda: idle(queue_server), 10)
    cancelled = queue_server.metrics().get(CANCELLED, 0)
    with httpx.Client(timeout=30) as client, \
            client.stream("POST", queue_server.url + "/v1/completions", json=long_body) as response:
        lines = response.iter_lines()  # kept: dropping the iterator early would close the connection
        for _ in range(3):
            assert next(line for line in lines if line.startswith("data: "))
        assert queue_server.metrics()["lmforge_requests_running"] == 1
    closed = time.monotonic()
    assert wait_for(lambda: queue_server.metrics()["lmforge_requests_running"] == 0, 2.0)
    assert time.monotonic() - closed < 2.0
    assert queue_server.metrics()[CANCELLED] == cancelled + 1


def test_a_client_that_gives_up_frees_its_slot(queue_server: Server, long_body: dict[str, Any]) -> None:
    assert wait_for(lambda: idle(queue_server), 10)
    cancelled = queue_server.metrics().get(CANCELLED, 0)
    with pytest.raises(httpx.ReadTimeout):  # not streamed: the server notices the closed connection
        httpx.post(queue_server.url + "/v1/completions", json={**long_body, "stream": False},
                   timeout=httpx.Timeout(10, read=0.5))
    assert wait_for(lambda: queue_server.metrics()["lmforge_requests_running"] == 0, 1.5)
    assert queue_server.metrics()[CANCELLED] == cancelled + 1


def test_a_full_queue_answers_429(queue_server: Server, long_body: dict[str, Any]) -> None:
    assert wait_for(lambda: idle(queue_server), 10)
    url = queue_server.url + "/v1/completions"
    with httpx.Client(timeout=30) as first_client, httpx.Client(timeout=30) as second_client, \
            first_client.stream("POST", url, json=long_body) as first:
        assert first.status_code == 200
        first_lines = first.iter_lines()  # kept alive: a dropped iterator closes the connection
        assert next(first_lines).startswith("data: ")  # it holds the slot
        with second_client.stream("POST", url, json=long_body) as second:
            assert second.status_code == 200
            assert wait_for(lambda: queue_server.metrics()["lmforge_requests_waiting"] == 1, 5)
            refused = httpx.post(url, json={"prompt": "Hello", "max_tokens": 2}, timeout=10)
            assert refused.status_code == 429
            assert int(refused.headers["Retry-After"]) >= 1
            assert refused.json()["error"]["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError):
                queue_server.client().chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert wait_for(lambda: idle(queue_server), 2.0)
    # seeded: unseeded, the random tiny model sometimes samples its end-of-text token first
    reply = queue_server.client().completions.create(model="tiny", prompt="Hello", max_tokens=2, seed=0)
    assert reply.usage.completion_tokens == 2


def test_more_sequences_than_the_server_holds_is_400(queue_server: Server) -> None:
    response = httpx.post(queue_server.url + "/v1/completions", json={"prompt": "Hello", "n": 3}, timeout=10)
    assert response.status_code == 400 and "3 sequences" in response.json()["error"]["message"]
