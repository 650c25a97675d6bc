"""Preference accuracy and margins: how often a model prefers the chosen reply of a pair, and by how much.

One set of figures serves every scorer of pairs: a reward model's scalar scores and DPO's implicit
rewards (logged by their objectives during training as eval_accuracy, eval_margin, ...) and the
plain log-probabilities of a language model (`log_prob_preference`, e.g. before and after DPO).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lmforge.data.preference import PreferencePair, encode_pairs
from lmforge.evaluate.logprobs import pair_logps
from lmforge.tokenizer import Tokenizer


def pair_metrics(chosen: Tensor, rejected: Tensor) -> dict[str, float]:
    """Mean chosen and rejected scores, their margin, and how often the chosen one scores higher."""
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    return {"chosen_reward": chosen.mean().item(), "rejected_reward": rejected.mean().item(),
            "margin": (chosen - rejected).mean().item(), "accuracy": (chosen > rejected).float().mean().item()}


def log_prob_preference(model: nn.Module, tokenizer: Tokenizer, pairs: Sequence[PreferencePair],
                        batch_size: int = 16) -> dict[str, float]:
    """`pair_metrics` of log p(reply | prompt) under a language model: accuracy is the share of pairs
    whose chosen reply is more likely, margin the mean log-prob difference (chosen - rejected)."""
    encoded = encode_pairs(tokenizer, pairs, model.config.max_seq_len)
    logps = pair_logps(model, encoded, batch_size, tokenizer.padding_id)  # (N, 2)
    return pair_metrics(logps[:, 0], logps[:, 1])


__all__ = ["log_prob_preference", "pair_metrics"]
