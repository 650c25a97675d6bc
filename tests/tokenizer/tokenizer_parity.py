"""Parity helpers: lmforge's `Tokenizer` and transformers' `AutoTokenizer` on the same HF folder.

The corpus holds what breaks tokenizers in practice: Unicode (emoji with modifiers and joiners, CJK,
combining marks, unusual spaces), whitespace runs, tabs and newlines, the kind's own added tokens inside
text, and an input of several thousand characters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from lmforge.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TRICKY_TEXTS = [
    "The cat sits on the mat.",
    "  leading and trailing spaces  ",
    "runs    of     spaces\t\ttabs\n\n\nnewlines\r\nand a lone \r here",
    "Grüße aus München! Ça va très bien, merci. ¿Qué tal?",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Emoji: 😀 👍🏽 👨‍👩‍👧 🇫🇷 — and math: ∑ x² ≤ ∞.",
    "Combining: e\u0301 a\u0308 n\u0303; Zalgo: Z\u0351\u0352o\u0353",
    "odd spaces:\u00a0nbsp\u2003em\u200bzero-width\u3000ideographic",
    "UPPER lower MiXeD 12345 3.14 don't won't it's we're I'm",
    "",
    " ",
    "\n",
    ("The quick brown fox jumps over the lazy dog. 日本語 😀 naïve café\n\t" * 60).strip(),
]


def hf_tokenizer(folder: Path):
    """transformers' tokenizer for an HF folder, loaded the way a user loads it."""
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def hf_pair(folder: Path) -> tuple[Tokenizer, Any]:
    """lmforge's and transformers' tokenizers for the same folder."""
    return Tokenizer.from_dir(folder), hf_tokenizer(folder)


def with_added_tokens(tokens: Iterable[str]) -> list[str]:
    """The corpus plus texts with each added token inside words, between spaces and at both ends."""
    inside = [f"{token}start a{token}b mid {token} end{token}" for token in tokens]
    return [*TRICKY_TEXTS, *inside, "".join(tokens)]


def assert_same_encoding(ours: Tokenizer, theirs, texts: Iterable[str]) -> None:
    """Same ids with and without special tokens; same text back with and without skipping them."""
    for text in texts:
        plain = ours.encode(text)
        assert plain == theirs.encode(text, add_special_tokens=False), text
        special = ours.encode(text, add_special_tokens=True)
        assert special == theirs.encode(text, add_special_tokens=True), text
        for ids in (plain, special):
            assert ours.decode(ids) == theirs.decode(ids), text
            assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(
                ids, skip_special_tokens=True
            ), text


def assert_same_chat(ours: Tokenizer, theirs, messages: list[dict], **extra: Any) -> None:
    """The same rendered text and ids, with and without the generation prompt."""
    for add_generation_prompt in (False, True):
        text = ours.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False, **extra
        )
        expected = theirs.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False, **extra
        )
        assert text == expected
        ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **extra)
        expected_ids = theirs.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, return_dict=False, **extra
        )
        assert ids == list(expected_ids)


def copy_folder(
    source: Path, target: Path, config: Mapping[str, Any] | None = None, **json_edits: Any
) -> Path:
    """`source`'s tokenizer.json (top-level keys replaced by `json_edits`) with `config` (else source's)."""
    state = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    state.update(json_edits)
    target.mkdir(parents=True, exist_ok=True)
    (target / "tokenizer.json").write_text(json.dumps(state), encoding="utf-8")
    if config is None:
        config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    (target / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return target
