"""Attention maps of any model: `LM.attention(text)` and `lmforge attention MODEL --text ... --out attn.png`.

The probabilities come from `models/probe.py` (the probe path beside the fused attention kernel);
this module pairs them with the tokens as text and draws them as heatmaps with token labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.figures import new_figure, save_figure
from lmforge.models.probe import attention_maps
from lmforge.tokenizer import Tokenizer

LABELLED_TOKENS = 48  # maps label each token up to this length


@dataclass
class AttentionMaps:
    """What `LM.attention(text)` returns: the tokens and every layer's attention probabilities."""

    tokens: list[str]  # each token as text, in order
    probs: Tensor  # (n_layers, n_heads, T, T): row t is how token t spreads its attention over the tokens


def attention_of(model: nn.Module, tokenizer: Tokenizer, text: str) -> AttentionMaps:
    """The attention maps of `model` reading `text` (with the tokenizer's special tokens, as the model sees it)."""
    ids = tokenizer.encode(text, add_special_tokens=True)
    if not ids:
        raise LmforgeError("the text is empty after tokenization; pass some words with --text")
    device = next(model.parameters()).device
    maps = attention_maps(model, lambda m: m(torch.tensor([ids], device=device)))
    return AttentionMaps([tokenizer.decode([i]) for i in ids], torch.stack([m[0] for m in maps]).cpu())


def plot_attention(maps: AttentionMaps, path: Path, *, layer: int | None = None, head: int | None = None) -> None:
    """Heatmaps of the chosen attention maps with the tokens as labels: one head, one layer's heads, or all."""
    n_layers, n_heads = maps.probs.shape[:2]
    layers = [layer] if layer is not None else list(range(n_layers))
    heads = [head] if head is not None else list(range(n_heads))
    chosen = [(i, j) for i in layers for j in heads]
    cols = min(len(heads), 4) if len(chosen) > 1 else 1
    rows = math.ceil(len(chosen) / cols)
    size = 7 if len(chosen) == 1 else 3.5
    fig = new_figure((size * cols, size * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    labels = [t.replace("\n", "\\n").replace(" ", "\u2423") for t in maps.tokens] if len(maps.tokens) <= LABELLED_TOKENS else None
    for ax, (i, j) in zip(axes.flat, chosen, strict=False):
        ax.imshow(maps.probs[i, j].float().numpy(), vmin=0.0, vmax=1.0, cmap="Blues", interpolation="nearest")
        ax.set_title(f"layer {i} head {j}", fontsize=9)
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7 if len(chosen) == 1 else 5)
            ax.set_yticks(range(len(labels)), labels, fontsize=7 if len(chosen) == 1 else 5)
    for ax in list(axes.flat)[len(chosen):]:
        ax.set_axis_off()
    save_figure(fig, path)


def check_choice(maps: AttentionMaps, layer: int | None, head: int | None) -> None:
    """Raise LmforgeError (one line) for a --layer or --head the model does not have."""
    n_layers, n_heads = maps.probs.shape[:2]
    if layer is not None and not 0 <= layer < n_layers:
        raise LmforgeError(f"--layer must be in 0..{n_layers - 1} (the model has {n_layers} layers); got {layer}")
    if head is not None and not 0 <= head < n_heads:
        raise LmforgeError(f"--head must be in 0..{n_heads - 1} (the model has {n_heads} heads); got {head}")
