"""Training objectives: `(model, batch) -> ObjectiveOutput(loss_sum, n_targets, metrics)`.

Each returns the loss summed over its targets and the number of targets, so the one loop
can normalise gradient accumulation by the true token count. Mixture-of-experts models add
their load-balancing loss (weighted by `router_aux_loss_coef`) per target token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.data import IGNORE_INDEX, mask_tokens
from lmforge.train.distributed import unwrap_model
from lmforge.train.loop import ObjectiveOutput


def token_loss_sum(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy summed over positions whose label is not IGNORE_INDEX, and their count."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()


def moe_aux_loss(model: nn.Module) -> Tensor | None:
    """Sum of the load-balancing losses the MoE layers recorded in the last forward, or None."""
    losses = [m.aux_loss for m in unwrap_model(model).modules() if hasattr(m, "aux_loss")]
    return torch.stack(losses).sum() if losses else None


def _with_aux(model: nn.Module, loss_sum: Tensor, n: Tensor) -> ObjectiveOutput:
    metrics = {"loss": (loss_sum / n.clamp(min=1)).item()}
    aux = moe_aux_loss(model)
    if aux is not None:
        coef = unwrap_model(model).config.router_aux_loss_coef
        loss_sum = loss_sum + coef * aux * n
        metrics["moe_aux"] = aux.item()
    return ObjectiveOutput(loss_sum, n, metrics)


def causal_lm(model: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
    """Next-token prediction: `labels` are the inputs shifted by one (IGNORE_INDEX where masked)."""
    logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # (B, T, V)
    loss_sum, n = token_loss_sum(logits, batch["labels"])
    return _with_aux(model, loss_sum, n)


def masked_lm(mask_id: int, vocab_size: int, special_ids: list[int], probability: float = 0.15) -> Callable:
    """BERT's objective: mask 15% of tokens (80% [MASK], 10% random, 10% kept) and predict them."""

    def objective(model: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
        ids, labels = mask_tokens(batch["input_ids"], mask_id=mask_id, vocab_size=vocab_size,
                                  special_ids=special_ids, mlm_probability=probability, generator=None)
        logits = model(ids, attention_mask=batch.get("attention_mask"))  # (B, T, V)
        loss_sum, n = token_loss_sum(logits, labels)
        return _with_aux(model, loss_sum, n)

    return objective
