"""The encoder: BERT (Devlin et al., 2019), reusing the shared attention and MLP blocks.

BERT differs from the decoders in three ways, each chosen at build time: attention is
bidirectional (`config.causal` is False), blocks are post-norm (`PostNormBlock`), and the
embeddings add token-type vectors and are normed before the first block. Two optional heads:
the masked-LM head (dense, GELU, LayerNorm, tied output projection with its own bias) and the
[CLS] pooler (dense + tanh) used by sentence classifiers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.models.cpu_ops import Linear
from lmforge.models.gpt import default_positions
from lmforge.models.layers import (
    Attention,
    Blocks,
    Rope,
    attention_mask,
    init_weights,
    make_dropout,
    make_mlp,
    make_norm,
    make_positions,
)


class PostNormBlock(nn.Module):
    """norm(x + attn(x)), then norm(x + mlp(x)): the original transformer block."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = Attention(config, layer_idx)
        self.attn_norm = make_norm(config)
        self.mlp = make_mlp(config)
        self.mlp_norm = make_norm(config)

    def forward(self, x: Tensor, rope: Rope, mask: Tensor | None, cache=None) -> Tensor:
        x = self.attn_norm(x + self.attn(x, rope, mask))
        return self.mlp_norm(x + self.mlp(x))


class MaskedLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> output projection (weights tied to the input embeddings)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = Linear(config.dim, config.dim)
        self.norm = make_norm(config)
        self.lm_head = Linear(config.dim, config.vocab_size)

    def forward(self, h: Tensor) -> Tensor:
        return self.lm_head(self.norm(F.gelu(self.dense(h))))  # (B, T, vocab_size)


class Bert(nn.Module):
    """A bidirectional encoder: `model(ids)` -> MLM logits (B, T, vocab), or hidden states without the head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.positions = make_positions(config)
        self.type_embed = nn.Embedding(max(config.type_vocab_size, 1), config.dim)
        self.embed_norm = make_norm(config)
        self.drop = make_dropout(config)
        self.layers = Blocks(PostNormBlock(config, i) for i in range(config.n_layers))
        self.pooler = Linear(config.dim, config.dim) if config.pooler else None
        self.head = MaskedLMHead(config) if config.mlm_head else nn.Identity()
        init_weights(self, config)
        if config.mlm_head and config.tie_embeddings:
            self.head.lm_head.weight = self.embed.weight

    def hidden_states(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        positions: Tensor | None = None,
        cache=None,
    ) -> list[Tensor]:
        """The encoder output after the embeddings and after every block."""
        positions = default_positions(input_ids) if positions is None else positions
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = self.positions.add(self.embed(input_ids) + self.type_embed(types), positions)
        x = self.drop(self.embed_norm(x))  # (B, T, dim)
        mask = self._mask(positions, attention_mask)
        return self.layers.run(x, None, mask)

    def forward(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        positions: Tensor | None = None,
        cache=None,
    ) -> Tensor:
        h = self.hidden_states(
            input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, positions=positions
        )[-1]
        return self.head(h)

    def pool(self, hidden: Tensor) -> Tensor:
        """BERT's pooled [CLS] vector, tanh(dense(h[:, 0])) (B, dim)."""
        if self.pooler is None:
            raise ValueError("this encoder was built without a pooler (config.pooler = false)")
        return torch.tanh(self.pooler(hidden[:, 0]))

    @staticmethod
    def _mask(positions: Tensor, padding: Tensor | None) -> Tensor | None:
        if padding is None:
            return None
        return attention_mask(positions, positions, causal=False, window=None, k_valid=padding)
