"""Shared by the alignment examples: pretrain a tiny byte-level model on lines of text (CPU, about a minute).

Each line becomes one document (`<|bos|> line <|eos|>`), so the model learns where an answer ends.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.data import prepare
from lmforge.tokenizer import train_tokenizer
from lmforge.train.pretrain import run_pretrain

MODEL = dict(preset="tiny-llama", dim=96, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=256, max_seq_len=96)


def pretrain_tiny(lines: list[str], folder: Path, steps: int) -> Path:
    """Tokenizer (bytes only), shards and a pretrained tiny decoder in `folder`; returns the model folder."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    tokenizer = train_tokenizer([corpus], vocab_size=256)  # one token per byte: digits and letters stay separate
    tokenizer.save(folder / "tokenizer")
    prepare([corpus], tokenizer, folder / "shards", val_fraction=0.02, val_split="documents")
    recipe = {"model": MODEL, "data": {"shards": str(folder / "shards"), "tokenizer": str(folder / "tokenizer"), "seq_len": 64},
              "train": dict(steps=steps, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=30, eval_every=0,
                            eval_batches=4, save_every=0, log_every=20, resume="never", seed=0),
              "out_dir": str(folder / "base")}
    run_pretrain(recipe, progress=True)  # the initial weights are drawn from train.seed
    return folder / "base"
