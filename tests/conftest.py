"""Fixtures shared across the suite: a tiny trained tokenizer, tiny saved models, data files, recipes, the CLI."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from _helpers import CHOSEN, REJECTED, run_cli, write_jsonl

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


@pytest.fixture(scope="session")
def qlora_base_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """tiny-llama with an MLP 192 wide, so int4 groups of 32 and 64 tile every linear layer (172 does not)."""
    return save_tiny(tmp_path_factory.mktemp("qlora") / "base", tiny_tokenizer, hidden_dim=192)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one torch thread, and far faster when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- data files


CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi")]


def capital_rows(n: int) -> list[dict]:
    """Conversations and instruction rows about capitals: a task a tiny model learns in seconds."""
    rows = []
    for i in range(n):
        country, city = CAPITALS[i % len(CAPITALS)]
        if i % 2:
            rows.append({"instruction": "Name the capital.", "input": country, "output": f"{city}."})
        else:
            rows.append({"messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": f"Capital of {country}?"},
                                      {"role": "assistant", "content": f"{city}."}]})
    return rows


@pytest.fixture
def jsonl(tmp_path: Path) -> Callable[[str, list], Path]:
    """Write rows (dicts, or raw strings written as they are) as a JSONL file in tmp_path."""

    def write(name: str, rows: list) -> Path:
        path = tmp_path / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
        return path

    return write


@pytest.fixture
def capitals_jsonl(jsonl) -> Path:
    return jsonl("capitals.jsonl", capital_rows(48))


@pytest.fixture(scope="session")
def prefs_file(tmp_path_factory) -> Path:
    """24 pairs that all prefer the fox to the dog."""
    rows = [{"prompt": f"Q{i}: which animal?", "chosen": CHOSEN, "rejected": REJECTED} for i in range(24)]
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", rows)


# ---------------------------------------------------------------- recipes and the command


@pytest.fixture(scope="session")
def recipe() -> Callable[..., dict]:
    """A fine-tuning recipe for a short run: recipe(base, train_file, out_dir, data={...}, train={...}, ...)."""

    def build(base: Path, train_file: Path, out_dir: Path, **sections: dict) -> dict:
        train = {"steps": 30, "batch_size": 8, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 3, "eval_every": 0,
                 "save_every": 0, "log_every": 1, "resume": "never", **sections.pop("train", {})}
        return {"finetune": {"base": str(base), **sections.pop("finetune", {})},
                "data": {"train": str(train_file), **sections.pop("data", {})}, "train": train,
                "out_dir": str(out_dir), **sections}

    return build


@pytest.fixture(scope="session")
def cli() -> Callable[..., subprocess.CompletedProcess]:
    """`lmforge ARGS...` in a fresh process, as a user runs it."""
    return run_cli
