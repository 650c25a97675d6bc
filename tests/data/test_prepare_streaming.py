"""prepare streams: memory bounded by the chunk size whatever the corpus size, giant lines included."""

from __future__ import annotations

import tracemalloc

import pytest

from lmforge.data import TokenShards, prepare
from lmforge.data.pieces import LONG_LINE_CHUNKS
from lmforge.tokenizer import train_tokenizer

CHUNK = 1024
SMALL, LARGE = 256 * 1024, 2 * 1024 * 1024


class Bytes:
    """UTF-8 bytes as ids; records the longest text it was asked to encode."""

    vocab_size, eos_id, bos_id = 257, 256, None

    def __init__(self) -> None:
        self.longest = 0

    def encode(self, text: str) -> list[int]:
        self.longest = max(self.longest, len(text))
        return list(text.encode())


def corpus_text(kind: str, size: int) -> str:
    """`size` bytes of text: ordinary lines, one line with spaces, or one run with no whitespace at all."""
    unit = {"lines": "the quick brown fox jumps over the lazy dog\n", "one line": "words without a break ",
            "no whitespace": "é€x"}[kind]
    return unit * (size // len(unit.encode()))


def peak_bytes(tmp_path, name: str, text: str, workers: int) -> int:
    path = tmp_path / f"{name}.txt"
    path.write_text(text)
    tracemalloc.start()
    try:
        prepare([path], Bytes(), tmp_path / name, chunk_bytes=CHUNK, val_fraction=0, workers=workers)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(("kind", "workers"), [("lines", 1), ("one line", 1), ("no whitespace", 1), ("lines", 2)])
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path, kind, workers):
    peak_bytes(tmp_path, "warm", corpus_text(kind, SMALL), workers)  # one-time allocations (imports, the pool)
    small = peak_bytes(tmp_path, "small", corpus_text(kind, SMALL), workers)
    large = peak_bytes(tmp_path, "large", corpus_text(kind, LARGE), workers)
    assert TokenShards.open(tmp_path / "large").n_tokens == len(corpus_text(kind, LARGE).encode()) + 1
    assert large < 1.25 * small + 64 * 1024, (small, large)  # 8x the corpus, about the same peak
    assert large < LARGE / 4, large  # far below the corpus: never held whole


@pytest.mark.parametrize("kind", ["one line", "no whitespace"])
def test_a_giant_line_is_cut_into_bounded_pieces(tmp_path, kind):
    text = corpus_text(kind, 64 * CHUNK)
    path = tmp_path / "giant.txt"
    path.write_text(text)
    tokenizer = Bytes()
    prepare([path], tokenizer, tmp_path / "out", chunk_bytes=CHUNK, val_fraction=0)
    shards = TokenShards.open(tmp_path / "out")
    assert shards.read(0, shards.n_tokens).tolist() == [*text.encode(), 256]  # no character split at a cut
    assert tokenizer.longest <= (LONG_LINE_CHUNKS + 1) * CHUNK


def test_a_giant_line_cut_at_spaces_encodes_as_the_whole_file_with_byte_level_bpe(tmp_path):
    text = "".join(f"word{i}  and\tmore, {i * 7}!  " for i in range(3000))  # one line, mixed whitespace
    path = tmp_path / "line.txt"
    path.write_text(text)
    tokenizer = train_tokenizer([path], 400)
    prepare([path], tokenizer, tmp_path / "out", chunk_bytes=256, val_fraction=0)
    shards = TokenShards.open(tmp_path / "out")
    expected = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
    assert shards.read(0, shards.n_tokens).tolist() == expected


@pytest.mark.parametrize("chunk_bytes", [5, 64, 1000, 1 << 20])
def test_the_tail_split_and_the_stream_do_not_depend_on_the_chunk_size(tmp_path, chunk_bytes):
    text = "".join(f"{'word ' * (i % 13)}line {i}\r\n" + "\n" * (i % 3) for i in range(300))
    path = tmp_path / "a.txt"
    path.write_text(text, newline="")
    prepare([path], Bytes(), tmp_path / "out", chunk_bytes=chunk_bytes, val_fraction=0.1)
    cut = text.index("\n", int(len(text) * 0.9) - 1) + 1  # the first line start at or past the mark
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        shards = TokenShards.open(tmp_path / "out", split)
        assert shards.read(0, shards.n_tokens).tolist() == [*part.encode(), 256]
