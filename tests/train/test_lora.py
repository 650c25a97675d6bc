"""LoRA: the adapter formula, exact merge, adapter files, frozen base, disabling, every family."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from few_steps import train_few_steps
from lmforge.checkpoint import save_hf
from lmforge.checkpoint.io import read_json, unique_state, write_json
from lmforge.config import preset
from lmforge.errors import LmforgeError
from lmforge.models import build_model
from lmforge.train.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_adapter,
    lora_disabled,
    lora_state_dict,
    merge_lora,
    save_adapter,
)

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
MLP_AND_ATTN = ["*.attn.q", "*.attn.k", "*.attn.v", "*.attn.o", "*.mlp.*"]
FAMILIES = {  # preset -> targets that cover its linear layers (experts' for Mixtral)
    "tiny-llama": MLP_AND_ATTN,
    "tiny-gpt2": MLP_AND_ATTN,
    "tiny-mixtral": ["*.attn.q", "*.attn.v", "*.mlp.experts.*"],
    "tiny-bert": MLP_AND_ATTN,
    "tiny-qwen2": MLP_AND_ATTN,  # q/k/v with biases
    "tiny-qwen3": MLP_AND_ATTN,  # the per-head norms are no linear layers: "*.attn.q" matches q alone
    "tiny-gemma": MLP_AND_ATTN,
    "tiny-phi3": MLP_AND_ATTN,  # a Phi-3 checkpoint's fused projections load as these q/k/v and gate/up
}


def tiny(name: str = "tiny-llama") -> nn.Module:
    torch.manual_seed(0)
    return build_model(preset(name)).eval()


def randomise_adapters(model: nn.Module, seed: int = 0) -> None:
    """Non-zero B, so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.1)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def test_lora_linear_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoraLinear(base, rank=3, alpha=4.0)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(7, 6)
    A, B, W, b = layer.lora_a, layer.lora_b, base.weight, base.bias
    want = x @ (W + (4.0 / 3) * B @ A).T + b
    assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    assert A.shape == (3, 6) and B.shape == (5, 3) and layer.scaling == pytest.approx(4 / 3)


def test_lora_a_init_is_kaiming_uniform_and_b_zero():
    layer = LoraLinear(nn.Linear(100, 8), rank=16, alpha=16.0)
    bound = 1 / math.sqrt(100)  # kaiming_uniform with a=sqrt(5): 1/sqrt(fan_in)
    assert layer.lora_a.abs().max() <= bound and layer.lora_a.abs().max() > 0.8 * bound
    assert (layer.lora_b == 0).all()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fresh_adapters_change_nothing_and_merge_exactly(name):
    model = tiny(name)
    base_logits, names = logits(model), list(unique_state(model))
    wrapped = apply_lora(model, LoraConfig(rank=4, targets=FAMILIES[name]))
    assert wrapped and all(isinstance(model.get_submodule(n), LoraLinear) for n in wrapped)
    assert torch.equal(logits(model), base_logits)
    randomise_adapters(model)
    adapted = logits(model)
    assert not torch.allclose(adapted, base_logits)
    with lora_disabled(model):
        assert torch.equal(logits(model), base_logits)
    assert torch.equal(logits(model), adapted)  # re-enabled on exit
    merge_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert list(unique_state(model)) == names
    assert_close(logits(model), adapted, atol=1e-5, rtol=1e-5)


def test_mixtral_targets_every_expert():
    model = tiny("tiny-mixtral")
    wrapped = apply_lora(model, LoraConfig(rank=2, targets=["*.mlp.experts.*"]))
    assert len(wrapped) == 2 * 4 * 3  # layers x experts x (gate, up, down)
    assert "layers.1.mlp.experts.3.up" in wrapped and not any("router" in n for n in wrapped)


def test_training_changes_only_adapters():
    model = tiny()
    before = {k: v.clone() for k, v in unique_state(model).items()}
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, dropout=0.1))
    assert all(n.endswith((".lora_a", ".lora_b")) for n, p in model.named_parameters() if p.requires_grad)
    train_few_steps(model)
    after = unique_state(model)
    for name, t in before.items():
        wrapped_name = name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        now = after[name] if name in after else after[wrapped_name]
        assert torch.equal(now, t), name
    assert any(not torch.equal(m.lora_b, torch.zeros_like(m.lora_b)) for m in model.modules() if isinstance(m, LoraLinear))


def test_train_modules_stay_trainable_and_are_saved():
    model = tiny("tiny-gpt2")
    cfg = LoraConfig(rank=2, train_modules=["layers.1.mlp_norm"])
    apply_lora(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"layers.1.mlp_norm.weight", "layers.1.mlp_norm.bias"} <= trainable
    state = lora_state_dict(model, cfg.train_modules)
    assert "layers.1.mlp_norm.weight" in state and "layers.0.attn.q.lora_a" in state
    assert not any(k.endswith("base.weight") for k in state)


def test_save_load_adapter_round_trip(tmp_path):
    model = tiny()
    cfg = LoraConfig(rank=4, alpha=8.0, targets=["attn.q", "attn.v", "*.mlp.down"], train_modules=["norm"])
    apply_lora(model, cfg)
    randomise_adapters(model)
    with torch.no_grad():
        model.norm.weight.mul_(1.5)
    save_adapter(model, cfg, tmp_path / "adapter", base_model="tiny-llama")
    meta = read_json(tmp_path / "adapter" / "adapter_config.json")
    assert meta["rank"] == 4 and meta["alpha"] == 8.0 and meta["base_model"] == "tiny-llama"
    want = logits(merge_lora(model))

    fresh = tiny()
    loaded = load_adapter(fresh, tmp_path / "adapter")
    assert loaded == cfg
    assert_close(logits(merge_lora(fresh)), want, atol=1e-5, rtol=1e-5)


def test_merged_export_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny()
    apply_lora(model, LoraConfig(rank=4, targets=MLP_AND_ATTN))
    randomise_adapters(model)
    want = logits(model)
    save_hf(merge_lora(model), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert_close(hf(input_ids=IDS).logits, want, atol=1e-4, rtol=1e-4)


def test_rank_zero_is_off():
    model = tiny()
    assert apply_lora(model, LoraConfig()) == []
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (LoraConfig(rank=2, targets=["*.attn.nothing"]), "match no linear layer"),
        (LoraConfig(rank=2, train_modules=["classifier"]), "match no module"),
        (LoraConfig(rank=-1), "lora.rank"),
        (LoraConfig(rank=2, dropout=1.0), "lora.dropout"),
    ],
)
def test_bad_config_raises(cfg, message):
    model = tiny()
    with pytest.raises(LmforgeError, match=message):
        apply_lora(model, cfg)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())  # nothing changed


def test_unmatched_pattern_lists_available_layers():
    with pytest.raises(LmforgeError, match=r"layers\.0\.attn\.q"):
        apply_lora(tiny(), LoraConfig(rank=2, targets=["*.attention.query"]))


def test_tied_layer_and_double_application_refused():
    model = tiny("tiny-gpt2")  # lm_head tied to the embeddings
    with pytest.raises(LmforgeError, match="tied"):
        apply_lora(model, LoraConfig(rank=2, targets=["lm_head"]))
    apply_lora(model, LoraConfig(rank=2))
    with pytest.raises(LmforgeError, match="already has LoRA"):
        apply_lora(model, LoraConfig(rank=2))


def test_load_adapter_errors(tmp_path):
    with pytest.raises(LmforgeError, match=r"no adapter_config\.json"):
        load_adapter(tiny(), tmp_path)
    model = tiny()
    cfg = LoraConfig(rank=2)
    apply_lora(model, cfg)
    save_adapter(model, cfg, tmp_path / "a")
    other = build_model(preset("tiny-llama", dim=32, n_heads=2, n_kv_heads=1))
    with pytest.raises(LmforgeError, match="does not fit"):
        load_adapter(other, tmp_path / "a")
    assert not any(isinstance(m, LoraLinear) for m in other.modules())  # left as it was
    (tmp_path / "a" / "adapter.safetensors").write_bytes(b"garbage")
    with pytest.raises(LmforgeError, match="not a readable safetensors"):
        load_adapter(tiny(), tmp_path / "a")
    write_json(tmp_path / "a" / "adapter_config.json", {"format": "something-else"})
    with pytest.raises(LmforgeError, match="not an lmforge LoRA"):
        load_adapter(tiny(), tmp_path / "a")


def test_tied_train_module_is_saved_once(tmp_path):
    model = tiny("tiny-gpt2")  # lm_head.weight is embed.weight
    cfg = LoraConfig(rank=2, train_modules=["lm_head"])
    apply_lora(model, cfg)
    assert model.embed.weight.requires_grad
    assert [k for k in lora_state_dict(model, cfg.train_modules) if not k.endswith(("lora_a", "lora_b"))] == ["lm_head.weight"]
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)
    save_adapter(model, cfg, tmp_path / "a")
    fresh = tiny("tiny-gpt2")
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh.embed.weight, model.embed.weight)
