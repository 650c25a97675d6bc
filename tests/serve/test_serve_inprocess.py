"""In-process: the app under Starlette's TestClient (background loading, a failed load), the scheduler
alone, and the Prometheus text."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
from fastapi.testclient import TestClient

from lmforge.api import LM
from lmforge.errors import LmforgeError
from lmforge.generate.engine import Engine, Request, Token
from lmforge.serve.app import create_app
from lmforge.serve.metrics import Counter, Histogram, ServerMetrics
from lmforge.serve.scheduler import QueueFull, Scheduler
from lmforge.serve.state import Settings


def test_health_is_503_while_the_model_loads(local_lm: LM) -> None:
    gate = threading.Event()
    ready: list[int] = []

    def slow_load() -> LM:
        gate.wait(30)
        return local_lm

    app = create_app(slow_load, Settings(model_name="m", n_slots=2), on_ready=lambda lm, context: ready.append(context))
    with TestClient(app) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json()["error"]["code"] == "model_not_ready"
        assert client.post("/v1/completions", json={"prompt": "Hello"}).status_code == 503
        assert client.get("/metrics").status_code == 200  # metrics answer while loading
        gate.set()
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready == [1024]
        reply = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3


def test_a_failed_load_is_reported(local_lm: LM) -> None:
    failures: list[str] = []

    def broken() -> LM:
        raise LmforgeError("checkpoint x has no model.safetensors")

    with TestClient(create_app(broken, on_load_error=failures.append)) as client:
        deadline = time.monotonic() + 10
        while not failures and time.monotonic() < deadline:
            time.sleep(0.02)
        health = client.get("/health")
    assert failures == ["checkpoint x has no model.safetensors"]
    assert health.status_code == 503 and "no model.safetensors" in health.json()["error"]["message"]


def test_prometheus_text() -> None:
    counter = Counter("c_total", "Things.")
    counter.inc(2, reason="stop")
    counter.inc(reason='say "hi"')
    histogram = Histogram("h_seconds", "Latency.", buckets=(0.1, 1.0))
    for value in (0.05, 0.5, 5.0):
        histogram.observe(value)
    assert counter.render() == ["# HELP c_total Things.", "# TYPE c_total counter",
                                'c_total{reason="say \\"hi\\""} 1', 'c_total{reason="stop"} 2']
    assert histogram.render()[2:] == ['h_seconds_bucket{le="0.1"} 1', 'h_seconds_bucket{le="1"} 2',
                                      'h_seconds_bucket{le="+Inf"} 3', "h_seconds_sum 5.55", "h_seconds_count 3"]


def test_scheduler_admits_queues_refuses_cancels_and_logs(local_lm: LM, caplog: pytest.LogCaptureFixture) -> None:
    scheduler = Scheduler(Engine(local_lm.model, n_slots=1), ServerMetrics(), max_queue=1, stats_every=0.1)
    scheduler.start()

    async def drive() -> None:
        short = scheduler.submit([Request([1, 2], max_new_tokens=5)])
        long = scheduler.submit([Request([1, 2], max_new_tokens=500)])
        with pytest.raises(QueueFull):  # one slot + one queue place are taken
            scheduler.submit([Request([1, 2], max_new_tokens=1)])
        tokens: list[tuple[int, Token]] = []
        while len(tokens) < 5:
            item = await short.queue.get()
            assert not isinstance(item, BaseException)
            tokens += item
        assert [t.finish_reason for _, t in tokens] == [None] * 4 + ["length"]
        await long.queue.get()  # the long one got the slot
        assert scheduler.running == 1
        scheduler.cancel(long)
        assert await scheduler.call(lambda: 42) == 42  # runs after the cancel, between steps
        assert scheduler.running == 0 and scheduler.waiting == 0

    with caplog.at_level(logging.INFO, logger="lmforge.serve.scheduler"):
        asyncio.run(drive())
        time.sleep(0.3)  # the idle scheduler logs the last window when it is due
    scheduler.stop()
    assert any("generating" in r.getMessage() and "tok/s" in r.getMessage() for r in caplog.records)
