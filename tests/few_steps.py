"""A few next-token training steps on random tokens, for tests that check what training changes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def train_few_steps(model: nn.Module, steps: int = 3, vocab: int = 256) -> None:
    """AdamW (lr 1e-2) on the trainable parameters of `model`, `steps` times on one random batch."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, vocab, (4, 16))
    for _ in range(steps):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
