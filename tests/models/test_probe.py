"""The attention probe: the probabilities it shows are the ones the fused attention applies, in every family."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import preset
from lmforge.models import build_model
from lmforge.models.layers import Attention
from lmforge.models.probe import attention_entropy, attention_maps, head_entropy, probabilities

FAMILIES = ["tiny-gpt2", "tiny-bert", "tiny-llama", "tiny-mistral", "tiny-mixtral"]


def attention_outputs_match(model: torch.nn.Module, call) -> int:
    """Run `call(model)`; for every attention layer check probabilities @ V, projected, equals its output."""
    checked = []

    def hook(module: Attention, args: tuple, output: torch.Tensor) -> None:
        x, rope, mask = args[:3]
        probs, _ = probabilities(module, x, rope, mask)
        _, _, v = module.project(x, rope)
        v = v.repeat_interleave(module.n_heads // module.n_kv_heads, dim=1)  # (B, n_heads, T, head_dim)
        y = (probs @ v.float()).transpose(1, 2).flatten(2)  # (B, T, n_heads * head_dim)
        torch.testing.assert_close(module.o(y), output, atol=2e-5, rtol=1e-4)
        checked.append(module.layer_idx)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Attention)]
    with torch.no_grad():
        call(model)
    for handle in handles:
        handle.remove()
    return len(checked)


@pytest.mark.parametrize("name", FAMILIES)
def test_probabilities_are_what_attention_applies(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(preset(name)).eval()
    ids = torch.randint(0, 256, (2, 24))  # longer than tiny-mistral's window of 16
    padding = torch.ones(2, 24, dtype=torch.long)
    padding[1, 18:] = 0
    assert attention_outputs_match(model, lambda m: m(ids)) == model.config.n_layers
    assert attention_outputs_match(model, lambda m: m(ids, attention_mask=padding)) == model.config.n_layers
    maps = attention_maps(model, lambda m: m(ids))
    assert len(maps) == model.config.n_layers and maps[0].shape == (2, model.config.n_heads, 24, 24)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, model.config.n_heads, 24))
    if model.config.causal:
        assert maps[0][0, 0, 3, 4:].abs().max() == 0  # no look-ahead
    if model.config.sliding_window:
        assert maps[0][0, 0, 20, :20 - 16 + 1].abs().max() == 0  # keys beyond the window get nothing


def test_head_entropy_is_zero_for_one_hot_and_one_for_uniform() -> None:
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]  # (1, 1, T, S)
    uniform = allowed.float() / allowed.sum(-1, keepdim=True)
    one_hot = torch.zeros(1, 1, 6, 6)
    one_hot[..., 0] = 1.0
    assert head_entropy(uniform, allowed).item() == pytest.approx(1.0)
    assert head_entropy(one_hot, allowed).item() == pytest.approx(0.0)


def test_entropy_sees_a_head_forced_uniform() -> None:
    torch.manual_seed(0)
    model = build_model(preset("tiny-gpt2"))
    with torch.no_grad():
        model.layers[1].attn.q.weight[:16] = 0  # head 0 of layer 1: every score equal
        model.layers[1].attn.q.bias[:16] = 0
    entropy = attention_entropy(model, torch.randint(0, 256, (1, 20)))
    assert len(entropy) == 2 and len(entropy[1]) == 4
    assert entropy[1][0] == pytest.approx(1.0, abs=1e-5) and max(entropy[1][1:]) < 1.0
