"""Servers for the serve tests: `lmforge serve` subprocesses on 127.0.0.1, one per configuration.

A tiny LLaMA-style decoder (context 1024, so a long generation takes seconds and cancelling it
is observable) and a tiny BERT encoder are built once per session from a corpus written here.
Every configuration starts together on first use (`--port 0`; the port is read from the
server's log line), so their start-up times overlap; each is stopped at the end of the session.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import torch

from lmforge.api import LM
from lmforge.config import preset
from lmforge.models import build_model
from lmforge.tokenizer import train_tokenizer

API_KEY = "sk-test-key"
CORPUS = (
    "The quick brown fox jumps over the lazy dog. Hello world, how are you today?\n"
    "A language model predicts the next token. Servers stream tokens to clients.\n"
    "Grüße aus München! Ça va très bien. 日本語のテキスト。\n"
) * 40

# name -> (model, extra command-line arguments)
CONFIGS: dict[str, tuple[str, list[str]]] = {
    # the main server: a key, small caps so that fuzzed requests stay quick
    "main": ("llama", ["--api-key", API_KEY, "--model-name", "tiny", "--max-tokens", "64", "--max-n", "4",
                       "--max-body-bytes", "65536"]),
    # one slot and one queue place: the third concurrent request is refused with 429
    "queue": ("llama", ["--model-name", "tiny", "--slots", "1", "--max-queue", "1", "--max-tokens", "1000"]),
    "bert": ("bert", ["--model-name", "tiny-bert"]),
}


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    key: str | None = None

    def client(self, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key or "unused", max_retries=0, timeout=60,
                             **kwargs)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def metrics(self) -> dict[str, float]:
        """The server's unlabelled metric samples, by name."""
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=10).text
        samples = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
        return {name: float(value) for name, value in samples}


def build_models(folder: Path) -> dict[str, Path]:
    corpus = folder / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    tok = train_tokenizer([corpus], 300)
    torch.manual_seed(0)
    paths = {"llama": folder / "tiny-llama", "bert": folder / "tiny-bert"}
    LM(build_model(preset("tiny-llama", vocab_size=tok.vocab_size, max_seq_len=1024)), tok).save(paths["llama"])
    LM(build_model(preset("tiny-bert", vocab_size=tok.vocab_size, max_seq_len=128)), tok).save(paths["bert"])
    return paths


def _launch(model: Path, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LMFORGE_API_KEY", None)
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", str(model), "--host", "127.0.0.1",
                                 "--port", "0", *args], stdout=out, stderr=subprocess.STDOUT, env=env)


def _wait_ready(process: subprocess.Popen[bytes], log: Path, key: str | None, timeout: float = 90.0) -> Server:
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        if url is None:
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text())
            url = found.group(1) if found else None
        if url is not None:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return Server(url, process, log, key)
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready after {timeout} s:\n{log.read_text()}")


class ServerPool:
    """Starts every configuration at once on first use; hands each out when it is healthy."""

    def __init__(self, paths: dict[str, Path], folder: Path) -> None:
        self.paths, self.folder = paths, folder
        self.processes: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self.ready: dict[str, Server] = {}

    def get(self, name: str) -> Server:
        if not self.processes:
            for config, (model, args) in CONFIGS.items():
                log = self.folder / f"{config}.log"
                self.processes[config] = (_launch(self.paths[model], args, log), log)
        if name not in self.ready:
            process, log = self.processes[name]
            key = API_KEY if API_KEY in CONFIGS[name][1] else None
            self.ready[name] = _wait_ready(process, log, key)
        return self.ready[name]

    def close(self) -> None:
        for process, _ in self.processes.values():
            process.terminate()
        for process, _ in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
