"""The incremental detokenizer never splits a character and its pieces join to decode(ids)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.tokenizer import IncrementalDetokenizer, Tokenizer

TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\ufffd"), max_size=120)


def stream(tokenizer: Tokenizer, ids: list[int], *, skip_special_tokens: bool = False) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    return [detok.push(token) for token in ids] + [detok.flush()]


@pytest.fixture(scope="module")
def sentencepiece(sentencepiece_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(sentencepiece_dir)


@settings(max_examples=150, deadline=None)
@given(TEXT)
def test_byte_level_pieces_join_to_the_text(trained: Tokenizer, text: str) -> None:
    pieces = stream(trained, trained.encode(text))
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)  # no half characters, ever


@settings(max_examples=150, deadline=None)
@given(TEXT)
def test_byte_fallback_pieces_join_to_the_text(sentencepiece: Tokenizer, text: str) -> None:
    ids = sentencepiece.encode(text)
    pieces = stream(sentencepiece, ids)
    assert "".join(pieces) == sentencepiece.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_id_sequence_joins_to_decode(trained: Tokenizer, data: st.DataObject) -> None:
    """Even ids no tokenizer would produce (stray continuation bytes, specials anywhere) stream exactly."""
    ids = data.draw(st.lists(st.integers(0, trained.vocab_size - 1), max_size=60))
    for skip in (False, True):
        assert "".join(stream(trained, ids, skip_special_tokens=skip)) == trained.decode(
            ids, skip_special_tokens=skip
        )


def test_multibyte_characters_split_across_byte_tokens(byte_tokenizer: Tokenizer) -> None:
    text = "é日😀x"
    ids = byte_tokenizer.encode(text)
    assert len(ids) == 2 + 3 + 4 + 1
    assert stream(byte_tokenizer, ids) == ["", "é", "", "", "日", "", "", "", "😀", "x", ""]


def test_byte_fallback_characters_and_spaces(sentencepiece: Tokenizer) -> None:
    text = "The 日本 fox"
    ids = sentencepiece.encode(text)
    assert sum(sentencepiece.id_to_token(i).startswith("<0x") for i in ids) == 6
    pieces = stream(sentencepiece, ids)
    assert "".join(pieces) == text and "日" in pieces and "\ufffd" not in "".join(pieces)


def test_flush_emits_an_unfinished_character(byte_tokenizer: Tokenizer) -> None:
    ids = byte_tokenizer.encode("a😀")[:3]  # "a" and half of the emoji
    detok = IncrementalDetokenizer(byte_tokenizer)
    assert [detok.push(i) for i in ids] == ["a", "", ""]
    assert detok.flush() == byte_tokenizer.decode(ids)[1:] == "\ufffd"
    assert detok.push(ord("b")) == "b"


def test_special_tokens_are_kept_or_skipped(trained: Tokenizer) -> None:
    ids = trained.encode("hi<|im_end|>")
    assert "".join(stream(trained, ids)) == "hi<|im_end|>"
    assert "".join(stream(trained, ids, skip_special_tokens=True)) == "hi"
