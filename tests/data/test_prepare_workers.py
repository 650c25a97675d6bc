"""prepare(workers=N): the same output as workers=1, the same errors, nothing left behind, no hang."""

from __future__ import annotations

import json
import os
import time

import pytest

from lmforge.cli.main import main
from lmforge.data import prepare
from lmforge.errors import LmforgeError
from lmforge.tokenizer import train_tokenizer

PROSE = "".join(f"Line {i}: the quick brown fox, {i * 37} times;\n  indented\n\n" for i in range(400))


class DiesOnBoom:
    """Bytes as ids; the process encoding a text with "boom" in it exits at once (a killed worker)."""

    vocab_size, eos_id, bos_id = 257, 256, None

    def encode(self, text: str) -> list[int]:
        if "boom" in text:
            os._exit(3)
        return list(text.encode())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two text files and a JSONL file (blank lines included), and a byte-level BPE trained on them."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text(PROSE)
    (root / "b.md").write_text(PROSE[::-1])
    rows = [json.dumps({"text": f"row {i}: " + "é words and more words " * (i % 7)}) for i in range(300)]
    (root / "c.jsonl").write_text("\n".join(rows[:100]) + "\n\n" + "\n".join(rows[100:]) + "\n")
    tokenizer = train_tokenizer([root / "a.txt", root / "b.md"], 320)
    return root, tokenizer


def folder_bytes(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.parametrize("val_split", ["tail", "documents"])
def test_two_workers_write_the_same_bytes_as_one(tmp_path, corpus, val_split):
    root, tokenizer = corpus
    inputs = [root / "a.txt", root / "c.jsonl", root / "b.md"]
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        stats = prepare(inputs, tokenizer, out, val_fraction=0.2, val_split=val_split, chunk_bytes=512,
                        shard_tokens=5000, workers=workers)
        outputs.append(folder_bytes(out))
    assert stats.train.shards > 2 and stats.val.tokens > 0 and stats.train.documents > 100
    assert outputs[0] == outputs[1]  # every shard and meta.json, byte for byte


def test_a_bad_row_gives_the_same_error_and_keeps_the_previous_output(tmp_path, corpus):
    root, tokenizer = corpus
    rows = [json.dumps({"text": f"row {i}"}) for i in range(2000)]
    rows[1500] = '{"text": "cut off'
    bad = tmp_path / "in" / "bad.jsonl"
    bad.parent.mkdir()
    bad.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    prepare([root / "a.txt"], tokenizer, out)
    before = folder_bytes(out)
    messages = []
    for workers in (1, 2):
        with pytest.raises(LmforgeError, match=r"bad\.jsonl line 1501 is not valid JSON") as error:
            prepare([bad], tokenizer, out, chunk_bytes=64, workers=workers)
        messages.append(str(error.value))
    assert messages[0] == messages[1] and "\n" not in messages[0]
    assert folder_bytes(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_an_interrupt_stops_the_workers_and_leaves_no_output(tmp_path, corpus):
    root, tokenizer = corpus

    def interrupt(_n_bytes):
        raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        prepare([root / "a.txt", root / "b.md"], tokenizer, tmp_path / "out", chunk_bytes=256, workers=2,
                progress=interrupt)
    assert time.monotonic() - start < 60 and list(tmp_path.iterdir()) == []


def test_a_worker_that_dies_is_a_one_line_error(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("fine text\n" * 50 + "boom\n" + "fine text\n" * 50)
    with pytest.raises(LmforgeError, match="worker process stopped unexpectedly"):
        prepare([path], DiesOnBoom(), tmp_path / "out", chunk_bytes=64, val_fraction=0, workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


@pytest.mark.parametrize("workers", [0, -2, 1.5])
def test_workers_must_be_a_positive_whole_number(tmp_path, corpus, workers):
    root, tokenizer = corpus
    with pytest.raises(LmforgeError, match="workers must be a whole number of at least 1"):
        prepare([root / "a.txt"], tokenizer, tmp_path / "out", workers=workers)
    assert not (tmp_path / "out").exists()


def test_the_command_refuses_zero_workers_in_one_line(tmp_path, corpus, capsys):
    root, tokenizer = corpus
    tokenizer.save(tmp_path / "tok")
    code = main(["prepare", str(root / "a.txt"), "--tokenizer", str(tmp_path / "tok"), "--out",
                 str(tmp_path / "out"), "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lmforge: error: workers must be") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
