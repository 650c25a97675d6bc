"""Self-supervised pretraining: next-token prediction for decoders, masked tokens for encoders.

`pretrain(recipe)` turns a recipe (sections `model`, `data`, `train`, and `out_dir`) into
the pieces of the one training loop: a model sized to the tokenizer, token-shard loaders
for this rank, the objective that fits the model kind, and a `save_model` that writes the
lmforge checkpoint with its tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.checkpoint import save_native
from lmforge.data import TokenLoader, TokenShards, iter_eval_batches
from lmforge.errors import LmforgeError
from lmforge.models import build_model
from lmforge.recipes import DataConfig, build, model_config
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import init_distributed
from lmforge.train.loop import TrainConfig, TrainResult, train
from lmforge.train.objectives import causal_lm, masked_lm
from lmforge.train.report import Callback, ProgressBar


def objective_for(model: nn.Module, tokenizer: Tokenizer):
    """Next-token loss for decoders; BERT masking for encoders (needs a mask token)."""
    config = model.config
    if config.kind == "decoder":
        return causal_lm
    mask_id = tokenizer.token_to_id("[MASK]") or tokenizer.token_to_id("<mask>")
    if mask_id is None:
        raise LmforgeError("masked-LM pretraining needs a [MASK] or <mask> token in the tokenizer")
    specials = [i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if i is not None]
    return masked_lm(mask_id, config.vocab_size, specials)


def pretrain(recipe: dict[str, Any], *, progress: bool = False, callbacks: list[Callback] | None = None) -> TrainResult:
    """Run (or resume) the pretraining a recipe describes."""
    data = build(DataConfig, recipe.get("data"), "data")
    if not data.shards:
        raise LmforgeError("data.shards is not set; run `lmforge prepare` and pass its --out folder")
    shards_dir = Path(data.shards)
    tokenizer = Tokenizer.from_dir(data.tokenizer or shards_dir / "tokenizer")
    config = model_config(recipe.get("model"), vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id,
                          eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    cfg = build(TrainConfig, recipe.get("train"), "train")
    out_dir = Path(recipe.get("out_dir") or "runs/pretrain")
    seq_len = data.seq_len or config.max_seq_len
    if seq_len > config.max_seq_len:
        raise LmforgeError(f"data.seq_len {seq_len} exceeds model.max_seq_len {config.max_seq_len}")

    train_shards, val_shards = TokenShards.open(shards_dir, "train"), TokenShards.open(shards_dir, "val")
    for shards in (train_shards, val_shards):
        shards.check_vocab(config.vocab_size)
    if cfg.bytes_per_token is None and val_shards.n_tokens:
        cfg.bytes_per_token = val_shards.n_bytes / val_shards.n_tokens

    info = init_distributed()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every run
    model = build_model(config).to(info.device)
    loader = TokenLoader(train_shards, cfg.batch_size, seq_len, seed=cfg.seed, rank=info.rank, world_size=info.world_size)

    def eval_batches():
        return iter_eval_batches(val_shards, cfg.batch_size, seq_len, cfg.eval_batches or None)

    def save_model(m: nn.Module, folder: Path) -> None:
        save_native(m, folder)
        tokenizer.save(folder)

    cbs = list(callbacks or [])
    if progress:
        cbs.append(ProgressBar(cfg.steps))
    return train(model, objective_for(model, tokenizer), loader, cfg, out_dir, make_eval_batches=eval_batches,
                 save_model=save_model, callbacks=cbs, dist_info=info)
