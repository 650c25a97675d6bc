"""The decoder: GPT-2, LLaMA, Mistral, Mixtral, Qwen2, Qwen3, Gemma and Phi-3 from one class.

The families differ only in the components `ModelConfig` selects when the model is built:
learned vs rotary positions, LayerNorm vs RMSNorm (plain or unit-offset), GELU MLP vs gated MLP
(SwiGLU, GeGLU) vs mixture of experts, full vs sliding-window attention, per-head query/key
norms or none, scaled or plain embeddings, tied vs untied output embeddings. `forward` is the
same straight line for all of them: embed, scale, add positions, blocks, final norm, output
projection.

Packed training sequences (several documents in one row, see `data/sft.py`) pass
`document_ids` (B, T): a token attends only to earlier tokens of its own document, and the
caller restarts `positions` at 0 for each document, so a packed document computes what it
would alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.models.cpu_ops import SMALL_LOGITS, Linear, TiedGradient, embedding, linear_cross_entropy
from lmforge.models.kv_cache import CacheView
from lmforge.models.layers import (
    Block,
    Blocks,
    attention_mask,
    init_weights,
    make_dropout,
    make_embedding_scale,
    make_norm,
    make_positions,
)


def default_positions(input_ids: Tensor) -> Tensor:
    B, T = input_ids.shape
    return torch.arange(T, device=input_ids.device).expand(B, T)  # (B, T)


class GPT(nn.Module):
    """A causal decoder: `model(ids)` -> logits (B, T, vocab_size)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.embed_scale = make_embedding_scale(config)
        self.positions = make_positions(config)
        self.drop = make_dropout(config)
        self.layers = Blocks(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config)
        self.lm_head = Linear(config.dim, config.vocab_size, bias=False)
        init_weights(self, config)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def hidden_states(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        document_ids: Tensor | None = None,
        cache: CacheView | None = None,
        tied: TiedGradient | None = None,
    ) -> list[Tensor]:
        """The residual stream after the embeddings and after every block, the last one normed.

        `attention_mask` (B, T) marks padding with 0; `positions` (B, T) default to 0..T-1;
        `document_ids` (B, T) keep packed documents from attending to each other (training only);
        with a `cache`, keys and values of earlier steps are attended to and this step's are stored.
        `tied` takes the gradient of the tied output projection to the token lookup, which adds
        its rows to it (see `TiedGradient`).
        """
        positions = default_positions(input_ids) if positions is None else positions
        tokens = self.embed_scale(embedding(input_ids, self.embed.weight, tied))  # (B, T, dim)
        x = self.drop(self.positions.add(tokens, positions))  # (B, T, dim)
        rope = self.positions.angles(positions)
        mask = self._mask(positions, attention_mask, document_ids, cache)
        states = self.layers.run(x, rope, mask, cache)
        states[-1] = self.norm(states[-1])
        if cache is not None:
            cache.commit()
        return states

    def forward(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        positions: Tensor | None = None,
        document_ids: Tensor | None = None,
        cache: CacheView | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, vocab_size); given `labels` (B, T), instead the cross-entropy summed over
        the labels that are not -100, computed without materialising the logits.

        With tied embeddings the fused loss hands the dense gradient of the shared weight to the
        token lookup, which adds its rows in place: one vocabulary-sized gradient buffer per step.
        Up to `SMALL_LOGITS` logits (a small model's batch) the logits are materialised instead:
        fewer operations (`benchmarks/shakespeare.py`).
        """
        fused = (labels is not None and type(self.lm_head) is Linear and self.lm_head.bias is None
                 and labels.numel() * self.config.vocab_size > SMALL_LOGITS and not torch.compiler.is_compiling())
        tied = TiedGradient() if fused and self.lm_head.weight is self.embed.weight else None
        h = self.hidden_states(input_ids, attention_mask=attention_mask, positions=positions, document_ids=document_ids,
                               cache=cache, tied=tied)[-1]
        if labels is None:
            return self.lm_head(h)  # (B, T, vocab_size)
        if fused:
            return linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, labels.flatten(), tied=tied)
        return F.cross_entropy(self.lm_head(h).flatten(0, 1).float(), labels.flatten(), reduction="sum")

    def _mask(
        self, positions: Tensor, padding: Tensor | None, documents: Tensor | None, cache: CacheView | None
    ) -> Tensor | None:
        """None when plain causality is all there is (the fused kernel's fast path)."""
        window = self.config.sliding_window
        if cache is not None:
            return attention_mask(positions, cache.prepare(positions), causal=True, window=window)
        if padding is None and window is None and documents is None:
            return None
        mask = attention_mask(positions, positions, causal=True, window=window, k_valid=padding,
                              q_doc=documents, k_doc=documents)
        diagonal = torch.eye(positions.shape[1], dtype=torch.bool, device=positions.device)
        return mask | diagonal  # a padding query attends to itself, so no row is empty (no NaN)
