"""Log-probabilities of labelled tokens: the measurement under perplexity, DPO, GRPO and preference accuracy.

A batch labels the tokens to score with their next-token target (IGNORE_INDEX elsewhere), as
every lmforge collate function writes it, so one function scores replies, completions and
whole documents alike. `eval_mode` is how evaluation runs a model that may be training: no
dropout, no graph, and the previous mode restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.data.masking import IGNORE_INDEX
from lmforge.data.preference import EncodedPair, pair_batch
from lmforge.data.rows import iter_row_batches


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model is in eval mode (no dropout) and builds no graph."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(label) at every position (B, T); 0 where the label is IGNORE_INDEX."""
    B, T = labels.shape
    nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(B, T)  # (B, T)


def sequence_logps(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """log p(reply | prompt) per row (B,): token log-probs summed over the labelled (reply) positions."""
    logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # (B, T, V)
    return token_logps(logits, batch["labels"]).sum(-1)  # (B,)


def pair_logps(model: nn.Module, pairs: Sequence[EncodedPair], batch_size: int, pad_id: int) -> Tensor:
    """log p(reply | prompt) of every pair's chosen and rejected reply (N, 2), in eval mode."""
    device = next(model.parameters()).device
    out = []
    with eval_mode(model):
        for batch in iter_row_batches(pairs, lambda rows: pair_batch(rows, pad_id), batch_size):
            logps = sequence_logps(model, {k: v.to(device) for k, v in batch.items()}).float().cpu()  # (2b,)
            out.append(torch.stack(logps.chunk(2), dim=1))  # (b, 2)
    return torch.cat(out)


__all__ = ["eval_mode", "pair_logps", "sequence_logps", "token_logps"]
