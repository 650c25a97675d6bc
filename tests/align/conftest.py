"""Small preference and prompt files for the alignment tests (the tiny model comes from tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CHOSEN, REJECTED = " the quick brown fox.", " the lazy dog."


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def prefs_file(tmp_path_factory) -> Path:
    """24 pairs that all prefer the fox to the dog."""
    rows = [{"prompt": f"Q{i}: which animal?", "chosen": CHOSEN, "rejected": REJECTED} for i in range(24)]
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", rows)


def quick_train(steps: int, **overrides) -> dict:
    """A train section for runs of a few steps."""
    return {"steps": steps, "batch_size": 4, "lr": 1e-2, "min_lr": 1e-2, "schedule": "constant", "warmup_steps": 0,
            "eval_every": 0, "save_every": 0, "log_every": 1, "seed": 0, **overrides}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
