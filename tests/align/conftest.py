"""Fixtures for the alignment tests (the tiny model and tokenizer come from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _align_helpers import CHOSEN, REJECTED, write_jsonl


@pytest.fixture(scope="session")
def prefs_file(tmp_path_factory) -> Path:
    """24 pairs that all prefer the fox to the dog."""
    rows = [{"prompt": f"Q{i}: which animal?", "chosen": CHOSEN, "rejected": REJECTED} for i in range(24)]
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", rows)


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every test here runs on one torch thread (see tests/conftest.py)."""
