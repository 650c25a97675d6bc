"""Embedder fine-tuning: contrastive training of an encoder on (query, passage) pairs, with optional LoRA.

`run_embed(recipe)` trains any model `lmforge.load` embeds with (a BERT-style encoder, a
sentence-transformers folder, even a decoder) so that a query's vector lies closest to its
passage's. The objective is the multiple-negatives ranking loss (`objectives.contrastive`): every
other passage of the batch is a negative, and a row's `negative` (given in the data, or mined from
a `lmforge rag index` with `data.mine_index`) is a hard one. Recipe sections: `finetune`, `data`
(PairDataConfig), `embed`, `train`, `lora` and `out_dir`.

Design choices:
- One process only: the objective pools `hidden_states`, which bypasses the forward that DDP (its
  gradient reducer) and FSDP2 (its all-gathers) wrap, and a micro-batch with hard negatives takes
  one forward more than one without; under torchrun one clear error says so before the model loads.
- The model trained is the encoder itself, pooled as `lm.embed` pools it (the base folder's
  sentence-transformers pooling, else the mean), so the run folder is an embedder:
  `lmforge.load(out_dir).embed` and `lmforge rag index --embedder out_dir` use it as they are. The
  base's sentence-transformers files (modules.json, pooling, max_seq_length) are copied beside it.
- Recall@1/@5 and MRR of each held-out query's own passage among all held-out passages are
  measured before and after training (out_dir/retrieval_report.json), so a run says whether it
  helped.
- rag/ sits above train/, so mining takes a `miner` argument (`rag.mining.index_miner`); the CLI
  builds it from `data.mine_index`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.checkpoint.io import write_json
from lmforge.checkpoint.sentence import SentenceConfig, copy_sentence_files, read_sentence_config
from lmforge.data.pairs import (
    EncodedPair,
    Pair,
    PairDataConfig,
    collate_pairs,
    encode_pairs,
    padded,
    read_pairs,
)
from lmforge.data.rows import context_length, holdout
from lmforge.errors import LmforgeError
from lmforge.evaluate.retrieval import dense_ranks, retrieval_scores
from lmforge.models.heads import sentence_embeddings
from lmforge.train import objectives, setup
from lmforge.train.distributed import init_distributed
from lmforge.train.loop import TrainConfig
from lmforge.train.lora import LoraConfig
from lmforge.train.report import Callback

RETRIEVAL_REPORT = "retrieval_report.json"

Miner = Callable[[Sequence[Pair]], list[str | None]]  # a hard negative per pair (None: none found)


@dataclass
class EmbedConfig:
    """The contrastive objective; the `embed:` section of an embed-train recipe."""

    scale: float = 20.0  # s in softmax(s * cosine): sentence-transformers' default; higher = sharper

    def validate(self) -> None:
        """Raise LmforgeError (one line) for a value out of range."""
        if self.scale <= 0:
            raise LmforgeError(f"embed.scale must be > 0; got {self.scale}")


EMBED_SECTIONS: dict[str, type] = {"finetune": setup.FinetuneConfig, "data": PairDataConfig, "embed": EmbedConfig,
                                   "train": TrainConfig, "lora": LoraConfig}


@dataclass
class EmbedResult(setup.RunResult):
    """The loop's result and the held-out retrieval scores before and after training (None: no held-out split)."""

    before: dict[str, float] | None = None
    after: dict[str, float] | None = None

    def summary(self) -> str:
        """The verb's last line, with recall@1 and MRR before -> after."""
        line = super().summary()
        if self.before is None or self.after is None:
            return line
        shown = ", ".join(f"{k} {self.before[k]:.3f} -> {self.after[k]:.3f}" for k in self.after)
        return f"{line}\nheld-out retrieval: {shown}"


@torch.no_grad()
def embed_ids(model: nn.Module, rows: Sequence[list[int]], pad_id: int, pooling: str, batch_size: int) -> torch.Tensor:
    """Sentence vectors (N, dim) of encoded texts, in batches, with the model in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(rows), batch_size):
        ids, mask = padded(rows[start:start + batch_size], pad_id)  # (b, T), (b, T)
        parts.append(sentence_embeddings(model, ids.to(device), mask.to(device), pooling).float().cpu())
    return torch.cat(parts)  # (N, dim)


def held_out_retrieval(model: nn.Module, rows: Sequence[EncodedPair], pad_id: int, pooling: str,
                       batch_size: int) -> dict[str, float]:
    """recall@1, recall@5 and MRR of each query's passage among the distinct passages of `rows`."""
    corpus = {tuple(p): i for i, p in enumerate(dict.fromkeys(tuple(p) for _, p, _ in rows))}
    passages = embed_ids(model, [list(p) for p in corpus], pad_id, pooling, batch_size)  # (P, dim)
    queries = embed_ids(model, [q for q, _, _ in rows], pad_id, pooling, batch_size)  # (Q, dim)
    return retrieval_scores(dense_ranks(queries, passages, [corpus[tuple(p)] for _, p, _ in rows]))


def mine_negatives(pairs: list[Pair], miner: Miner) -> int:
    """Give every pair without a negative the one `miner` finds; the number of pairs that got one."""
    todo = [p for p in pairs if p.negative is None]
    found = 0
    for pair, negative in zip(todo, miner(todo)):
        if negative is not None:
            pair.negative, found = negative, found + 1
    return found


def _read_splits(data: PairDataConfig, seed: int) -> tuple[list[Pair], list[Pair]]:
    train = read_pairs(data.train)
    if data.eval:
        return train, read_pairs(data.eval)
    return holdout(train, data.eval_fraction, seed)


def _max_length(data: PairDataConfig, how: SentenceConfig, max_seq_len: int) -> int:
    """data.seq_len, else the sentence config's max_seq_length, else the model's context."""
    return context_length(data.seq_len or min(how.max_length or max_seq_len, max_seq_len), max_seq_len)


def run_embed(recipe: dict[str, Any], *, progress: bool = False, report: setup.Report | None = None,
              callbacks: Sequence[Callback] = (), miner: Miner | None = None) -> EmbedResult:
    """Run (or resume) the embedder training a recipe describes; score held-out retrieval before and after."""
    ft, data_cfg, emb, cfg, lora = setup.read_recipe(recipe, EMBED_SECTIONS)
    if data_cfg.mine_index and miner is None:
        raise LmforgeError("data.mine_index needs an index miner: run `lmforge embed-train`, or pass "
                           "miner=lmforge.rag.mining.index_miner(index) to run_embed")
    run = setup.Run(setup.out_dir_of(recipe, "embed"), cfg, init_distributed(), progress, callbacks, ft.merge)
    if run.info.is_distributed:
        raise LmforgeError("embed-train runs in one process: it pools the encoder's hidden states outside the forward "
                           "that DDP and FSDP2 wrap; launch it with `lmforge embed-train`, not torchrun")
    model, tokenizer = setup.load_base(ft, init_distributed(), cfg.parallel)
    how = read_sentence_config(ft.base)
    say = report or (lambda line: None)
    train_pairs, eval_pairs = _read_splits(data_cfg, cfg.seed)
    if miner is not None:
        say(f"mined hard negatives from {data_cfg.mine_index or 'the index'} for "
            f"{mine_negatives(train_pairs, miner)} of {len(train_pairs)} pairs")
    max_length = _max_length(data_cfg, how, model.config.max_seq_len)
    rows, eval_rows = (encode_pairs(p, tokenizer, max_length, how) for p in (train_pairs, eval_pairs))
    say(f"{len(rows)} train pairs ({sum(r[2] is not None for r in rows)} with a hard negative), "
        f"{len(eval_rows)} held out")
    score = partial(held_out_retrieval, rows=eval_rows, pad_id=tokenizer.padding_id, pooling=how.pooling,
                    batch_size=cfg.batch_size)
    before = score(model) if eval_rows and run.info.is_main else None
    io = setup.RunIO(tokenizer, setup.apply_adapters(model, lora, cfg.seed), ft.base)
    collate = partial(collate_pairs, pad_id=tokenizer.padding_id)
    result = run.fit_rows(model, objectives.contrastive(how.pooling, emb.scale), io, rows, eval_rows, collate)
    trained = run.trained_model(model) if eval_rows else None  # every rank: gathered when sharded
    after = score(trained) if trained is not None else None
    if run.info.is_main:
        copy_sentence_files(Path(ft.base), result.out_dir)
        if after is not None:
            write_json(result.out_dir / RETRIEVAL_REPORT, {"n": len(eval_rows), "before": before, "after": after})
    return EmbedResult(result, before=before, after=after)


__all__ = ["EMBED_SECTIONS", "RETRIEVAL_REPORT", "EmbedConfig", "EmbedResult", "Miner", "held_out_retrieval",
           "mine_negatives", "run_embed"]
