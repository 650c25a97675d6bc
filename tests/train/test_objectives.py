"""Alignment losses against hand computations on fixed numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from lmforge.config import preset
from lmforge.data import IGNORE_INDEX
from lmforge.data.preference import pack_rows
from lmforge.models import build_model
from lmforge.train.objectives import (
    bradley_terry_loss,
    clipped_policy_loss,
    dpo,
    dpo_loss,
    group_advantages,
    grpo,
    k3_kl,
    reward_model_loss,
    sequence_logps,
    token_logps,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# policy and reference log-probs of two pairs: (chosen, rejected)
PC, PR, RC, RR = [-5.0, -3.0], [-6.0, -2.0], [-5.5, -3.0], [-5.5, -2.5]


def h(i: int) -> float:
    return (PC[i] - RC[i]) - (PR[i] - RR[i])  # pair 0: 0.5 + 0.5 = 1.0; pair 1: 0 - 0.5 = -0.5


def test_dpo_sigmoid_and_ipo_losses_equal_hand_computation():
    args = [torch.tensor(v) for v in (PC, PR, RC, RR)]
    beta = 0.1
    sigmoid = dpo_loss(*args, beta=beta)
    assert_close(sigmoid, torch.tensor([-log_sigmoid(beta * h(0)), -log_sigmoid(beta * h(1))]))
    ipo = dpo_loss(*args, beta=beta, loss="ipo")
    assert_close(ipo, torch.tensor([(h(0) - 5.0) ** 2, (h(1) - 5.0) ** 2]))  # 1 / (2 beta) = 5
    eps = 0.2
    smoothed = dpo_loss(*args, beta=beta, label_smoothing=eps)
    want = [-(1 - eps) * log_sigmoid(beta * h(i)) - eps * log_sigmoid(-beta * h(i)) for i in (0, 1)]
    assert_close(smoothed, torch.tensor(want))


class FixedScores(nn.Module):
    """A stand-in model whose output is a fixed tensor (scores, or logits)."""

    def __init__(self, out: Tensor) -> None:
        super().__init__()
        self.out = nn.Parameter(out.clone())

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.out


def test_bradley_terry_loss_and_accuracy_equal_hand_computation():
    chosen, rejected = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])
    assert_close(bradley_terry_loss(chosen, rejected), torch.tensor([-log_sigmoid(1), -log_sigmoid(-1), math.log(2)]))
    batch = {"input_ids": torch.zeros(6, 2, dtype=torch.long), "attention_mask": torch.ones(6, 2, dtype=torch.long)}
    out = reward_model_loss(FixedScores(torch.cat([chosen, rejected])), batch)
    assert out.n_targets == 3
    assert out.loss_sum.item() == pytest.approx(-log_sigmoid(1) - log_sigmoid(-1) + math.log(2))
    assert out.metrics["accuracy"] == pytest.approx(1 / 3)  # a tie is not a win
    assert out.metrics["margin"] == pytest.approx(0.0)
    assert out.metrics["chosen_reward"] == pytest.approx(1.0) and out.metrics["rejected_reward"] == pytest.approx(1.0)


def tiny_decoder() -> nn.Module:
    torch.manual_seed(0)
    return build_model(preset("tiny-llama")).eval()


def test_sequence_logps_sum_over_reply_tokens_only():
    model = tiny_decoder()
    prompts, replies = [[1, 7, 9], [1, 4]], [[20, 21, 2], [30, 2]]
    batch = pack_rows(prompts, replies, pad_id=0)
    with torch.no_grad():
        got = sequence_logps(model, batch)
        for i, (p, r) in enumerate(zip(prompts, replies)):
            ids = torch.tensor([p + r])
            lp = model(ids).log_softmax(-1)[0]  # (T, V) alone, unpadded
            want = sum(lp[t, ids[0, t + 1]] for t in range(len(p) - 1, len(p) + len(r) - 1))
            assert got[i].item() == pytest.approx(want.item(), abs=1e-4)
    assert (batch["labels"] != IGNORE_INDEX).sum(-1).tolist() == [3, 2]  # the reply tokens, nothing else


def test_dpo_objective_logs_implicit_rewards():
    model = tiny_decoder()
    batch = pack_rows([[1, 7], [1, 8], [1, 7], [1, 8]], [[20, 2], [21, 2], [22, 2], [23, 2]], pad_id=0)
    with torch.no_grad():
        policy = sequence_logps(model, batch)
    reference = policy.detach() + torch.tensor([0.5, -0.5, 1.0, -1.0])  # rewards -0.25, 0.25 | -0.5, 0.5
    out = dpo(lambda m, b: reference, beta=0.5)(model, batch)
    rewards = 0.5 * (policy - reference)  # (4,): chosen rows first
    assert out.n_targets == 2
    assert out.metrics["chosen_reward"] == pytest.approx(rewards[:2].mean().item(), abs=1e-5)
    assert out.metrics["margin"] == pytest.approx((rewards[:2] - rewards[2:]).mean().item(), abs=1e-5)
    assert out.metrics["accuracy"] == pytest.approx(0.5)  # pair 0: -0.25 > -0.5 wins; pair 1: 0.25 < 0.5 loses
    want = -torch.nn.functional.logsigmoid(rewards[:2] - rewards[2:]).sum()
    assert out.loss_sum.item() == pytest.approx(want.item(), abs=1e-5)


def test_group_advantages_on_a_hand_made_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 3.0, 0.0, 0.0])
    adv = group_advantages(rewards, 4)
    std = math.sqrt(4 * 0.25 / 3)  # sample std of (1, 0, 0, 1)
    assert_close(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert adv[4:8].tolist() == [0.0] * 4  # every completion equally good: no signal
    std3 = math.sqrt((3 * 0.75**2 + 2.25**2) / 3)
    assert_close(adv[8:], torch.tensor([-0.75, 2.25, -0.75, -0.75]) / (std3 + 1e-4))
    assert group_advantages(torch.tensor([1.0, math.nan, 1.0, 0.0]), 2)[:2].isnan().all()  # a failed reward spoils its group only


def test_clipped_objective_equals_the_formula_on_fixed_tensors():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0]])
    old = torch.tensor([[-1.0, -2.5, -0.2], [-1.5, -0.8, -3.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, clipped = clipped_policy_loss(logps, old, adv, clip_eps=0.2)
    for i in range(2):
        for t in range(3):
            ratio = math.exp(logps[i, t] - old[i, t])
            a = adv[i].item()
            want = -min(ratio * a, min(max(ratio, 0.8), 1.2) * a)
            assert loss[i, t].item() == pytest.approx(want, rel=1e-6)
    # ratios: row 0 (1, e^.5, e^-.3) with A > 0: only e^.5 > 1.2 is clipped; row 1 (e^.5, e^-.2, 1) with A < 0: none below 0.8
    assert clipped.tolist() == [[False, True, False], [False, False, False]]
    kl = k3_kl(logps, old)
    d = old - logps
    assert_close(kl, torch.exp(d) - d - 1)
    assert (kl >= 0).all() and kl[0, 0] == 0


def test_grpo_objective_on_fixed_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 10)
    labels = torch.tensor([[IGNORE_INDEX, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 5, 6]])
    old = torch.tensor([[0.0, -2.0, -2.5, 0.0], [0.0, 0.0, -1.0, -3.0]])
    ref = torch.tensor([[0.0, -2.2, -2.0, 0.0], [0.0, 0.0, -2.0, -2.0]])
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": labels, "advantages": torch.tensor([1.0, -0.5]),
             "old_logps": old, "ref_logps": ref, "stat_reward_mean": torch.tensor(0.25)}
    out = grpo(clip_eps=0.2, kl_beta=0.1)(FixedScores(logits), batch)
    lp = token_logps(logits, labels)
    assert_close(lp[labels != IGNORE_INDEX], logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0][labels != IGNORE_INDEX])
    loss, _ = clipped_policy_loss(lp, old, batch["advantages"], 0.2)
    mask = labels != IGNORE_INDEX
    want = (loss + 0.1 * k3_kl(lp, ref))[mask].sum()
    assert out.loss_sum.item() == pytest.approx(want.item(), rel=1e-6)
    assert out.n_targets == 4
    assert out.metrics["kl"] == pytest.approx(k3_kl(lp, ref)[mask].mean().item(), rel=1e-6)
    assert out.metrics["reward_mean"] == 0.25 and "clip_fraction" in out.metrics
