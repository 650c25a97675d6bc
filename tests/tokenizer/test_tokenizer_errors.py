"""Every user mistake raises LmforgeError with a one-line message saying what is wrong and what to do."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer, train_tokenizer


@contextmanager
def raises_one_line(match: str) -> Iterator[None]:
    """pytest.raises(LmforgeError) that also checks that the message is a single line."""
    with pytest.raises(LmforgeError, match=match) as info:
        yield
    assert "\n" not in str(info.value)


def test_missing_folder(tmp_path: Path) -> None:
    with raises_one_line(
        r"tokenizer folder .*nope does not exist; pass the folder that holds tokenizer.json"
    ):
        Tokenizer.from_dir(tmp_path / "nope")


def test_folder_without_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with raises_one_line(r"has no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_json_is_named(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE",', encoding="utf-8")
    with raises_one_line(r"tokenizer.json is not valid JSON \(.*line 1"):
        Tokenizer.from_dir(tmp_path)


def test_json_that_is_not_a_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"hello": "world"}', encoding="utf-8")
    with raises_one_line(r"tokenizer.json is not a tokenizer the `tokenizers` library can read"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_config_is_named(trained_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((trained_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{'single': 'quotes'}", encoding="utf-8")
    with raises_one_line(r"tokenizer_config.json is not valid JSON"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]", encoding="utf-8")
    with raises_one_line(r"tokenizer_config.json should hold a JSON object"):
        Tokenizer.from_dir(tmp_path)


def test_unknown_special_token_name(trained: Tokenizer) -> None:
    with raises_one_line(r"unknown special token names \['begin_token'\]"):
        Tokenizer(trained.backend, special_tokens={"begin_token": "<|bos|>"})


def test_training_input_does_not_exist(tmp_path: Path) -> None:
    with raises_one_line(r"training input .*missing.txt does not exist"):
        train_tokenizer([tmp_path / "missing.txt"], 300)


def test_folder_with_no_text_files(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "notes.txt").write_text("hidden", encoding="utf-8")
    with raises_one_line(r"folder .* has no text files; expected files ending in .*\.txt"):
        train_tokenizer([tmp_path], 300)


def test_no_inputs() -> None:
    with raises_one_line(r"no training inputs given"):
        train_tokenizer([], 300)


def test_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text(" \n\t\n" * 10, encoding="utf-8")
    (tmp_path / "empty.md").write_text("", encoding="utf-8")
    with raises_one_line(r"the training corpus \(.*blank.txt.*\) has no text"):
        train_tokenizer([tmp_path], 300)


def test_vocab_size_below_256(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("text", encoding="utf-8")
    with raises_one_line(r"vocab_size must be at least 256 \(one token per byte\), got 255"):
        train_tokenizer([tmp_path], 255)


def test_non_utf8_file(tmp_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    with raises_one_line(r"latin1.txt is not UTF-8 text .*convert it"):
        train_tokenizer([tmp_path], 300)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", r"bad.jsonl:2 is not valid JSON"),
        (json.dumps({"body": "x"}), r'bad.jsonl:2 has no "text" string'),
    ],
)
def test_bad_jsonl_line(tmp_path: Path, line: str, match: str) -> None:
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n", encoding="utf-8")
    with raises_one_line(match):
        train_tokenizer([tmp_path / "bad.jsonl"], 300)
