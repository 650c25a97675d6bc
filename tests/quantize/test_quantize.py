"""Weight-only int8 / int4: bounded error, real storage savings, save/load, QLoRA."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from few_steps import train_few_steps
from lmforge.checkpoint.io import unique_state
from lmforge.config import preset
from lmforge.errors import LmforgeError
from lmforge.models import build_model
from lmforge.models.cpu_ops import Linear
from lmforge.quantize import load_quantized, model_bytes, quantize_model, quantized_layers, save_quantized
from lmforge.quantize.linear import QuantLinear, pack_int4, unpack_int4
from lmforge.train.lora import LoraConfig, apply_lora, merge_lora

IDS = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(1))
SETTINGS = [(8, 64), (4, 32), (4, 64), (4, 128)]


def tiny(name: str = "tiny-llama") -> nn.Module:
    """A tiny model whose every linear width is a multiple of the int4 groups (tiny-llama's MLP is 172 wide)."""
    torch.manual_seed(0)
    return build_model(replace(preset(name), dim=128, head_dim=32, hidden_dim=256)).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_pack_unpack_int4():
    q = torch.randint(0, 16, (3, 10), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (3, 5) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)


@pytest.mark.parametrize(("bits", "group_size", "bound"), [(8, 64, 0.01), (4, 32, 0.12), (4, 128, 0.15)])
def test_weight_error_is_bounded(bits, group_size, bound):
    torch.manual_seed(0)
    linear = nn.Linear(384, 48)
    q = QuantLinear.from_linear(linear, bits, group_size)
    assert relative_error(q.dequantize(), linear.weight) < bound
    x = torch.randn(5, 384)
    assert relative_error(q(x), linear(x)) < bound


def test_zero_weights_stay_exact():
    linear = nn.Linear(64, 4, bias=False)
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[1, 3] = 0.5
    for bits in (8, 4):
        assert torch.equal(QuantLinear.from_linear(linear, bits, 32).dequantize(), linear.weight)


def test_storage_is_a_quarter_and_an_eighth():
    linear = nn.Linear(256, 128, bias=False)
    fp32 = 256 * 128 * 4
    q8, q4 = QuantLinear.from_linear(linear, 8), QuantLinear.from_linear(linear, 4, 64)
    assert q8.qweight.numel() * q8.qweight.element_size() == fp32 // 4
    assert q4.qweight.numel() * q4.qweight.element_size() == fp32 // 8
    assert model_bytes(q8) == fp32 // 4 + 128 * 4  # + one float32 scale per row
    assert model_bytes(q4) == fp32 // 8 + 128 * 4 * (4 + 1)  # + float32 scale and uint8 zero per group
    assert not list(q8.parameters())  # everything is a buffer


@pytest.mark.parametrize(("bits", "group_size"), SETTINGS)
def test_logits_close_to_float(bits, group_size):
    model = tiny()
    ref = logits(model)
    quantize_model(model, bits, group_size)
    assert "lm_head" not in quantized_layers(model) and "layers.1.mlp.down" in quantized_layers(model)
    out = logits(model)
    err = float((out - ref).abs().max() / ref.abs().max())
    agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    if bits == 8:
        assert err < 0.02 and agree > 0.95
    else:
        assert err < 0.2 and agree > 0.7  # random logits are flat: the argmax of a near-tie flips


def test_whole_model_gets_smaller():
    model = tiny()
    before = model_bytes(model)
    linear = sum(m.weight.numel() * 4 for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    after8 = model_bytes(quantize_model(copy.deepcopy(model), 8))
    after4 = model_bytes(quantize_model(copy.deepcopy(model), 4, 32))
    assert after8 < before - 0.7 * linear and after4 < after8


@pytest.mark.parametrize(("bits", "group_size"), [(8, 64), (4, 32)])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_save_load_round_trip(tmp_path, name, bits, group_size):
    model = quantize_model(tiny(name), bits, group_size)
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q").eval()
    assert quantized_layers(loaded) == quantized_layers(model)
    assert torch.equal(logits(loaded), logits(model))
    for key, t in unique_state(model).items():
        assert unique_state(loaded)[key].dtype == t.dtype, key


def test_qlora_trains_only_adapters():
    model = quantize_model(tiny(), 4, 32)
    frozen = {k: v.clone() for k, v in unique_state(model).items()}
    apply_lora(model, LoraConfig(rank=4, targets=["*.attn.q", "*.attn.v", "*.mlp.*"]))
    assert isinstance(model.layers[0].attn.q.base, QuantLinear)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(n.endswith((".lora_a", ".lora_b")) for n, p in model.named_parameters() if p.requires_grad)
    train_few_steps(model)
    state = unique_state(model)
    for key, t in frozen.items():
        now = state.get(key, state.get(key.rsplit(".", 1)[0] + ".base." + key.rsplit(".", 1)[1]))
        assert torch.equal(now, t), key
    adapted = logits(model.eval())
    merge_lora(model)  # a quantized base merges into a float Linear
    assert type(model.layers[0].attn.q) is Linear and isinstance(model.layers[0].attn.k, QuantLinear)
    assert_close(logits(model), adapted, atol=1e-5, rtol=1e-5)


def test_bad_settings_raise(tmp_path):
    with pytest.raises(LmforgeError, match="bits"):
        quantize_model(tiny(), bits=3)
    with pytest.raises(LmforgeError, match="group_size"):
        quantize_model(tiny(), bits=4, group_size=48)
    model = build_model(preset("tiny-llama"))  # 64 wide, its MLP 172
    with pytest.raises(LmforgeError, match=r"group_size 128 does not divide the width 64 of layer 'layers.0.attn.q'; "
                                           r"use group size 32 or 64$"):
        quantize_model(model, bits=4, group_size=128)
    with pytest.raises(LmforgeError, match=r"width 172 of layer 'layers.0.mlp.down'; leave it in float \(skip it\) or use 8 bits$"):
        quantize_model(model, bits=4, group_size=32)
    assert not quantized_layers(model)  # nothing was swapped before the error
    with pytest.raises(LmforgeError, match="no linear layer"):
        quantize_model(tiny(), skip=["*"])
    with pytest.raises(LmforgeError, match="no quantized layers"):
        save_quantized(tiny(), tmp_path / "x")
    with pytest.raises(LmforgeError, match=r"quantization\.json"):
        load_quantized(tmp_path)
