"""Attention maps through the API and the command: every family, token labels, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.api import LM
from lmforge.cli.main import main
from lmforge.config import preset
from lmforge.diagnose.attention import AttentionMaps, plot_attention
from lmforge.models import build_model

TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert", "tiny-llama", "tiny-mistral", "tiny-mixtral"])
def test_lm_attention_for_every_family(tiny_tokenizer, name: str) -> None:
    torch.manual_seed(0)
    lm = LM(build_model(preset(name, vocab_size=tiny_tokenizer.vocab_size, eos_id=tiny_tokenizer.eos_id)), tiny_tokenizer)
    maps = lm.attention(TEXT)
    ids = lm.tokenizer.encode(TEXT, add_special_tokens=True)
    assert isinstance(maps, AttentionMaps) and "".join(maps.tokens) == lm.tokenizer.decode(ids)
    n = len(ids)
    assert maps.probs.shape == (lm.config.n_layers, lm.config.n_heads, n, n)
    torch.testing.assert_close(maps.probs.sum(-1), torch.ones(lm.config.n_layers, lm.config.n_heads, n))
    assert bool(maps.probs.triu(1).abs().max() == 0) is lm.config.causal  # decoders never look ahead; BERT does


def test_attention_command_writes_one_head_or_a_grid(tiny_lm_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["attention", str(tiny_lm_dir), "--text", TEXT, "--layer", "1", "--head", "0",
                 "--out", str(tmp_path / "one.png")]) == 0
    assert "layer 1, head 0" in capsys.readouterr().out and (tmp_path / "one.png").stat().st_size > 5_000
    assert main(["attention", str(tiny_lm_dir), "--text", "a b c", "--layer", "0", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()


def test_long_texts_drop_the_labels_not_the_map(tmp_path: Path) -> None:
    maps = AttentionMaps([f"t{i}" for i in range(80)], torch.full((1, 1, 80, 80), 1 / 80))
    plot_attention(maps, tmp_path / "long.png")
    assert (tmp_path / "long.png").is_file()


@pytest.mark.parametrize(("flags", "message"), [(["--layer", "7"], "--layer must be in 0..1"),
                                                (["--head", "9"], "--head must be in 0..3")])
def test_attention_choice_errors_are_one_line(tiny_lm_dir: Path, tmp_path: Path, capsys, flags, message) -> None:
    assert main(["attention", str(tiny_lm_dir), "--text", TEXT, *flags, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error:") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "x.png").exists()
