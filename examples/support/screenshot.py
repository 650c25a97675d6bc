"""The README's picture: the chat page of `lmforge serve --support` during a handover (after run.py built the index).

    python examples/support/screenshot.py [--out docs/support-handover.png]

Serves the example's embedder with `examples/support/support.yaml` (an encoder, so answers are
extractive), asks a question and then for a person in headless Chromium (Debian's `chromium`,
driven by playwright), and saves the page.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORK = ROOT / "runs" / "support-example"


def serve(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", str(WORK / "all-MiniLM-L6-v2"),
                                    "--port", "0", "--model-name", "skylark-support", "--support",
                                    str(HERE / "support.yaml")], stdout=out, stderr=subprocess.STDOUT)
    for _ in range(600):
        found = re.search(r"ready: (http://127\.0\.0\.1:\d+)", log.read_text())
        if found:
            return process, found.group(1)
        if process.poll() is not None:
            raise SystemExit(log.read_text())
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start")


def main() -> None:
    from playwright.sync_api import expect, sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "support-handover.png"))
    args = parser.parse_args()
    process, url = serve(Path(tempfile.mkdtemp()) / "server.log")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 680})
            page.goto(url + "/")
            expect(page.locator("#status")).to_have_text("ready", timeout=60_000)
            for text in ("How long does a refund take to reach my card?", "This is useless, I want to talk to a human"):
                page.fill("#input", text)
                page.press("#input", "Enter")
                expect(page.locator("#status")).to_have_text("ready", timeout=60_000)
            expect(page.locator("#handover")).to_be_visible()
            page.screenshot(path=args.out)
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
