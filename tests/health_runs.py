"""Tiny training runs for the health record and `lmforge doctor` tests: healthy, or broken on purpose.

The task is counting (token t = token t-1 + 1, modulo the vocabulary), learnt in a few dozen steps,
or two interleaved counters (token t = token t-2 + 1), learnable only through attention to the
token before last, so the heads have to focus. `random_rows` gives unlearnable rows, for a run that can only memorise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import Tensor, nn

from lmforge.config import preset
from lmforge.models import build_model
from lmforge.train.loop import TrainConfig, train
from lmforge.train.objectives import causal_lm

VOCAB = 64
SEQ = 32


def counter_rows(n: int, seed: int, lag: int = 2) -> Tensor:
    """`n` rows of `lag` interleaved counters with random starts (n, SEQ): token t = token t-lag + 1."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (n, lag), generator=g)
    steps = torch.arange(SEQ) // lag  # (SEQ,)
    return (starts[:, torch.arange(SEQ) % lag] + steps) % VOCAB  # (n, SEQ)


def random_rows(n: int, seed: int) -> Tensor:
    """`n` rows of uniformly random tokens (n, SEQ)."""
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def as_batch(rows: Tensor) -> dict[str, Tensor]:
    labels = torch.cat([rows[:, 1:], torch.full((rows.shape[0], 1), -100)], dim=1)  # (B, SEQ)
    return {"input_ids": rows, "labels": labels}


class RowLoader:
    """Cycles through fixed rows, `batch` at a time; resumable."""

    def __init__(self, rows: Tensor, batch: int) -> None:
        self.rows, self.batch, self.pos = rows, batch, 0

    def next_batch(self) -> dict[str, Tensor]:
        idx = (torch.arange(self.batch) + self.pos) % self.rows.shape[0]
        self.pos += self.batch
        return as_batch(self.rows[idx])

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, d: dict) -> None:
        self.pos = d["pos"]


def tiny_model(name: str = "tiny-llama", **overrides: object) -> nn.Module:
    torch.manual_seed(0)
    return build_model(preset(name, vocab_size=VOCAB, **overrides))


def save_weights(model: nn.Module, folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps({"vocab": VOCAB}))
    save_model(model, str(folder / "model.safetensors"))


def run(out: Path, model: nn.Module | None = None, *, train_rows: Tensor | None = None, eval_rows: Tensor | None = None,
        **cfg: object) -> Path:
    """Train `model` (default: tiny LLaMA) on `train_rows` (default: counters) into `out`; return `out`."""
    model = tiny_model() if model is None else model
    train_rows = counter_rows(256, 0) if train_rows is None else train_rows
    eval_rows = counter_rows(16, 1) if eval_rows is None else eval_rows
    base = dict(steps=60, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_every=10, eval_batches=0,
                save_every=0, log_every=2, seed=0, resume="never", watch_attention=True)
    config = TrainConfig(**{**base, **cfg})
    train(model, causal_lm, RowLoader(train_rows, config.batch_size), config, out,
          make_eval_batches=lambda: iter([as_batch(eval_rows)]), save_model=save_weights)
    return out


class DeepTanhLM(nn.Module):
    """A deep stack of tanh layers without residual connections or norms, initialised small:
    the textbook network whose early layers get vanishing gradients."""

    def __init__(self, n_layers: int = 12, dim: int = 32, gain: float = 0.3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_layers))
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=gain / dim**0.5)
        self.lm_head = nn.Linear(dim, VOCAB)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        x = self.embed(input_ids)  # (B, T, dim)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        logits = self.lm_head(x)  # (B, T, VOCAB)
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")


def force_uniform_head(model: nn.Module, layer: int, head: int) -> None:
    """Zero the queries of one head and keep them zero (a gradient hook): every score equal, forever."""
    q = model.layers[layer].attn.q.weight
    rows = slice(head * model.config.head_dim, (head + 1) * model.config.head_dim)
    with torch.no_grad():
        q[rows] = 0
    keep = torch.ones_like(q)
    keep[rows] = 0
    q.register_hook(lambda grad: grad * keep)
