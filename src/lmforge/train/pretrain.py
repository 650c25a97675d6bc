"""Self-supervised pretraining: next-token prediction for decoders, masked tokens for encoders.

`run_pretrain(recipe)` turns a recipe (sections `model`, `data`, `train`, and `out_dir`) into
the pieces of the one training loop: a model sized to the tokenizer (its initial weights drawn
from `train.seed`), token-shard loaders for this rank, the objective that fits the model kind,
and the shared checkpoint functions (`setup.RunIO`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.config import ModelConfig, model_config
from lmforge.data.rows import context_length
from lmforge.data.shards import ShardsDataConfig, TokenLoader, TokenShards, eval_rows, iter_eval_batches
from lmforge.errors import LmforgeError
from lmforge.models import build_model
from lmforge.tokenizer import Tokenizer
from lmforge.train import setup
from lmforge.train.distributed import init_distributed, sharded_init
from lmforge.train.loop import Objective, TrainConfig
from lmforge.train.objectives import causal_lm, masked_lm
from lmforge.train.report import Callback

PRETRAIN_SECTIONS: dict[str, type] = {"model": ModelConfig, "data": ShardsDataConfig, "train": TrainConfig}


def objective_for(model: nn.Module, tokenizer: Tokenizer) -> Objective:
    """Next-token loss for decoders; BERT masking for encoders (needs a mask token)."""
    config = model.config
    if config.kind == "decoder":
        return causal_lm
    mask_id = tokenizer.token_to_id("[MASK]") or tokenizer.token_to_id("<mask>")
    if mask_id is None:
        raise LmforgeError("masked-LM pretraining needs a [MASK] or <mask> token in the tokenizer")
    specials = [i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if i is not None]
    return masked_lm(mask_id, config.vocab_size, specials)


def model_config_for(values: dict[str, Any], tokenizer: Tokenizer) -> ModelConfig:
    """The `model:` section completed with the tokenizer's vocabulary size and special ids."""
    return model_config(values, vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                        pad_id=tokenizer.pad_id)


def run_pretrain(recipe: dict[str, Any], *, progress: bool = False, report: setup.Report | None = None,
                 callbacks: Sequence[Callback] = ()) -> setup.RunResult:
    """Run (or resume) the pretraining a recipe describes."""
    model_values, data, cfg = setup.read_recipe(recipe, PRETRAIN_SECTIONS)
    if not data.shards:
        raise LmforgeError("data.shards is not set; run `lmforge prepare` and pass its --out folder")
    shards_dir = Path(data.shards)
    tokenizer = Tokenizer.from_dir(data.tokenizer or shards_dir / "tokenizer")
    config = model_config_for(model_values, tokenizer)
    seq_len = context_length(data.seq_len, config.max_seq_len)
    train_shards, val_shards = TokenShards.open(shards_dir, "train"), TokenShards.open(shards_dir, "val")
    for shards in (train_shards, val_shards):
        shards.check_tokenizer(tokenizer)  # the tokenizer that prepared them, not just one of the same size
        shards.check_vocab(config.vocab_size)
    if cfg.bytes_per_token is None and val_shards.n_tokens:
        cfg.bytes_per_token = val_shards.n_bytes / val_shards.n_tokens
    if report:
        report(f"{train_shards.n_tokens:,} train and {val_shards.n_tokens:,} validation tokens")

    run = setup.Run(setup.out_dir_of(recipe, "pretrain"), cfg, init_distributed(), progress, callbacks)
    info = run.info
    with setup.seeded(cfg.seed), sharded_init(info, cfg.parallel):  # the same initial weights in every run
        model = build_model(config)
    loader = TokenLoader(train_shards, cfg.batch_size, seq_len, seed=cfg.seed, rank=info.rank, world_size=info.world_size)

    def eval_batches():
        return iter_eval_batches(val_shards, cfg.batch_size, seq_len, cfg.eval_batches or None,
                                 rows=eval_rows(cfg.batch_size, seq_len))

    return setup.RunResult(run.fit(model, objective_for(model, tokenizer), setup.RunIO(tokenizer), loader, eval_batches))


__all__ = ["PRETRAIN_SECTIONS", "model_config_for", "objective_for", "run_pretrain"]
