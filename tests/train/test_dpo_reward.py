"""DPO and reward models end to end on the tiny model: references, no second copy, saving, resume, scores."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.testing import assert_close

import lmforge
from _helpers import CHOSEN, REJECTED, quick_train
from lmforge.checkpoint import load_model
from lmforge.data.preference import pack_rows
from lmforge.evaluate.logprobs import sequence_logps
from lmforge.models.gpt import GPT
from lmforge.train.align import adapter_reference, run_dpo, run_reward
from lmforge.train.lora import LoraConfig, LoraLinear, apply_lora
from lmforge.train.report import read_metrics
from lmforge.train.setup import FinetuneConfig, load_base

BATCH = pack_rows([[1, 40, 41], [1, 42]], [[50, 51, 2], [52, 2]], pad_id=0)


def adapted(folder) -> torch.nn.Module:
    model, _ = load_base(FinetuneConfig(base=str(folder)))
    apply_lora(model, LoraConfig(rank=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.1)  # adapters that change the output
    return model


def test_lora_reference_is_the_base_model_with_adapters_off(tiny_lm_dir):
    model = adapted(tiny_lm_dir).train()
    base, _ = load_model(tiny_lm_dir)
    ref = adapter_reference(model, BATCH)
    with torch.no_grad():
        assert_close(ref, sequence_logps(base.eval(), BATCH))
        assert not torch.allclose(ref, sequence_logps(model.eval(), BATCH), atol=1e-3)  # the adapters matter
    assert not ref.requires_grad
    assert not any(m.disabled for m in model.modules() if isinstance(m, LoraLinear))  # switched back on


def dpo_recipe(base, data, out, *, lora: int = 0, precompute: bool = False, **train) -> dict:
    return {"finetune": {"base": str(base)}, "dpo": {"beta": 0.5, "precompute_ref": precompute},
            "data": {"train": str(data), "eval_fraction": 0.25},
            "lora": {"rank": lora}, "train": quick_train(**{"steps": 2, **train}), "out_dir": str(out)}


def decoders_run_by(recipe: dict) -> int:
    """How many distinct decoder models compute a forward pass while `recipe` trains."""
    seen: set[int] = set()

    def hook(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, GPT):
            seen.add(id(module))

    handle = register_module_forward_pre_hook(hook)
    try:
        run_dpo(recipe)
    finally:
        handle.remove()
    return len(seen)


def test_dpo_with_lora_makes_no_second_model(tiny_lm_dir, prefs_file, tmp_path, monkeypatch):
    assert decoders_run_by(dpo_recipe(tiny_lm_dir, prefs_file, tmp_path / "full")) == 2  # the policy and its frozen copy
    assert decoders_run_by(dpo_recipe(tiny_lm_dir, prefs_file, tmp_path / "pre", precompute=True)) == 1

    deepcopy = copy.deepcopy

    def no_model_copies(obj, *args, **kwargs):
        if isinstance(obj, torch.nn.Module):
            raise AssertionError("DPO with LoRA must not copy the model")
        return deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(copy, "deepcopy", no_model_copies)
    assert decoders_run_by(dpo_recipe(tiny_lm_dir, prefs_file, tmp_path / "lora", lora=4)) == 1


def test_precomputed_reference_trains_like_the_live_one(tiny_lm_dir, prefs_file, tmp_path):
    live = run_dpo(dpo_recipe(tiny_lm_dir, prefs_file, tmp_path / "live", steps=3))
    pre = run_dpo(dpo_recipe(tiny_lm_dir, prefs_file, tmp_path / "pre", steps=3, precompute=True))
    assert pre.train.final_eval["eval_loss"] == pytest.approx(live.train.final_eval["eval_loss"], rel=1e-4)
    assert pre.train.final_train_loss == pytest.approx(live.train.final_train_loss, rel=1e-4)


def test_dpo_lora_learns_saves_merged_and_resumes_exactly(tiny_lm_dir, prefs_file, tmp_path):
    whole = run_dpo(dpo_recipe(tiny_lm_dir, prefs_file, tmp_path / "whole", lora=4, steps=6))
    assert whole.train.final_eval["eval_accuracy"] == 1.0 and whole.train.final_eval["eval_margin"] > 0
    run_dpo(dpo_recipe(tiny_lm_dir, prefs_file, tmp_path / "split", lora=4, steps=3))
    again = run_dpo(dpo_recipe(tiny_lm_dir, prefs_file, tmp_path / "split", lora=4, steps=6))  # resumes at step 3
    assert again.train.step == 6
    tensors = [lmforge.load(tmp_path / name).model.state_dict() for name in ("whole", "split")]
    for key, value in tensors[0].items():
        assert torch.equal(value, tensors[1][key]), key
    train = [r["loss"] for r in read_metrics(tmp_path / "whole" / "metrics.jsonl") if r["kind"] == "train"]
    assert train[-1] < train[0]
    metrics = read_metrics(tmp_path / "whole" / "metrics.jsonl")[0]
    assert {"chosen_reward", "rejected_reward", "margin", "accuracy"} <= set(metrics)


@pytest.mark.parametrize("rank", [0, 4])
def test_reward_model_learns_and_scores_through_lm_score(tiny_lm_dir, prefs_file, tmp_path, rank):
    recipe = {"finetune": {"base": str(tiny_lm_dir)}, "data": {"train": str(prefs_file), "eval_fraction": 0.25},
              "lora": {"rank": rank}, "train": quick_train(8), "out_dir": str(tmp_path / "rm")}
    lines: list[str] = []
    result = run_reward(recipe, report=lines.append)
    assert lines == [f"{prefs_file}: 24 rows, 24 pairs kept"]
    assert result.train.final_eval["eval_accuracy"] == 1.0
    lm = lmforge.load(tmp_path / "rm")
    assert lm.score("Q99: which animal?", CHOSEN) > lm.score("Q99: which animal?", REJECTED)
    assert run_reward(recipe).train.step == 8  # a finished run resumes from its own folder and stops
