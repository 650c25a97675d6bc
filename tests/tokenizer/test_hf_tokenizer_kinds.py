"""Every kind of HF tokenizer, built locally and saved as a model folder, reads as transformers reads it.

Each kind is loaded by lmforge and by `transformers.AutoTokenizer` from the same folder: the ids agree with
and without special tokens on a corpus of tricky strings, and decoding agrees, with and without skipping
special tokens. Byte-level and byte-fallback kinds also round-trip any text exactly.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from tokenizer_parity import TRICKY_TEXTS, assert_same_encoding, hf_pair, with_added_tokens

from lmforge.tokenizer import Tokenizer

KINDS = {
    "gpt2_dir": "byte-level BPE, GPT-2",
    "llama3_dir": "byte-level BPE, Llama 3",
    "qwen_dir": "byte-level BPE, Qwen 2.5 (NFC, its own split regex)",
    "bert_dir": "WordPiece, BERT uncased",
    "bert_cased_dir": "WordPiece, BERT cased, clean_up_tokenization_spaces",
    "sentencepiece_dir": "Metaspace BPE with byte fallback, Llama 2 / Mistral, add_bos_token",
    "t5_dir": "Unigram, T5 with extra ids",
}


def added_contents(tokenizer: Tokenizer) -> list[str]:
    return sorted({token.content for token in tokenizer.backend.get_added_tokens_decoder().values()})


@pytest.mark.parametrize("fixture", list(KINDS))
def test_ids_and_text_match_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(fixture)
    ours, theirs = hf_pair(folder)
    assert len(theirs) == ours.vocab_size
    assert {name: str(token) for name, token in theirs.special_tokens_map.items()} == ours.special_tokens
    assert_same_encoding(ours, theirs, with_added_tokens(added_contents(ours)))


@pytest.mark.parametrize("fixture", ["gpt2_dir", "llama3_dir", "qwen_dir", "sentencepiece_dir"])
def test_byte_kinds_round_trip_text(fixture: str, request: pytest.FixtureRequest) -> None:
    """Byte-level and byte-fallback vocabularies have no unknown token: decode(encode(text)) is the text.

    Up to each tokenizer's own rules, which transformers shares: Qwen normalizes to NFC first, and the
    Metaspace pre-tokenizer (prepend_scheme "first") adds no "▁" before text that starts with a space,
    so its decoder's strip of one leading space eats one of the text's own.
    """
    ours = Tokenizer.from_dir(request.getfixturevalue(fixture))
    for text in TRICKY_TEXTS:
        expected = unicodedata.normalize("NFC", text) if fixture == "qwen_dir" else text
        if fixture == "sentencepiece_dir" and text.startswith(" "):
            expected = text[1:]
        assert ours.decode(ours.encode(text)) == expected
