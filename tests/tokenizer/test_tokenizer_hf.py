"""Parity with transformers: loading HF tokenizer folders, and HF loading what lmforge saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_parity import assert_same_encoding, hf_pair, hf_tokenizer, transformers

from lmforge.tokenizer import Tokenizer

TEXTS = [
    "The quick brown fox.",
    "  leading and trailing spaces  ",
    "Grüße, 日本語, 😀👍🏽, e\u0301",
    "tabs\tand\r\nnewlines\n\n",
    "[CLS] <s> <|begin_of_text|> <|im_end|> specials in text",
    "UPPER lower MiXeD 12345 3.14",
    "",
]


@pytest.fixture(scope="module")
def hf_trained(trained_dir: Path):
    return hf_tokenizer(trained_dir)


def test_saved_tokenizer_loads_in_transformers(trained: Tokenizer, trained_dir: Path, hf_trained) -> None:
    assert isinstance(hf_trained, transformers.PreTrainedTokenizerFast)
    assert len(hf_trained) == trained.vocab_size
    assert hf_trained.bos_token_id == trained.bos_id
    assert hf_trained.eos_token_id == trained.eos_id
    assert hf_trained.pad_token_id == trained.pad_id
    assert hf_trained.chat_template == trained.chat_template
    assert_same_encoding(trained, hf_trained, TEXTS)
    direct = transformers.PreTrainedTokenizerFast.from_pretrained(str(trained_dir))
    assert_same_encoding(trained, direct, TEXTS[:3])


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(exclude_categories=("Cs",)), max_size=80))
def test_saved_tokenizer_encodes_like_transformers(trained: Tokenizer, hf_trained, text: str) -> None:
    ids = trained.encode(text, add_special_tokens=True)
    assert ids == hf_trained.encode(text)
    assert trained.decode(ids) == hf_trained.decode(ids)


def test_save_load_round_trip(trained: Tokenizer, trained_dir: Path) -> None:
    loaded = Tokenizer.from_dir(trained_dir)
    assert loaded.backend.to_str() == trained.backend.to_str()
    assert loaded.special_tokens == trained.special_tokens
    assert loaded.chat_template == trained.chat_template
    assert loaded.eot_id == trained.eot_id
    assert not list(trained_dir.glob(".*tmp"))  # no temporary files left behind
    assert Tokenizer.from_dir(trained_dir / "tokenizer.json").vocab_size == trained.vocab_size


def test_llama3_folder(llama3_dir: Path) -> None:
    ours, theirs = hf_pair(llama3_dir)
    assert ours.bos_token == "<|begin_of_text|>" and ours.eos_token == "<|eot_id|>"
    assert ours.eot_id == ours.token_to_id("<|eot_id|>")
    assert ours.model_max_length == 131072
    assert ours.encode("hi", add_special_tokens=True)[0] == ours.bos_id
    assert_same_encoding(ours, theirs, TEXTS)


def test_qwen_folder_takes_the_default_template(qwen_dir: Path) -> None:
    ours, theirs = hf_pair(qwen_dir)
    assert ours.chat_template is not None and ours.chat_template.startswith("{%- if tools %}")
    assert ours.bos_id is None and ours.eos_id == ours.eot_id == ours.token_to_id("<|im_end|>")
    assert ours.pad_id == ours.token_to_id("<|endoftext|>")
    assert_same_encoding(ours, theirs, TEXTS)


def test_bert_folder_adds_cls_and_sep(bert_dir: Path) -> None:
    ours, theirs = hf_pair(bert_dir)
    ids = ours.encode("Hello World", add_special_tokens=True)
    assert ids[0] == ours.token_to_id("[CLS]") and ids[-1] == ours.token_to_id("[SEP]")
    assert ours.pad_id == ours.token_to_id("[PAD]") and ours.bos_id is None
    assert ours.special_tokens["mask_token"] == "[MASK]"
    assert ours.eot_id is None and ours.chat_template is None
    assert_same_encoding(ours, theirs, TEXTS)


def test_sentencepiece_folder_with_byte_fallback(sentencepiece_dir: Path) -> None:
    ours, theirs = hf_pair(sentencepiece_dir)
    ids = ours.encode("日本")
    assert ours.id_to_token(ids[-1]).startswith("<0x")
    assert ours.decode(ids) == "日本"
    assert_same_encoding(ours, theirs, TEXTS)


@pytest.mark.parametrize("fixture", ["llama3_dir", "qwen_dir", "bert_dir", "sentencepiece_dir"])
def test_resaved_folders_load_in_transformers(fixture: str, request, tmp_path: Path) -> None:
    ours = Tokenizer.from_dir(request.getfixturevalue(fixture))
    ours.save(tmp_path)
    theirs = hf_tokenizer(tmp_path)
    assert len(theirs) == ours.vocab_size
    assert theirs.chat_template == ours.chat_template
    assert_same_encoding(ours, theirs, TEXTS)
    assert Tokenizer.from_dir(tmp_path).special_tokens == ours.special_tokens


def test_chat_template_jinja_file_wins(trained_dir: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((trained_dir / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ 'from the file' }}", encoding="utf-8")
    ours = Tokenizer.from_dir(tmp_path)
    assert ours.chat_template == hf_tokenizer(tmp_path).chat_template == "{{ 'from the file' }}"
    # Saving keeps the file in step with the template, so transformers reads the same one.
    loaded = Tokenizer.from_dir(trained_dir)
    loaded.save(tmp_path)
    assert hf_tokenizer(tmp_path).chat_template == loaded.chat_template


def test_special_token_missing_from_vocab_is_added_like_transformers(
    trained_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "tokenizer.json").write_bytes((trained_dir / "tokenizer.json").read_bytes())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "eos_token": "<|eos|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours, theirs = hf_pair(tmp_path)
    assert ours.token_to_id("<unk>") == theirs.unk_token_id == ours.vocab_size - 1
    assert_same_encoding(ours, theirs, ["a <unk> b"])
