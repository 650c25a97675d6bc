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
from lmforge.evaluate.classification import accuracy
from lmforge.evaluate.logprobs import sequence_logps, token_logps
from lmforge.evaluate.preference import pair_metrics
from lmforge.models.heads import sentence_embeddings
from lmforge.train.distributed import unwrap_model
from lmforge.train.loop import ObjectiveOutput


def token_loss_sum(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy summed over positions whose label is not IGNORE_INDEX, and their count."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()


def moe_aux_loss(model: nn.Module) -> Tensor | None:
    """Sum of the load-balancing losses the MoE layers recorded in the last forward, or None."""
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    if config is not None and not getattr(config, "n_experts", 0):
        return None  # no experts: no walk over every module on every step of a small model
    losses = [m.aux_loss for m in inner.modules() if hasattr(m, "aux_loss")]
    return torch.stack(losses).sum() if losses else None


def _with_aux(model: nn.Module, loss_sum: Tensor, n: Tensor) -> ObjectiveOutput:
    """The loss plus the MoE load-balancing loss, if any. Metrics stay tensors (no host sync);
    the loop reads them on the steps it reports, and reports the loss itself."""
    metrics: dict[str, Tensor | float] = {}
    aux = moe_aux_loss(model)
    if aux is not None:
        coef = unwrap_model(model).config.router_aux_loss_coef
        loss_sum = loss_sum + coef * aux * n
        metrics["moe_aux"] = aux.detach()
    return ObjectiveOutput(loss_sum, n, metrics)


def causal_lm(model: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
    """Next-token prediction: `labels` are the inputs shifted by one (IGNORE_INDEX where masked)."""
    labels = batch["labels"]
    loss_sum = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels)
    return _with_aux(model, loss_sum, (labels != IGNORE_INDEX).sum())


def masked_lm(mask_id: int, vocab_size: int, special_ids: list[int], probability: float = 0.15) -> Callable:
    """BERT's objective: mask 15% of tokens (80% [MASK], 10% random, 10% kept) and predict them."""

    def objective(model: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
        ids, labels = mask_tokens(batch["input_ids"], mask_id=mask_id, vocab_size=vocab_size,
                                  special_ids=special_ids, mlm_probability=probability, generator=None)
        logits = model(ids, attention_mask=batch.get("attention_mask"))  # (B, T, V)
        loss_sum, n = token_loss_sum(logits, labels)
        return _with_aux(model, loss_sum, n)

    return objective


def sft(model: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
    """Supervised fine-tuning: next-token loss where `labels` are assistant tokens (IGNORE_INDEX elsewhere).

    Packed batches (data/sft.py) add `positions` restarting per row and `document_ids`, so rows
    packed into one sequence never attend to each other.
    """
    labels = batch["labels"]
    loss_sum = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), positions=batch.get("positions"),
                     document_ids=batch.get("document_ids"), labels=labels)
    return _with_aux(model, loss_sum, (labels != IGNORE_INDEX).sum())


def classification(model: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
    """Cross-entropy of a sequence classifier's logits against `labels` (B,); one target per sequence."""
    logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # (B, n_labels)
    labels = batch["labels"]
    out = _with_aux(model, F.cross_entropy(logits.float(), labels, reduction="sum"), torch.tensor(labels.numel(), device=labels.device))
    out.metrics["accuracy"] = accuracy(logits, labels)
    return out



# ---------------------------------------------------------------- embedders: contrastive (query, passage) pairs


def multiple_negatives_ranking_loss(queries: Tensor, candidates: Tensor, scale: float = 20.0) -> Tensor:
    """Per-query loss (B,) of the multiple-negatives ranking loss (Henderson et al., 2017, "Efficient
    Natural Language Response Suggestion for Smart Reply"; sentence-transformers'
    `MultipleNegativesRankingLoss`, whose default scale is 20).

    With unit vectors q_i (B, dim) and candidates c_j (C, dim), the first B being the positives
    (c_i answers q_i) and the rest extra (hard) negatives:
    L_i = -log( exp(s cos(q_i, c_i)) / sum_j exp(s cos(q_i, c_j)) ),
    a cross-entropy over scaled cosine similarities in which every other row's passage is a negative.
    """
    q = F.normalize(queries.float(), dim=-1)  # (B, dim)
    c = F.normalize(candidates.float(), dim=-1)  # (C, dim)
    scores = scale * q @ c.T  # (B, C)
    return F.cross_entropy(scores, torch.arange(len(q), device=q.device), reduction="none")


def contrastive(pooling: str = "mean", scale: float = 20.0) -> Callable:
    """The multiple-negatives ranking objective on a batch of pairs (data/pairs.py): one target per query.

    Queries, passages and negatives go through the encoder separately and are pooled as `lm.embed`
    pools (`pooling`); logs the in-batch accuracy (the query's own passage scores highest).
    """

    def objective(model: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
        embed = [sentence_embeddings(model, batch[f"{name}_ids"], batch[f"{name}_mask"], pooling, normalize=False)
                 for name in ("query", "passage", "negative") if f"{name}_ids" in batch]
        queries, candidates = embed[0], torch.cat(embed[1:])  # (B, dim), (B + N, dim)
        losses = multiple_negatives_ranking_loss(queries, candidates, scale)  # (B,)
        similar = F.normalize(queries.detach(), dim=-1) @ F.normalize(candidates.detach(), dim=-1).T  # (B, B + N)
        hit = similar.argmax(-1) == torch.arange(len(queries), device=queries.device)  # (B,)
        metrics = {"loss": losses.mean().item(), "accuracy": hit.float().mean().item()}
        return ObjectiveOutput(losses.sum(), len(losses), metrics)

    return objective

# ---------------------------------------------------------------- alignment: reward models, DPO, GRPO
#
# Pair batches stack B chosen rows above B rejected rows (data/preference.py); the loss is summed
# over pairs and n_targets is the number of pairs. GRPO's loss is summed over completion tokens.


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """-log sigmoid(r_chosen - r_rejected) per pair (B,): the Bradley-Terry negative log-likelihood."""
    return -F.logsigmoid(chosen.float() - rejected.float())


def reward_model_loss(model: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
    """A reward model's scalar scores (2B,) trained so that the chosen reply of each pair scores higher."""
    rewards = model(batch["input_ids"], attention_mask=batch["attention_mask"])  # (2B,)
    chosen, rejected = rewards.chunk(2)  # (B,), (B,)
    return ObjectiveOutput(bradley_terry_loss(chosen, rejected).sum(), len(chosen), pair_metrics(chosen, rejected))


DPO_LOSSES = ("sigmoid", "ipo")

Reference = Callable[[nn.Module, dict[str, Tensor]], Tensor]  # (policy, batch) -> reference log-probs (2B,)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
             beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0) -> Tensor:
    """Per-pair DPO loss (B,) from sequence log-probs under the policy and the reference.

    With h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)):
    "sigmoid" (Rafailov et al., 2023) is -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h),
    eps the label smoothing (conservative DPO; 0 = plain DPO); "ipo" (Azar et al., 2023) is
    (h - 1 / (2 beta))^2 on the summed log-probs.
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)  # (B,)
    if loss == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def dpo(reference: Reference, *, beta: float = 0.1, loss: str = "sigmoid", label_smoothing: float = 0.0) -> Callable:
    """The DPO objective; `reference(policy, batch)` gives the reference log-probs of the batch's rows.

    Logs the implicit rewards beta * (log pi - log ref) of chosen and rejected replies, their
    margin, and the preference accuracy (chosen reward > rejected reward).
    """

    def objective(model: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
        policy = sequence_logps(model, batch)  # (2B,)
        ref = reference(model, batch).to(policy)  # (2B,)
        (pc, pr), (rc, rr) = policy.chunk(2), ref.chunk(2)
        losses = dpo_loss(pc, pr, rc, rr, beta=beta, loss=loss, label_smoothing=label_smoothing)  # (B,)
        return ObjectiveOutput(losses.sum(), len(losses), pair_metrics(beta * (pc - rc), beta * (pr - rr)))

    return objective


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GRPO's advantages (N,): each reward minus its group's mean, over the group's std + eps.

    Groups are consecutive runs of `group_size` rewards (the completions of one prompt); the std
    is the sample std (n - 1), as in TRL. A group whose rewards are all equal gets advantage 0.
    """
    groups = rewards.float().view(-1, group_size)  # (N / G, G)
    mean, std = groups.mean(-1, keepdim=True), groups.std(-1, keepdim=True)
    return ((groups - mean) / (std + eps)).flatten()  # (N,)


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(ref - pi) - (ref - pi) - 1 (>= 0, unbiased)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def clipped_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, clip_eps: float) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate, negated, per token; and where the clipped term is the one in force.

    ratio = exp(logps - old_logps); loss = -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A), with the
    sequence's advantage A broadcast over its tokens.
    """
    ratio = torch.exp(logps - old_logps)  # (B, T)
    adv = advantages[:, None]  # (B, 1)
    loss = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
    return loss, clipped


def grpo(*, clip_eps: float = 0.2, kl_beta: float = 0.04) -> Callable:
    """GRPO's objective on a micro-batch of rollouts (train/grpo.py), summed over completion tokens.

    The batch holds `advantages` (B,), and per token `old_logps` (the policy that sampled; the
    current one when absent) and `ref_logps` (the reference; no KL term when absent or kl_beta is 0).
    Per token: clipped surrogate + kl_beta * k3. Keys `stat_*` (rollout statistics: rewards,
    lengths) are passed through as metrics.
    """

    def objective(model: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
        labels = batch["labels"]
        logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # (B, T, V)
        logps = token_logps(logits, labels)  # (B, T)
        mask = (labels != IGNORE_INDEX).float()  # (B, T)
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        loss, clipped = clipped_policy_loss(logps, old, batch["advantages"].float(), clip_eps)
        n = mask.sum()
        metrics = {"clip_fraction": ((clipped.float() * mask).sum() / n.clamp(min=1)).item()}
        if kl_beta and "ref_logps" in batch:
            kl = k3_kl(logps, batch["ref_logps"])
            loss = loss + kl_beta * kl
            metrics["kl"] = ((kl.detach() * mask).sum() / n.clamp(min=1)).item()
        metrics.update({k.removeprefix("stat_"): float(v) for k, v in batch.items() if k.startswith("stat_")})
        return ObjectiveOutput((loss * mask).sum(), n, metrics)

    return objective
