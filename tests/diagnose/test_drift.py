"""Drift: identical corpora read as no drift; shifted ones as drift, ordered by how far they moved."""

from __future__ import annotations

from collections import Counter

import pytest

from lmforge.diagnose.corpus import load_tokenizer, read_corpus
from lmforge.diagnose.drift import compare_corpora, js_divergence, ks_distance, perplexity


def test_divergence_bounds_and_length_distance():
    assert js_divergence(Counter(a=3, b=1), Counter(a=6, b=2)) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence(Counter(a=5), Counter(b=5)) == pytest.approx(1.0)
    assert 0 < js_divergence(Counter(a=1, b=1), Counter(a=1, b=3)) < 1
    assert ks_distance([1, 2, 3], [1, 2, 3]) == 0.0
    assert ks_distance([1, 1, 1], [5, 5, 5]) == 1.0


@pytest.mark.parametrize("with_tokenizer", [False, True])
def test_identical_corpora_no_drift(corpora, english_tokenizer, with_tokenizer):
    tokenizer = load_tokenizer(english_tokenizer) if with_tokenizer else None
    report = compare_corpora(read_corpus(corpora["english"]), read_corpus(corpora["english"]), tokenizer)
    assert report.js_divergence == pytest.approx(0.0, abs=1e-9)
    assert report.new_token_rate == 0.0 and report.length_ks == 0.0
    assert report.verdict == "no drift"
    assert report.lines()[-1].startswith("verdict: no drift")


def test_shift_is_ordered(corpora, english_tokenizer):
    tokenizer = load_tokenizer(english_tokenizer)
    ref = read_corpus(corpora["english"])
    reports = {name: compare_corpora(ref, read_corpus(corpora[name]), tokenizer)
               for name in ("english2", "reviews", "french")}
    assert reports["english2"].verdict == "no drift"  # another sample of the same source
    assert reports["reviews"].verdict in ("drift", "strong drift")
    assert reports["french"].verdict == "strong drift"
    jsd = [reports[name].js_divergence for name in ("english2", "reviews", "french")]
    assert jsd == sorted(jsd) and jsd[0] < 0.02 < jsd[1]
    french = reports["french"]
    assert french.new.fallback_rate > 0 == french.reference.fallback_rate  # accents the English BPE never merged
    assert french.new_token_rate > reports["reviews"].new_token_rate > 0
    assert french.new.median_length != french.reference.median_length or french.length_ks > 0
    reviews = reports["reviews"]
    assert reviews.length_ks > 0.3 and reviews.new.median_length < reviews.reference.median_length  # shorter lines


def test_moved_tokens_name_the_shift(corpora):
    report = compare_corpora(read_corpus(corpora["english"]), read_corpus(corpora["french"]))
    moved = {m.token: m for m in report.moved}
    assert "le" in moved and moved["le"].reference_share == 0 < moved["le"].new_share
    assert "the" in moved and moved["the"].new_share == 0 < moved["the"].reference_share


def test_perplexity_is_higher_off_distribution(corpora, tiny_lm_dir):
    import lmforge

    lm = lmforge.load(tiny_lm_dir)
    value = perplexity(lm.model, lm.tokenizer, read_corpus(corpora["english"]), max_tokens=300)
    assert 1 < value < 2 * lm.tokenizer.vocab_size  # a random tiny model: near uniform, finite


def test_drift_cli_writes_picture_and_verdict(run_verb, corpora, english_tokenizer, tmp_path):
    code, out, err = run_verb("drift", corpora["english"], corpora["french"], "--tokenizer", english_tokenizer,
                         "--plot", tmp_path / "drift.png")
    assert code == 0, err
    assert "verdict: strong drift" in out
    assert (tmp_path / "drift.png").read_bytes()[:4] == b"\x89PNG"


def test_drift_cli_bad_input(run_verb, corpora, tmp_path):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = [(tmp_path / "missing.txt", "does not exist"), (binary, "not UTF-8"), (empty, "holds no text")]
    for path, message in cases:
        code, _, err = run_verb("drift", corpora["english"], path, "--plot", tmp_path / "x.png")
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.png").exists()
    code, _, err = run_verb("drift", corpora["english"], corpora["french"], "--tokenizer", tmp_path)
    assert code == 2 and "has no tokenizer.json" in err
    code, out, _ = run_verb("drift", "--help")
    assert code == 0 and "--model" in out and "--tokenizer" in out


def test_drift_cli_with_a_model_reports_perplexity(run_verb, corpora, tiny_lm_dir, tmp_path):
    code, out, err = run_verb("drift", corpora["english"], corpora["french"], "--model", tiny_lm_dir,
                              "--plot", tmp_path / "drift.png")
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("perplexity")).split()
    assert len(row) == 3 and all(float(v) > 1 for v in row[1:])
    assert "verdict:" in out.splitlines()[-2]  # counted in the model's tokens
