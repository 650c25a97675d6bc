"""The chat page in headless Chromium: it asks for the key, sends a message, and streams the reply.

Needs Debian's `chromium` and the `playwright` Python package (no `playwright install`: the
system browser is launched by path). Skipped, saying which is missing, when either is absent.
A screenshot of the page after the reply goes to the system temp folder.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from _serve_servers import Server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="chromium is not installed (apt-get install -y chromium)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None,
                       reason="playwright is not installed (pip install playwright)"),
]


def test_chat_page_streams_a_reply(main_server: Server) -> None:
    from playwright.sync_api import expect, sync_playwright

    shot = Path(tempfile.gettempdir()) / "lmforge-chat-page.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.goto(main_server.url + "/")
            expect(page.locator("#keybox")).to_be_visible()  # the server wants a key: the page asks
            page.fill("#key", main_server.key or "")
            page.dispatch_event("#key", "change")
            expect(page.locator("#status")).to_have_text("ready")
            expect(page.locator("#model")).to_have_text("tiny")
            page.fill("#system", "You are terse.")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "24")
            page.fill("#input", "Hello, how are you?")
            page.press("#input", "Enter")
            reply = page.locator(".msg.assistant").last
            expect(reply.locator(".meta")).to_contain_text("tok/s", timeout=20_000)
            expect(page.locator("#status")).to_have_text("ready")
            assert page.locator(".msg.user .bubble").inner_text() == "Hello, how are you?"
            assert reply.locator(".bubble").inner_text().strip()
            assert "finish: " in reply.locator(".meta").inner_text()
            page.screenshot(path=str(shot))
        finally:
            browser.close()


def test_stop_button_aborts_the_stream(queue_server: Server) -> None:
    """Greedy decoding of this tiny model runs past 900 tokens, so the reply is still streaming at Stop."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(queue_server.url + "/")
            expect(page.locator("#status")).to_have_text("ready")
            expect(page.locator("#keybox")).to_be_hidden()  # no key on this server
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "900")
            page.fill("#input", "Tell me a long story.")
            page.click("#send")
            reply = page.locator(".msg.assistant").last
            expect(reply.locator(".meta")).to_contain_text("tokens")  # streaming has begun
            page.click("#stop")
            expect(reply.locator(".meta")).to_contain_text("finish: stopped")
            expect(page.locator("#send")).to_be_visible()
        finally:
            browser.close()
    deadline = time.monotonic() + 3
    while queue_server.metrics()["lmforge_requests_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert queue_server.metrics()["lmforge_requests_running"] == 0
