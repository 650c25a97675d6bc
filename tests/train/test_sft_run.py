"""SFT end to end: it learns; LoRA wiring, the merged export, and merging through the CLI."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.testing import assert_close

import lmforge
from lmforge.checkpoint import load_model
from lmforge.checkpoint.io import read_tensors
from lmforge.cli import main
from lmforge.data.rows import iter_row_batches
from lmforge.data.sft import collate_sft, encode_sft_file, sequences
from lmforge.train.finetune import run_sft
from lmforge.train.loop import evaluate_objective
from lmforge.train.lora import load_adapter, merge_lora
from lmforge.train.objectives import sft

IDS = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110]])


def assistant_loss(model, tokenizer, path) -> float:
    examples, _ = encode_sft_file(path, tokenizer, 128, "drop")
    batches = iter_row_batches(sequences(examples, 128, False, 0), partial(collate_sft, pad_id=0, packed=False), 16)
    return evaluate_objective(model, sft, batches)["eval_loss"]


def test_sft_lowers_the_assistant_token_loss(recipe, tiny_lm_dir, tiny_tokenizer, capitals_jsonl, tmp_path):
    before = assistant_loss(lmforge.load(tiny_lm_dir).model, tiny_tokenizer, capitals_jsonl)
    messages = []
    result = run_sft(recipe(tiny_lm_dir, capitals_jsonl, tmp_path / "run", data={"eval_fraction": 0.25}),
                     report=messages.append)
    assert any("48 rows -> 48 examples" in m for m in messages)
    after = assistant_loss(lmforge.load(tmp_path / "run").model, tiny_tokenizer, capitals_jsonl)
    assert after < before - 2.0, (before, after)
    assert result.train.final_eval["eval_loss"] < before - 2.0


def test_sft_with_lora_trains_only_the_adapters_and_exports_the_merge(recipe, tiny_lm_dir, capitals_jsonl, tmp_path):
    run = tmp_path / "run"
    run_sft(recipe(tiny_lm_dir, capitals_jsonl, run, data={"pack": True, "eval_fraction": 0.0},
                   lora={"rank": 4, "alpha": 8.0, "targets": ["*.attn.q", "*.attn.v", "*.mlp.down"]},
                   train={"steps": 5, "lr": 1e-2}))
    files = {p.name for p in run.iterdir()}
    assert {"adapter.safetensors", "adapter_config.json", "model.safetensors", "config.json", "tokenizer.json"} <= files
    adapter = read_tensors(run / "adapter.safetensors")
    assert adapter and all(k.endswith((".lora_a", ".lora_b")) for k in adapter)  # the checkpoint holds the adapter only
    assert any(k.endswith(".lora_b") and v.abs().sum() > 0 for k, v in adapter.items())  # B moved off zero

    base, merged = lmforge.load(tiny_lm_dir).model, lmforge.load(run).model
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert changed and all(k.endswith(("attn.q.weight", "attn.v.weight", "mlp.down.weight")) for k in changed)

    on_base, _ = load_model(tiny_lm_dir)
    load_adapter(on_base, run)
    with torch.no_grad():
        assert_close(merged(IDS), on_base.eval()(IDS), atol=1e-5, rtol=1e-5)  # merged == base + adapter

    transformers = pytest.importorskip("transformers")
    assert main(["lora", "merge", str(tiny_lm_dir), str(run), "--out", str(tmp_path / "hf"), "--hf"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert_close(hf(input_ids=IDS).logits, merge_lora(on_base)(IDS), atol=1e-4, rtol=1e-4)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
