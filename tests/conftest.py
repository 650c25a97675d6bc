"""Fixtures shared across the suite: a tiny trained tokenizer and tiny saved models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CORPUS = (
    "The quick brown fox jumps over the lazy dog. Héllo wörld, naïve café! 你好，世界。 "
    "def add(a, b):\n    return a + b\n"
) * 40


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from lmforge.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    (folder / "corpus.txt").write_text(CORPUS, encoding="utf-8")
    return train_tokenizer([folder / "corpus.txt"], vocab_size=320)


def save_tiny(folder: Path, tokenizer, preset_name: str = "tiny-llama", **overrides) -> Path:
    from lmforge.api import LM
    from lmforge.config import preset
    from lmforge.models import build_model

    torch.manual_seed(0)
    config = preset(preset_name, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id, **overrides)
    LM(build_model(config), tokenizer).save(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return save_tiny(tmp_path_factory.mktemp("lm") / "tiny", tiny_tokenizer)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one torch thread, and far faster when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
