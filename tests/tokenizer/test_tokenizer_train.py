"""Training a byte-level BPE: lossless round trips, the id layout, the corpus reader, the chat default."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.tokenizer.bpe import SPECIAL_TOKENS, byte_to_unicode, corpus_files, iter_corpus

# Any Unicode scalar value (surrogates cannot be encoded), emoji, CJK, combining marks and controls included.
UNICODE_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)
TRICKY = [
    "",
    " ",
    "\x00\x01\x7f\x80\u200b\ufeff",
    "e\u0301\u0301 a\u0308 \u0915\u094d\u0937",
    "👨‍👩‍👧‍👦 🏳️‍🌈 🇯🇵 👍🏿",
    "日本語 中文 한국어 ไทย العربية עברית",
    "line\r\nline\rline\n\n\n  \t trailing  ",
    "<|im_start|>user\nnot really<|im_end|>",
    "\U0010ffff\U000e0001",
]


@settings(max_examples=300, deadline=None)
@given(UNICODE_TEXT)
def test_any_unicode_text_round_trips(trained: Tokenizer, text: str) -> None:
    assert trained.decode(trained.encode(text)) == text


def test_tricky_texts_round_trip(trained: Tokenizer) -> None:
    for text in TRICKY:
        ids = trained.encode(text)
        assert trained.decode(ids) == text
        assert all(0 <= i < trained.vocab_size for i in ids)


def test_merges_compress_the_training_text(trained: Tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    assert len(trained.encode(text)) < len(text.encode("utf-8")) / 2


def test_bytes_first_then_merges_then_specials(trained: Tokenizer) -> None:
    for byte, char in byte_to_unicode().items():
        assert trained.token_to_id(char) == byte
    assert trained.vocab_size == 400 + len(SPECIAL_TOKENS)
    assert [trained.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(400, 405))
    assert (trained.bos_id, trained.eos_id, trained.pad_id) == (400, 401, 402)
    assert trained.eot_id == trained.token_to_id("<|im_end|>") == 404
    assert trained.id_to_token(404) == "<|im_end|>"
    assert trained.id_to_token(10**6) is None


def test_byte_map_is_gpt2s() -> None:
    from tokenizers.pre_tokenizers import ByteLevel

    mapping = byte_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert set(mapping.values()) == set(ByteLevel.alphabet())
    assert mapping[ord("A")] == "A" and mapping[ord(" ")] == "Ġ" and mapping[ord("\n")] == "Ċ"


def test_vocab_256_is_a_pure_byte_tokenizer(byte_tokenizer: Tokenizer) -> None:
    text = "héllo 😀 日本"
    assert byte_tokenizer.encode(text) == list(text.encode("utf-8"))
    assert byte_tokenizer.encode(bytes(range(128)).decode("ascii")) == list(range(128))
    assert byte_tokenizer.vocab_size == 256 + len(SPECIAL_TOKENS)
    assert byte_tokenizer.token_to_id("<|bos|>") == 256
    assert byte_tokenizer.decode(list("€".encode())) == "€"


def test_special_tokens_are_atomic_and_bos_is_added_on_request(trained: Tokenizer) -> None:
    ids = trained.encode("<|im_start|>hi<|im_end|>")
    assert ids[0] == trained.token_to_id("<|im_start|>") and ids[-1] == trained.eot_id
    assert trained.encode("hi", add_special_tokens=True) == [trained.bos_id, *trained.encode("hi")]
    assert trained.decode(trained.encode("hi", add_special_tokens=True), skip_special_tokens=True) == "hi"
    assert trained.encode_batch(["a b", "日本"]) == [trained.encode("a b"), trained.encode("日本")]


def test_default_chat_template_is_chatml_with_one_bos(trained: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text = trained.apply_chat_template(messages, tokenize=False)
    assert text == "<|bos|><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    prompt = trained.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = trained.apply_chat_template(messages)
    assert ids.count(trained.bos_id) == 1 and ids[0] == trained.bos_id
    assert ids == trained.encode(text)


def test_corpus_files_recurse_skip_hidden_and_unknown_suffixes(tmp_path: Path) -> None:
    (tmp_path / "sub" / ".hidden").mkdir(parents=True)
    for name in ["a.txt", "sub/b.md", "sub/c.jsonl", "sub/.hidden/d.txt", ".e.txt", "f.bin", "g.PY"]:
        (tmp_path / name).write_text('{"text": "x"}\n', encoding="utf-8")
    found = [path.relative_to(tmp_path).as_posix() for path in corpus_files([tmp_path])]
    assert found == ["a.txt", "g.PY", "sub/b.md", "sub/c.jsonl"]
    # A file named explicitly is read whatever its suffix.
    assert corpus_files([tmp_path / "f.bin"]) == [tmp_path / "f.bin"]


def test_jsonl_uses_the_text_field_and_text_keeps_line_ends(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "first\r\n", "meta": 1}) + "\n\n" + json.dumps({"text": "second"}) + "\n",
        encoding="utf-8",
    )
    (tmp_path / "b.txt").write_bytes(b"one\r\ntwo\n")
    assert "".join(iter_corpus([tmp_path / "a.jsonl", tmp_path / "b.txt"])) == "first\r\nsecondone\r\ntwo\n"


def test_jsonl_only_corpus_learns_its_words(tmp_path: Path) -> None:
    lines = [json.dumps({"text": "zyzzyva quokka " * 3}) for _ in range(50)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines), encoding="utf-8")
    tokenizer = train_tokenizer([tmp_path], 300)
    assert tokenizer.encode("zyzzyva") == [tokenizer.token_to_id("zyzzyva")]
    assert tokenizer.token_to_id('"text"') is None


def test_training_is_deterministic(corpus_dir: Path, trained: Tokenizer) -> None:
    again = train_tokenizer([corpus_dir], 400, min_frequency=2)
    assert again.backend.to_str() == trained.backend.to_str()
