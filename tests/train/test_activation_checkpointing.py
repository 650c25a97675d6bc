"""train.activation_checkpointing: the loop switches the model's block loop to recompute, and trains the same weights."""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.config import preset
from lmforge.models import build_model
from lmforge.train.loop import TrainConfig, train
from lmforge.train.objectives import causal_lm


class FixedBatches:
    """The same two batches in turn (resumable by index)."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(3)
        ids = [torch.randint(0, 64, (2, 17), generator=gen) for _ in range(2)]
        self.batches = [{"input_ids": x[:, :-1], "labels": x[:, 1:]} for x in ids]
        self.i = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        self.i += 1
        return self.batches[(self.i - 1) % 2]

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, d: dict) -> None:
        self.i = d["i"]


def test_loop_with_checkpointing_trains_the_same_weights(tmp_path: Path) -> None:
    weights = []
    for on in (False, True):
        torch.manual_seed(0)
        model = build_model(preset("tiny-llama", vocab_size=64, dropout=0.1))
        cfg = TrainConfig(steps=3, lr=1e-2, warmup_steps=0, eval_every=0, save_every=0, log_every=1, seed=0,
                          activation_checkpointing=on)
        train(model, causal_lm, FixedBatches(), cfg, tmp_path / str(on), save_model=lambda m, path: None)
        assert model.layers.checkpointed is on
        weights.append(model.state_dict())
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name
