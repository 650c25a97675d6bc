"""Fixtures for the fine-tuning tests: tiny data files the tests write, and a runner for the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi")]


def capital_rows(n: int) -> list[dict]:
    """Conversations and instruction rows about capitals: a task a tiny model learns in seconds."""
    rows = []
    for i in range(n):
        country, city = CAPITALS[i % len(CAPITALS)]
        if i % 2:
            rows.append({"instruction": "Name the capital.", "input": country, "output": f"{city}."})
        else:
            rows.append({"messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": f"Capital of {country}?"},
                                      {"role": "assistant", "content": f"{city}."}]})
    return rows


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every test here runs on one torch thread (see tests/conftest.py)."""


@pytest.fixture
def jsonl(tmp_path: Path) -> Callable[[str, list], Path]:
    """Write rows (dicts, or raw strings written as they are) as a JSONL file in tmp_path."""

    def write(name: str, rows: list) -> Path:
        path = tmp_path / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
        return path

    return write


@pytest.fixture
def capitals_jsonl(jsonl) -> Path:
    return jsonl("capitals.jsonl", capital_rows(48))


@pytest.fixture(scope="session")
def recipe() -> Callable[..., dict]:
    """A fine-tuning recipe for a short run: recipe(base, train_file, out_dir, data={...}, train={...}, ...)."""

    def build(base: Path, train_file: Path, out_dir: Path, **sections: dict) -> dict:
        train = {"steps": 30, "batch_size": 8, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 3, "eval_every": 0,
                 "save_every": 0, "log_every": 1, "resume": "never", **sections.pop("train", {})}
        return {"finetune": {"base": str(base), **sections.pop("finetune", {})},
                "data": {"train": str(train_file), **sections.pop("data", {})}, "train": train,
                "out_dir": str(out_dir), **sections}

    return build


@pytest.fixture(scope="session")
def cli() -> Callable[..., subprocess.CompletedProcess]:
    """`lmforge ARGS...` in a fresh process, as a user runs it."""

    def run(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lmforge.cli", *map(str, args)], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})

    return run
