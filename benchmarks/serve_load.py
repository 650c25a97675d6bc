"""Load test for `lmforge serve`: concurrent streaming clients against one server on loopback.

Starts `lmforge serve` as a subprocess on 127.0.0.1 (a free port) with `--model`, or with a tiny
random LLaMA built here when no model is given. For each concurrency level (1, 4, 16, 64) it runs
that many clients; each sends streaming `/v1/completions` requests one after another until it has
sent `--requests` of them or the level has run `--seconds` (requests in flight then finish; each is
bounded by `--max-tokens`). Every request asks for `stream_options.include_usage`, so generated
tokens are counted exactly. Nothing leaves 127.0.0.1.

Per level it prints: requests, errors, generated tokens/s (all clients together), p50/p95 time to
first token and inter-token latency (the gap between consecutive streamed chunks), and the
server's resident memory before and after the whole run. The last line is

    ratio16=R tok_s_1=A tok_s_16=B errors=E

where R = B / A is the throughput gained by 16 concurrent streams over one (continuous batching).

    python benchmarks/serve_load.py                       # tiny random model
    python benchmarks/serve_load.py --model runs/quickstart --max-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

LEVELS = (1, 4, 16, 64)
PROMPTS = ["The quick brown fox", "Once upon a time", "def fibonacci(n):", "A language model is", "Hello, world"]


@dataclass
class Level:
    clients: int
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def build_tiny_model(folder: Path) -> Path:
    """A random tiny-llama with a byte-level BPE trained on a few sentences (seconds on a CPU)."""
    import torch

    from lmforge.api import LM
    from lmforge.config import preset
    from lmforge.models import build_model
    from lmforge.tokenizer import train_tokenizer

    corpus = folder / "corpus.txt"
    corpus.write_text(" ".join(PROMPTS) * 50 + "\nServers stream tokens to many clients at once.\n" * 50)
    tok = train_tokenizer([corpus], 300)
    torch.manual_seed(0)
    path = folder / "tiny-llama"
    LM(build_model(preset("tiny-llama", vocab_size=tok.vocab_size, max_seq_len=512)), tok).save(path)
    return path


def start_server(model: Path, log: Path, slots: int) -> tuple[subprocess.Popen[bytes], str]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "lmforge.cli", "serve", str(model), "--host", "127.0.0.1", "--port", "0",
             "--slots", str(slots), "--max-queue", "128", "--model-name", "bench"],
            stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text())
        if found:
            try:
                if httpx.get(found.group(1) + "/health", timeout=5).status_code == 200:
                    return process, found.group(1)
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the server was not ready after 180 s:\n{log.read_text()}")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The `data:` payloads of a server-sent event stream, cut at "\n" only.

    httpx's `aiter_lines` also cuts at U+0085, U+2028 and U+2029, which a JSON string may hold
    unescaped (a sampled token can be one), so it would split a chunk in two.
    """
    buffer = ""
    async for text in response.aiter_text():
        *lines, buffer = (buffer + text).split("\n")
        for line in lines:
            if line.startswith("data: ") and line != "data: [DONE]":
                yield line[6:]


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, level: Level) -> None:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                level.errors += 1
                return
            async for data in sse_data(response):
                chunk = json.loads(data)
                if chunk.get("usage"):
                    level.tokens += chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if last is None:
                    level.ttft.append(now - start)
                else:
                    level.itl.append(now - last)
                last = now
        level.requests += 1
    except httpx.HTTPError:
        level.errors += 1


async def run_level(url: str, clients: int, requests: int, seconds: float, max_tokens: int) -> Level:
    level = Level(clients)
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:

        async def worker(k: int) -> None:
            for i in range(requests):
                if time.perf_counter() > deadline:
                    return
                await one_request(client, url, PROMPTS[(k + i) % len(PROMPTS)], max_tokens, level)

        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        level.seconds = time.perf_counter() - start
    return level


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def report(level: Level) -> str:
    ms = lambda v: f"{v * 1000:7.1f}"  # noqa: E731
    return (f"{level.clients:>7} {level.requests:>8} {level.errors:>6} {level.tok_s:>9.1f} "
            f"{ms(percentile(level.ttft, 50))} {ms(percentile(level.ttft, 95))} "
            f"{ms(percentile(level.itl, 50))} {ms(percentile(level.itl, 95))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: a tiny random LLaMA)")
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS), help="concurrent clients per level")
    parser.add_argument("--requests", type=int, default=4, help="requests per client and level (at most)")
    parser.add_argument("--seconds", type=float, default=20.0, help="stop starting requests after this long per level")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (at most)")
    parser.add_argument("--slots", type=int, default=16, help="the server's --slots")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = args.model or build_tiny_model(folder)
        process, url = start_server(model, folder / "server.log", args.slots)
        try:
            rss_before = rss_mib(process.pid)
            print(f"server {url} · model {model} · slots {args.slots} · max_tokens {args.max_tokens}")
            print("clients requests errors     tok/s  ttft50  ttft95   itl50   itl95   (ms)")
            levels = []
            for clients in args.levels:
                level = asyncio.run(run_level(url, clients, args.requests, args.seconds, args.max_tokens))
                levels.append(level)
                print(report(level), flush=True)
            rss_after = rss_mib(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=30)
    print(f"server RSS: {rss_before:.0f} MiB before, {rss_after:.0f} MiB after")
    by_clients = {level.clients: level for level in levels}
    tok_1 = by_clients[1].tok_s if 1 in by_clients else float("nan")
    tok_16 = by_clients[16].tok_s if 16 in by_clients else float("nan")
    errors = sum(level.errors for level in levels)
    print(f"ratio16={tok_16 / tok_1:.2f} tok_s_1={tok_1:.1f} tok_s_16={tok_16:.1f} errors={errors}")


if __name__ == "__main__":
    main()
