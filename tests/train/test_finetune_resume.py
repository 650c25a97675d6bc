"""A fine-tuning run stopped at step k and resumed continues exactly as the uninterrupted run (LoRA or not)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint.io import read_tensors
from lmforge.train.finetune import run_classify, run_sft
from lmforge.train.report import Callback, StopTraining, read_metrics
from lmforge.train.setup import RunResult


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if step == self.step:
            raise StopTraining


class StepLog(Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.steps.append(step)


def train_losses(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_metrics(run / "metrics.jsonl") if m["kind"] == "train"]


def whole_and_resumed(run: Callable[..., RunResult], recipe_for: Callable[[Path], dict], tmp_path: Path,
                      stop_at: int, steps: int) -> tuple[Path, Path]:
    """The same run uninterrupted, and stopped at `stop_at` then resumed; the two run folders."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    run(recipe_for(whole))
    stopped = run(recipe_for(split), callbacks=[StopAt(stop_at)])
    assert stopped.train.stopped_early and stopped.train.step == stop_at
    resumed, log = recipe_for(split), StepLog()
    resumed["train"]["resume"] = "auto"
    assert run(resumed, callbacks=[log]).train.step == steps
    assert log.steps == list(range(stop_at + 1, steps + 1))  # it went on from the checkpoint
    assert train_losses(split) == train_losses(whole) and len(train_losses(whole)) == steps  # bit for bit
    return whole, split


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = read_tensors(a), read_tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_resumed_lora_sft_run_continues_exactly(recipe, tiny_lm_dir, capitals_jsonl, tmp_path):
    def recipe_for(out: Path) -> dict:  # LoRA dropout: the restored RNG states matter too
        return recipe(tiny_lm_dir, capitals_jsonl, out, data={"eval_fraction": 0.25, "pack": True},
                      lora={"rank": 4, "dropout": 0.1}, train={"steps": 6, "lr": 1e-2, "save_every": 2})

    whole, split = whole_and_resumed(run_sft, recipe_for, tmp_path, stop_at=3, steps=6)
    assert same_tensors(whole / "adapter.safetensors", split / "adapter.safetensors")
    assert same_tensors(whole / "model.safetensors", split / "model.safetensors")  # the merged export


@pytest.mark.parametrize("rank", [0, 4])
def test_a_resumed_classifier_run_continues_exactly(rank, recipe, tiny_lm_dir, jsonl, tmp_path):
    rows = [{"text": f"{word} film number {i}", "label": word} for i in range(24) for word in ("good", "bad")]
    data = jsonl("reviews.jsonl", rows)

    def recipe_for(out: Path) -> dict:
        return recipe(tiny_lm_dir, data, out, data={"eval_fraction": 0.25}, lora={"rank": rank},
                      train={"steps": 5, "batch_size": 8, "lr": 1e-2})

    whole, split = whole_and_resumed(run_classify, recipe_for, tmp_path, stop_at=2, steps=5)
    for name in ("head.safetensors", "model.safetensors", *(["adapter.safetensors"] if rank else [])):
        assert same_tensors(whole / name, split / name), name
