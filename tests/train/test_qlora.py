"""QLoRA end to end: `finetune.bits` 4 or 8 on sft, classify, dpo and grpo trains LoRA adapters on a
quantized frozen base; the run's merged model and `lmforge lora merge` fold them into the
dequantized weights of that base (what the adapters were trained against), written in float32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from _helpers import quick_train, write_jsonl
from lmforge.checkpoint import load_model
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.quantize import quantize_model, quantized_layers
from lmforge.train.align import run_dpo
from lmforge.train.finetune import run_classify, run_sft
from lmforge.train.grpo import run_grpo
from lmforge.train.lora import load_adapter, merge_lora

IDS = torch.tensor([[5, 9, 2, 7, 1, 3]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS)


def adapters_trained(run: Path) -> bool:
    tensors = load_file(run / "adapter.safetensors")
    return any(k.endswith("lora_b") and t.abs().sum() > 0 for k, t in tensors.items())


def quantization(run: Path) -> dict | None:
    return json.loads((run / "adapter_config.json").read_text())["quantization"]


def test_sft_on_a_4bit_base_merges_into_its_dequantized_weights(recipe, qlora_base_dir, capitals_jsonl, tmp_path, capsys):
    run = tmp_path / "run"
    run_sft(recipe(qlora_base_dir, capitals_jsonl, run, lora={"rank": 4}, finetune={"bits": 4, "group_size": 32},
                   train={"steps": 4, "lr": 1e-2}))
    assert quantization(run) == {"bits": 4, "group_size": 32} and adapters_trained(run)

    trained, _ = load_model(qlora_base_dir)  # what training computed: the adapters on the 4-bit base
    quantize_model(trained, 4, 32)
    load_adapter(trained, run)
    merged, _ = load_model(run)
    assert not quantized_layers(merged) and all(p.dtype == torch.float32 for p in merged.parameters())
    assert_close(logits(merged), logits(trained), atol=1e-5, rtol=1e-5)

    into_float, _ = load_model(qlora_base_dir)  # the same adapters on the float weights: not what was trained
    load_adapter(into_float, run)
    assert (logits(merge_lora(into_float)) - logits(trained)).abs().max() > 1e-3

    assert main(["lora", "merge", str(qlora_base_dir), str(run), "--out", str(tmp_path / "merged")]) == 0
    assert "merged into the dequantized int4 weights of" in capsys.readouterr().out
    assert_close(logits(load_model(tmp_path / "merged")[0]), logits(merged))


def classify_recipe(base: Path, out: Path, tmp_path: Path) -> dict:
    rows = tmp_path / "reviews.csv"
    rows.write_text("text,label\n" + "".join(f"{'good great' if i % 2 else 'bad awful'} film {i},{i % 2}\n" for i in range(24)))
    return {"finetune": {"base": str(base), "bits": 8}, "data": {"train": str(rows), "eval_fraction": 0.25},
            "lora": {"rank": 4}, "train": quick_train(2), "out_dir": str(out)}


def dpo_recipe(base: Path, out: Path, prefs: Path) -> dict:
    return {"finetune": {"base": str(base), "bits": 4}, "dpo": {"beta": 0.5},
            "data": {"train": str(prefs), "eval_fraction": 0.25}, "lora": {"rank": 4}, "train": quick_train(2),
            "out_dir": str(out)}


def grpo_recipe(base: Path, out: Path, tmp_path: Path) -> dict:
    (tmp_path / "qlora_rewards.py").write_text("def has_digit(prompt, completion):\n"
                                               "    return float(any(c.isdigit() for c in completion))\n")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"{i}+1="} for i in range(8)])
    return {"finetune": {"base": str(base), "bits": 4},
            "grpo": {"reward_functions": [f"{tmp_path / 'qlora_rewards.py'}:has_digit"], "group_size": 4,
                     "prompts_per_rollout": 2, "max_new_tokens": 4},
            "data": {"train": str(prompts), "eval_fraction": 0.25}, "lora": {"rank": 4}, "train": quick_train(2),
            "out_dir": str(out)}


@pytest.mark.parametrize("verb", ["classify", "dpo", "grpo"])
def test_every_fine_tuning_verb_trains_adapters_on_a_quantized_base(verb, qlora_base_dir, prefs_file, tmp_path):
    run = tmp_path / "run"
    if verb == "classify":
        run_classify(classify_recipe(qlora_base_dir, run, tmp_path))
    elif verb == "dpo":
        run_dpo(dpo_recipe(qlora_base_dir, run, prefs_file))
    else:
        run_grpo(grpo_recipe(qlora_base_dir, run, tmp_path))
    assert quantization(run)["bits"] == (8 if verb == "classify" else 4)
    assert adapters_trained(run) or verb == "grpo"  # GRPO's first steps may see equal rewards: no gradient
    assert (run / "model.safetensors").is_file()
    assert not any(k.endswith((".qweight", ".scales")) for k in load_file(run / "model.safetensors"))  # float32 merge


@pytest.mark.parametrize(("sections", "needle"), [
    ({"finetune": {"bits": 4, "group_size": 32}}, r"finetune.bits quantizes the base, which then stays frozen; .* --lora.rank 16"),
    ({"finetune": {"bits": 3}, "lora": {"rank": 4}}, "quantize bits must be 8 or 4; got 3"),
    ({"finetune": {"bits": 4, "group_size": 128}, "lora": {"rank": 4}}, "group_size 128 does not divide the width 64"),
])
def test_bad_qlora_settings_fail_in_one_line_before_training(recipe, qlora_base_dir, capitals_jsonl, tmp_path, sections, needle):
    with pytest.raises(LmforgeError, match=needle):
        run_sft(recipe(qlora_base_dir, capitals_jsonl, tmp_path / "run", **sections))
    assert not (tmp_path / "run").exists()
