"""`lmforge doctor MODEL`: tokenizer round trip, special tokens, chat template and assistant mask."""

from __future__ import annotations

from pathlib import Path

from lmforge.cli.main import main
from lmforge.diagnose.model_check import tokenizer_checks
from lmforge.tokenizer import Tokenizer


def test_a_good_tokenizer_passes_every_check(tiny_tokenizer) -> None:
    checks = {c.name: c for c in tokenizer_checks(tiny_tokenizer, tiny_tokenizer.vocab_size)}
    assert set(checks) == {"round trip", "special tokens", "chat template", "assistant mask"}
    assert all(c.ok for c in checks.values()), checks
    assert "Four." in checks["assistant mask"].detail


def test_each_broken_part_fails_its_check(tmp_path: Path, tiny_tokenizer) -> None:
    too_small = {c.name: c for c in tokenizer_checks(tiny_tokenizer, tiny_tokenizer.vocab_size - 10)}
    assert not too_small["special tokens"].ok and "embeddings" in too_small["special tokens"].detail
    tiny_tokenizer.save(tmp_path / "tok")
    drops_replies = Tokenizer.from_dir(tmp_path / "tok")
    drops_replies._chat_template = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    checks = {c.name: c for c in tokenizer_checks(drops_replies, drops_replies.vocab_size)}
    assert not checks["chat template"].ok and "Four." in checks["chat template"].detail
    assert not checks["assistant mask"].ok and "SFT would learn nothing" in checks["assistant mask"].detail
    fails = Tokenizer.from_dir(tmp_path / "tok")
    fails._chat_template = "{{ raise_exception('roles must alternate') }}"
    assert [(c.name, c.ok) for c in tokenizer_checks(fails, fails.vocab_size)][-1] == ("chat template", False)


def test_doctor_model_prints_the_summary_and_checks(tiny_lm_dir: Path, capsys) -> None:
    assert main(["doctor", str(tiny_lm_dir)]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "ok   round trip" in out and "ok   assistant mask" in out
