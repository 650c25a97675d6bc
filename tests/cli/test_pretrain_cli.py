"""`lmforge tokenizer train` → `prepare` → `pretrain`, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import lmforge

CONFIG = Path(__file__).parents[2] / "configs" / "shakespeare-char.yaml"
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 300


def lmforge_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    (root / "corpus.txt").write_text(TEXT)
    out = lmforge_cli("tokenizer", "train", root / "corpus.txt", "--vocab-size", "256", "--out", root / "tok")
    assert out.returncode == 0, out.stderr
    out = lmforge_cli("prepare", root / "corpus.txt", "--tokenizer", root / "tok", "--out", root / "data", "--eval-fraction", "0.1")
    assert out.returncode == 0, out.stderr
    return root / "data"


def pretrain(shards, out_dir, *extra):
    return lmforge_cli("pretrain", "--config", CONFIG, "--data.shards", shards, "--out-dir", out_dir,
                       "--train.steps", "30", "--train.batch_size", "4", "--train.eval_every", "10", "--train.eval_batches", "2",
                       "--train.save_every", "10", "--train.lr", "3e-3", "--train.warmup_steps", "5", "--model.n_layers", "2",
                       *extra, cwd=None)


def test_pretrain_end_to_end(shards, tmp_path):
    out = pretrain(shards, tmp_path / "run")
    assert out.returncode == 0, out.stderr
    run = tmp_path / "run"
    assert (run / "loss.png").stat().st_size > 1000
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5  # it learns the repeated verse
    assert "eval_bpb" in evals[-1]
    lm = lmforge.load(run)
    assert lm.config.n_layers == 2 and lm.tokenizer is not None
    text = lm.generate("To be", max_new_tokens=10, temperature=0)
    assert text and text == lm.generate("To be", max_new_tokens=10, temperature=0)  # greedy is deterministic
    assert len(lm.tokenizer.encode(text)) <= 10


def test_resume_with_a_different_shape_is_one_line(shards, tmp_path):
    assert pretrain(shards, tmp_path / "run").returncode == 0
    out = pretrain(shards, tmp_path / "run", "--model.dim", "64", "--train.steps", "40", "--train.resume", "auto")
    assert out.returncode == 2
    assert out.stderr.startswith("lmforge: error:") and out.stderr.count("\n") == 1 and "shape" in out.stderr


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        (lambda p: (p / "empty.txt").write_text("   \n"), "empty"),
        (lambda p: (p / "only.bin").write_bytes(b"\x00\x01"), "no text files"),
    ],
)
def test_bad_corpus_is_one_line(tmp_path, setup, needle):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    setup(corpus)
    out = lmforge_cli("tokenizer", "train", corpus, "--vocab-size", "300", "--out", tmp_path / "tok")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and needle in out.stderr, out.stderr
    assert not (tmp_path / "tok").exists()


def test_help_documents_every_key():
    out = lmforge_cli("pretrain", "--help")
    assert out.returncode == 0
    for flag in ("--model.n_kv_heads", "--model.sliding_window", "--data.shards", "--train.grad_accum", "--train.resume"):
        assert flag in out.stdout
    assert "grouped-query" in out.stdout or "key/value heads" in out.stdout


def test_bad_override_value_is_one_line():
    out = lmforge_cli("pretrain", "--train.steps", "many")
    assert out.returncode == 2 and "--train.steps expects a int" in out.stderr


def test_shards_from_another_tokenizer_are_one_line(shards, tmp_path):
    (tmp_path / "other.txt").write_text("completely different words " * 200)
    assert lmforge_cli("tokenizer", "train", tmp_path / "other.txt", "--vocab-size", "300", "--out", tmp_path / "tok").returncode == 0
    out = pretrain(shards, tmp_path / "run", "--data.tokenizer", tmp_path / "tok")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "was prepared with a different tokenizer" in out.stderr and not (tmp_path / "run").exists()



@pytest.mark.parametrize(("rank", "printed"), [(None, True), ("0", True), ("1", False)])
def test_a_training_verb_prints_once_under_torchrun(tmp_path, monkeypatch, capsys, rank, printed):
    """Under torchrun every rank runs the verb (RANK set by torchrun); only rank 0 prints its reports and summary."""
    from types import SimpleNamespace

    from lmforge.cli import data_tools
    from lmforge.cli import train as cli_train
    from lmforge.cli.main import main

    sections, _ = cli_train._recipe_verb("pretrain")

    def run(recipe, progress, report):
        assert progress is printed
        report("a report line")
        return SimpleNamespace(summary=lambda: "done: 2 steps")

    monkeypatch.setattr(cli_train, "_recipe_verb", lambda name: (sections, run))
    monkeypatch.setattr(data_tools, "refuse_if_too_big", lambda recipe: None)
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    assert main(["pretrain", "--config", str(CONFIG), "--out-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert ("a report line" in out, "done: 2 steps" in out) == (printed, printed), out
