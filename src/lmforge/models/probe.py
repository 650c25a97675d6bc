"""Attention probabilities, made visible: the probe path next to the fused attention kernel.

The fused `scaled_dot_product_attention` never materialises the attention probabilities, so the
normal forward cannot hand them out. The probe runs the model's ordinary forward with a
pre-hook on every `Attention` module: the hook sees exactly the inputs the block sees (its
normed input, rotary angles and mask, which the model built for padding, sliding windows or
documents) and computes softmax(q k^T / sqrt(head_dim)) over the same mask explicitly. Nothing
changes for a forward without the probe (no hooks, no branch); `tests/models/test_probe.py`
checks that probabilities @ values is what the block's attention produces.

Entropy is reported normalised by the log of the number of keys each query may see, so 0 means
a head that always looks at one token (collapsed) and 1 a head that looks at everything
equally (uniform, i.e. carrying no position-specific information), whatever the sequence length.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lmforge.models.layers import Attention, Rope


def allowed_keys(mask: Tensor | None, causal: bool, n_queries: int, n_keys: int, device: torch.device) -> Tensor:
    """The boolean mask (B or 1, 1, T, S) attention applies: the given one, else causal or everything."""
    if mask is not None:
        return mask
    full = torch.ones(n_queries, n_keys, dtype=torch.bool, device=device)
    return (full.tril(n_keys - n_queries) if causal else full)[None, None]  # (1, 1, T, S)


def probabilities(attn: Attention, x: Tensor, rope: Rope, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The attention probabilities (B, n_heads, T, T) that `attn` applies to its input `x` (B, T, dim),
    and the boolean mask of the keys each query may attend (B or 1, 1, T, T)."""
    q, k, _ = attn.project(x, rope)  # (B, n_heads | n_kv_heads, T, head_dim)
    k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)  # (B, n_heads, T, head_dim)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, n_heads, T, T)
    allowed = allowed_keys(mask, attn.causal, q.shape[2], k.shape[2], x.device)
    return scores.masked_fill(~allowed, -math.inf).softmax(-1), allowed


def _probe(model: nn.Module, forward: Callable[[nn.Module], object]) -> list[tuple[Tensor, Tensor]]:
    """(probabilities, allowed keys) of every attention layer, in order, while `forward(model)` runs."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    seen: dict[int, tuple[Tensor, Tensor]] = {}

    def hook(module: Attention, args: tuple) -> None:
        x, rope, mask = args[:3]
        seen[module.layer_idx] = probabilities(module, x, rope, mask)

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    was_training = model.training
    model.eval()  # dropout off: the maps of the model as it predicts
    try:
        with torch.no_grad():
            forward(model)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [seen[i] for i in sorted(seen)]


def attention_maps(model: nn.Module, forward: Callable[[nn.Module], object]) -> list[Tensor]:
    """The attention probabilities of every layer, (B, n_heads, T, T) each, while `forward(model)` runs.

    `forward` calls the model as usual (e.g. `lambda m: m(ids)`), so every family's own
    masks apply; the model runs in eval mode (no dropout), without gradients or a KV cache.
    """
    return [probs for probs, _ in _probe(model, forward)]


def head_entropy(probs: Tensor, allowed: Tensor) -> Tensor:
    """Normalised attention entropy per head (n_heads,) of one layer's probabilities (B, n_heads, T, S).

    Each query's entropy is divided by log(number of keys `allowed` to it); queries that may see
    a single key carry no information and are left out (a one-token input gives NaN).
    """
    n_keys = allowed.sum(-1).float().expand(probs.shape[:-1])  # (B, n_heads, T)
    plogp = torch.where(probs > 0, probs * probs.clamp_min(1e-30).log(), torch.zeros_like(probs))
    entropy = -plogp.sum(-1)  # (B, n_heads, T)
    usable = n_keys > 1
    normed = torch.where(usable, entropy / n_keys.clamp_min(2).log(), torch.zeros_like(entropy))
    return normed.sum((0, 2)) / usable.sum((0, 2)).float()  # (n_heads,)


def attention_entropy(model: nn.Module, input_ids: Tensor) -> list[list[float]]:
    """Normalised entropy per layer and head of `model` on `input_ids` (B, T): 0 collapsed, 1 uniform."""
    probed = _probe(model, lambda m: m(input_ids))
    return [head_entropy(probs, allowed).tolist() for probs, allowed in probed]
