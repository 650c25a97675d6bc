"""Task heads on top of any lmforge model: sequence classification and reward (scalar) scores.

A head wraps its backbone (`self.backbone`, so backbone parameters are named
`backbone.layers...`) and adds one linear layer, `score`, on a pooled hidden state.

Design choices:
- Pooling is chosen when the head is built, never in `forward`: decoders default to the last
  non-pad token (the only one that has seen the whole sequence), encoders to BERT's [CLS]
  pooler when they have one, else the mean over non-pad tokens. `pool_hidden` is the one
  implementation, also used for sentence embeddings (mean-pooled and L2-normalised unless a
  sentence-transformers folder says otherwise).
- "Last non-pad" is the last position whose mask is 1, so left- and right-padded batches both
  work. Positions are counted from the mask (pads do not advance them), so a padded row gets
  the same score as the row alone, whatever the padding side.
- The classifier's `score` has a bias; the reward head's has none (a Bradley-Terry loss only
  sees score differences, so a bias would never learn).
- `head_config()` is the head's description (kind, n_labels, labels, pooling) and `build_head`
  rebuilds a head from it; how a head model lies on disk is `checkpoint/heads.py`'s business.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models.cpu_ops import Linear
from lmforge.models.layers import make_dropout

POOLINGS = ("last", "mean", "cls")

Pool = Callable[[nn.Module, Tensor, Tensor | None], Tensor]  # (backbone, hidden (B, T, dim), mask (B, T) | None) -> (B, dim)


# ---------------------------------------------------------------- pooling


def check_pooling(how: str) -> None:
    if how not in POOLINGS:
        raise LmforgeError(f"pooling must be one of {', '.join(POOLINGS)}; got {how!r}")


def pool_hidden(hidden: Tensor, attention_mask: Tensor | None, how: str) -> Tensor:
    """(B, T, dim) -> (B, dim): the last non-pad token ("last"), the mean of non-pad tokens ("mean")
    or the first non-pad token ("cls", where BERT puts [CLS]). No mask means no padding."""
    check_pooling(how)
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)  # (B, T)
    if how == "mean":
        mask = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, dim)
    real = attention_mask.long()  # (B, T)
    if how == "last":
        real = real * torch.arange(1, hidden.shape[1] + 1, device=hidden.device)  # the last 1 is the largest
    index = real.argmax(-1)  # (B,) argmax returns the first of equal maxima: the first real token for "cls"
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip pads: 0, 1, 2, ... over the real tokens of each row (pads get 0 or repeat)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def final_hidden(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
    """The backbone's last hidden state (B, T, dim), with positions counted over non-pad tokens."""
    if attention_mask is not None and kwargs.get("positions") is None:
        kwargs["positions"] = positions_from_mask(attention_mask)
    return backbone.hidden_states(input_ids, attention_mask=attention_mask, **kwargs)[-1]


def sentence_embeddings(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                        pooling: str = "mean", normalize: bool = True) -> Tensor:
    """Pooled (by default mean-pooled) and L2-normalised final hidden states (B, dim): what `lm.embed` returns."""
    pooled = pool_hidden(final_hidden(backbone, input_ids, attention_mask), attention_mask, pooling)  # (B, dim)
    return F.normalize(pooled, dim=-1) if normalize else pooled


def default_pooling(config: ModelConfig) -> str:
    """Decoders: the last token; encoders: [CLS] through the pooler if built, else the mean."""
    if config.kind == "decoder":
        return "last"
    return "cls" if config.pooler else "mean"


def _bert_pooler(backbone: nn.Module, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    first = pool_hidden(hidden, attention_mask, "cls")  # (B, dim) [CLS], wherever padding put it
    return backbone.pool(first[:, None])  # tanh(dense([CLS])) (B, dim)


def _pooled(backbone: nn.Module, hidden: Tensor, attention_mask: Tensor | None, how: str) -> Tensor:
    return pool_hidden(hidden, attention_mask, how)


def _pool_fn(backbone: nn.Module, how: str) -> Pool:
    """The pooling function; it takes the backbone as an argument so copies of a head pool with their own."""
    check_pooling(how)
    if how == "cls" and backbone.config.kind == "decoder":
        raise LmforgeError("pooling 'cls' needs an encoder: a decoder's first token sees nothing after it; use 'last'")
    if how == "cls" and getattr(backbone, "pooler", None) is not None:
        return _bert_pooler
    return partial(_pooled, how=how)


# ---------------------------------------------------------------- heads


class PooledHead(nn.Module):
    """backbone -> pooled hidden state (B, dim) -> dropout -> `score` (B, n_out).

    The shared base of `SequenceClassifier` and `RewardModel`; build one of those.
    """

    kind = "pooled"

    def __init__(self, backbone: nn.Module, n_out: int, pooling: str | None = None, bias: bool = True) -> None:
        super().__init__()
        if n_out < 1:
            raise LmforgeError(f"a head needs at least one output; got n_labels={n_out}")
        config: ModelConfig = backbone.config
        self.backbone = backbone
        self.pooling = pooling or default_pooling(config)
        self._pool = _pool_fn(backbone, self.pooling)
        self.drop = make_dropout(config)
        self.score = Linear(config.dim, n_out, bias=bias)
        nn.init.normal_(self.score.weight, std=config.init_std)
        if bias:
            nn.init.zeros_(self.score.bias)

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config

    def forward(self, input_ids: Tensor, *, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """(B, T) token ids (and the backbone's keyword inputs, e.g. token_type_ids) -> (B, n_out)."""
        hidden = final_hidden(self.backbone, input_ids, attention_mask, **kwargs)  # (B, T, dim)
        return self.score(self.drop(self._pool(self.backbone, hidden, attention_mask)))  # (B, n_out)

    def head_config(self) -> dict[str, Any]:
        """What `head.json` records to rebuild this head around its backbone."""
        return {"kind": self.kind, "n_labels": self.score.out_features, "pooling": self.pooling}


class SequenceClassifier(PooledHead):
    """Logits (B, n_labels) over labels for a whole sequence."""

    kind = "classifier"

    def __init__(self, backbone: nn.Module, n_labels: int, pooling: str | None = None,
                 labels: list[str] | None = None) -> None:
        super().__init__(backbone, n_labels, pooling, bias=True)
        if labels is not None and len(labels) != n_labels:
            raise LmforgeError(f"{len(labels)} label names given for {n_labels} labels; give one name per label")
        self.labels = labels

    def head_config(self) -> dict[str, Any]:
        return {**super().head_config(), "labels": self.labels}


class RewardModel(PooledHead):
    """A scalar score (B,) per sequence, read at the last non-pad token (decoders)."""

    kind = "reward"

    def __init__(self, backbone: nn.Module, pooling: str | None = None) -> None:
        super().__init__(backbone, 1, pooling, bias=False)

    def forward(self, input_ids: Tensor, *, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        return super().forward(input_ids, attention_mask=attention_mask, **kwargs).squeeze(-1)  # (B,)


def build_head(backbone: nn.Module, spec: dict[str, Any]) -> PooledHead:
    """Rebuild a head from its `head_config()` record."""
    if spec.get("kind") == "classifier":
        if not isinstance(spec.get("n_labels"), int):
            raise LmforgeError(f"the head record needs an integer n_labels; got {spec.get('n_labels')!r}")
        return SequenceClassifier(backbone, spec["n_labels"], spec.get("pooling"), spec.get("labels"))
    if spec.get("kind") == "reward":
        return RewardModel(backbone, spec.get("pooling"))
    raise LmforgeError(f"unknown head kind {spec.get('kind')!r}; expected 'classifier' or 'reward'")


__all__ = [
    "POOLINGS",
    "PooledHead",
    "RewardModel",
    "SequenceClassifier",
    "build_head",
    "default_pooling",
    "final_hidden",
    "pool_hidden",
    "positions_from_mask",
    "sentence_embeddings",
]
