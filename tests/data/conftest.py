"""Fixtures for the data tests: a tiny byte-level tokenizer and corpus builders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


class ByteTokenizer:
    """UTF-8 bytes -> ids `offset + byte`; eos and bos follow the 256 byte ids."""

    def __init__(
        self, *, offset: int = 0, eos: bool = True, bos: bool = False, fail_after: int | None = None
    ):
        self.offset = offset
        self.eos_id: int | None = offset + 256 if eos else None
        self.bos_id: int | None = offset + 257 if bos else None
        self.vocab_size = offset + 258
        self.calls = 0
        self.fail_after = fail_after  # raise on this many-th call, to simulate a crash mid-prepare

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("tokenizer crashed")
        return [self.offset + b for b in text.encode("utf-8")]

    def expected(self, *documents: str) -> list[int]:
        """The token stream prepare should write for `documents`, in order."""
        stream: list[int] = []
        for text in documents:
            stream += [self.bos_id] if self.bos_id is not None else []
            stream += self.encode(text)
            stream += [self.eos_id] if self.eos_id is not None else []
        return stream


@pytest.fixture
def tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture
def make_tokenizer() -> Callable[..., ByteTokenizer]:
    return ByteTokenizer


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    """write(relative_path, text) -> the path of a new file under tmp_path (parents created)."""

    def _write(relative: str, text: str) -> Path:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    return _write
