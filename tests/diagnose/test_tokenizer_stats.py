"""Tokenizer statistics: fertility, fallbacks, vocabulary usage and the side-by-side report."""

from __future__ import annotations

import pytest

from lmforge.diagnose.corpus import load_tokenizer, read_corpus
from lmforge.diagnose.tokenizer_stats import script_of, stats_table, tokenizer_stats
from lmforge.tokenizer import train_tokenizer


def test_english_tokenizer_fares_worse_on_french(corpora, english_tokenizer):
    english, french = read_corpus(corpora["english"]), read_corpus(corpora["french"])
    stats = tokenizer_stats(load_tokenizer(english_tokenizer), [english, french], "en")
    en, fr = stats.files
    assert en.n_fallback == 0 < fr.n_fallback  # é, è, à are two bytes with no merge
    assert fr.tokens_per_word > 1.5 * en.tokens_per_word
    assert fr.tokens_per_byte > en.tokens_per_byte
    assert en.n_tokens == sum(len(ids) for ids in load_tokenizer(english_tokenizer).encode_batch(english.documents))
    assert 0 < stats.never_used_share < 1 and stats.n_used <= stats.vocab_size
    assert all(not t.startswith("<|") for t in stats.longest)  # special tokens are not learned pieces
    assert list(stats.scripts) == ["LATIN"]


def test_byte_tokenizer_has_one_token_per_byte(corpora, tmp_path):
    french = read_corpus(corpora["french"])
    stats = tokenizer_stats(train_tokenizer([corpora["english"]], vocab_size=256), [french])
    file = stats.files[0]
    assert file.tokens_per_byte == pytest.approx(1.0)
    non_ascii = sum(len(c.encode()) for d in french.documents for c in d if ord(c) >= 128)
    assert file.n_fallback == non_ascii


def test_scripts():
    assert [script_of(w) for w in ("chat", "кот", "猫", "123", "été")] == ["LATIN", "CYRILLIC", "CJK", None, "LATIN"]


def test_side_by_side_and_cli(run_verb, corpora, english_tokenizer, tmp_path):
    other = tmp_path / "fr_tok"
    train_tokenizer([corpora["french"]], vocab_size=300).save(other)
    code, out, err = run_verb("tokenizer", "stats", english_tokenizer, corpora["english"], corpora["french"],
                         "--compare", other, "--plot", tmp_path / "stats.png")
    assert code == 0, err
    assert "french.txt" in out and "tokens per word" in out and "longest tokens of" in out
    assert (tmp_path / "stats.png").read_bytes()[:4] == b"\x89PNG"
    fr_row = [line for line in out.splitlines() if "fallback" in line][1].split()
    assert float(fr_row[-2].rstrip("%")) > float(fr_row[-1].rstrip("%"))  # English BPE falls back more on French


def test_stats_table_lists_every_file(corpora, english_tokenizer):
    stats = tokenizer_stats(load_tokenizer(english_tokenizer), [read_corpus(corpora[n]) for n in ("english", "reviews")])
    lines = stats_table([stats])
    assert sum("bytes," in line for line in lines) == 2


def test_stats_cli_bad_input(run_verb, corpora, english_tokenizer, tmp_path):
    code, _, err = run_verb("tokenizer", "stats", tmp_path / "nope", corpora["english"], "--plot", tmp_path / "x.png")
    assert code == 2 and "has no tokenizer.json" in err and err.count("\n") == 1
    code, _, err = run_verb("tokenizer", "stats", english_tokenizer, tmp_path / "missing.txt", "--plot", tmp_path / "x.png")
    assert code == 2 and "does not exist" in err
    bad_json = tmp_path / "rows.jsonl"
    bad_json.write_text('{"text": "fine"}\n{not json\n')
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x81" * 5)
    for path, message in ((bad_json, "rows.jsonl line 2"), (binary, "not UTF-8")):
        code, _, err = run_verb("tokenizer", "stats", english_tokenizer, path, "--plot", tmp_path / "x.png")
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.png").exists()
    code, out, _ = run_verb("tokenizer", "stats", "--help")
    assert code == 0 and "--compare" in out
