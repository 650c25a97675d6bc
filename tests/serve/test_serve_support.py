"""`lmforge serve MODEL --support support.yaml`: the OpenAI shape plus `support`, the key, the page, durable handovers.

One server (the tiny decoder as chat model, an index built with the tiny BERT encoder). The last
test kills it with SIGKILL right after a handover was acknowledged and finds the handover in the
queue file, which is what the server reads when it starts again.
"""

from __future__ import annotations

import importlib.util
import signal
import tempfile
from pathlib import Path

import httpx
import pytest
import yaml
from _serve_servers import API_KEY, Server, _launch, _wait_ready
from test_serve_browser import ARGS, CHROMIUM

import lmforge
from lmforge.rag import Document, IndexSettings, index_documents
from lmforge.support import HandoverQueue

DOCS = {"refunds.md": "# Refunds\n\nA refund is paid within 30 days.",
        "password.md": "# Password\n\nReset your password with the link on the login page."}
HUMAN = "I want to talk to a human"


@pytest.fixture(scope="module")
def support_server(model_paths, tmp_path_factory):
    folder = tmp_path_factory.mktemp("support")
    encoder = lmforge.load(model_paths["bert"])
    index_documents(folder / "kb.index", [Document(k, v) for k, v in DOCS.items()], encoder, str(model_paths["bert"]),
                    settings=IndexSettings(max_tokens=48, overlap=0))
    config = {"index": "kb.index", "handovers": "handovers.sqlite", "doc_url": "https://help.example.com/{doc_id}",
              "retrieval": {"k": 2}, "answer": {"max_new_tokens": 6},
              "escalation": {"min_similarity": -1.0, "dont_know": []}}  # a random model's text never hands over
    (folder / "support.yaml").write_text(yaml.safe_dump(config))
    process = _launch(model_paths["llama"], ["--api-key", API_KEY, "--model-name", "tiny", "--support",
                                             str(folder / "support.yaml")], folder / "server.log")
    server = _wait_ready(process, folder / "server.log", API_KEY)
    server.queue = folder / "handovers.sqlite"  # type: ignore[attr-defined]
    yield server
    process.kill()
    process.wait(timeout=15)


def chat(server: Server, text: str, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", headers=server.headers, timeout=60,
                      json={"messages": [{"role": "user", "content": text}], **body})


def test_the_openai_client_reads_the_answer_and_the_support_field(support_server):
    completion = support_server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "how do I get a refund?"}])
    assert completion.choices[0].finish_reason == "stop" and completion.choices[0].message.content is not None
    support = completion.model_extra["support"]
    assert support["escalation"] is None
    assert [s["n"] for s in support["sources"]] == [1, 2]
    assert {s["doc_id"] for s in support["sources"]} == set(DOCS)
    assert support["sources"][0]["url"] == "https://help.example.com/" + support["sources"][0]["doc_id"]
    chunks = list(support_server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": HUMAN}], stream=True))
    assert chunks[-1].model_extra["support"]["escalation"]["reason"] == "human_request"


def test_the_support_endpoints_need_the_key(support_server):
    url = support_server.url
    assert httpx.get(url + "/v1/support/handovers", timeout=10).status_code == 401
    assert httpx.get(url + "/v1/support/handovers", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    assert httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": HUMAN}]},
                      timeout=10).status_code == 401
    listed = httpx.get(url + "/v1/support/handovers", headers=support_server.headers, timeout=10)
    assert listed.status_code == 200 and listed.json()["object"] == "list"


@pytest.mark.skipif(not Path(CHROMIUM).is_file() or importlib.util.find_spec("playwright") is None,
                    reason="needs Debian's chromium and the playwright package")
def test_the_page_shows_citations_and_the_handover_state(support_server):
    from playwright.sync_api import expect, sync_playwright

    shot = Path(tempfile.gettempdir()) / "lmforge-support-handover.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.goto(support_server.url + "/")
            page.fill("#key", API_KEY)
            page.dispatch_event("#key", "change")
            expect(page.locator("#status")).to_have_text("ready")
            page.fill("#input", "How do I get a refund?")
            page.press("#input", "Enter")
            first = page.locator(".msg.assistant").last
            expect(first.locator(".sources a")).to_have_count(2, timeout=30_000)
            assert first.locator(".sources a").first.get_attribute("href").startswith("https://help.example.com/")
            expect(page.locator("#handover")).to_be_hidden()
            expect(page.locator("#status")).to_have_text("ready")
            page.fill("#input", HUMAN)
            page.press("#input", "Enter")
            expect(page.locator(".msg.assistant").last.locator(".handover")).to_contain_text(
                "Handed to a person (human request)", timeout=30_000)
            expect(page.locator("#handover")).to_be_visible()
            page.screenshot(path=str(shot))
        finally:
            browser.close()


def test_a_handover_survives_a_kill_right_after_it_was_acknowledged(support_server):
    before = len(HandoverQueue(support_server.queue).list(limit=1000))
    reply = chat(support_server, HUMAN + " about my invoice, now")
    assert reply.status_code == 200
    support_server.process.send_signal(signal.SIGKILL)  # no shutdown: only what was committed survives
    support_server.process.wait(timeout=15)
    handover_id = reply.json()["support"]["escalation"]["handover_id"]
    queued = {h.id: h for h in HandoverQueue(support_server.queue).list(limit=1000)}
    assert len(queued) == before + 1 and queued[handover_id].reason == "human_request"
    assert queued[handover_id].conversation[-1]["content"] == HUMAN + " about my invoice, now"
