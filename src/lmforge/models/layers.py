"""The architecture blocks every model is built from: norms, positions, attention, MLPs, experts.

Design choices:
- Components are chosen when a module is built (`make_norm`, `make_positions`, `make_mlp`,
  `make_embedding_scale`, and `Linear` for every projection), so every `forward` below is
  straight-line code. An optional part that a family lacks is an `nn.Identity` (the per-head
  query/key norms, the embedding scale), never a branch.
- Attention goes through PyTorch's fused `scaled_dot_product_attention`. Causality,
  padding, sliding windows and the KV cache are all expressed the same way: each query and
  each key carries its absolute position, and `attention_mask` turns positions into a boolean
  mask. When nothing but plain causality applies, no mask is built and the fused kernel's
  `is_causal` path is used. The one exception is a float32 CPU decode step (one query per
  sequence, no gradient): the native kernel of `kernels.py` stores the new keys/values and
  attends over the cache with the same mask in one call (`benchmarks/decode.py`).
- Rotary embeddings use the "rotate half" layout of Hugging Face checkpoints, so LLaMA-family
  weights load without permuting q/k rows.
- Grouped-query attention never copies keys/values per query head (`enable_gqa`).
- Projections (`Linear`) and GPT-2's GELU come from `cpu_ops.py`: they compute what
  `nn.Linear` and `F.gelu` compute, on faster CPU kernels where they apply.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models import kernels
from lmforge.models.cpu_ops import Linear, gelu
from lmforge.models.kv_cache import CacheView

Rope = tuple[Tensor, Tensor] | None  # (cos, signed sin), each (B, 1, T, head_dim); None without rotary positions


# ---------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """Root-mean-square norm (LLaMA), computed in float32 like the reference implementation."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # one fused op, bitwise equal to the formula below; other dtypes
            # keep the formula: normalise in float32, cast back, then scale (as the HF reference does)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class UnitOffsetRMSNorm(RMSNorm):
    """RMSNorm whose scale is 1 + weight (Gemma). The weight is kept as the offset the checkpoints
    store, so weights load and save bit for bit; scaling happens in float32 before the cast back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    """The config's norm over `dim` features (default: the residual width)."""
    dim = config.dim if dim is None else dim
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    if config.norm == "rmsnorm_unit_offset":
        return UnitOffsetRMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.norm_bias)


# ---------------------------------------------------------------- embeddings


class EmbeddingScale(nn.Module):
    """Token embeddings times sqrt(dim) (Gemma). The factor is a float32 buffer rounded to the
    embeddings' dtype before the product, as in the reference, so low-precision models match too."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(dim**0.5), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale.to(x.dtype)


def make_embedding_scale(config: ModelConfig) -> nn.Module:
    return EmbeddingScale(config.dim) if config.scale_embeddings else nn.Identity()


def make_dropout(config: ModelConfig) -> nn.Module:
    """The config's dropout; without dropout an `nn.Identity`, which a step of a small model
    calls a dozen times for nothing otherwise (`benchmarks/shakespeare.py`)."""
    return nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()


# ---------------------------------------------------------------- positions


class NoPositions(nn.Module):
    """Position-free models: nothing added, nothing rotated."""

    def add(self, x: Tensor, positions: Tensor) -> Tensor:
        return x

    def angles(self, positions: Tensor) -> Rope:
        return None


class LearnedPositions(NoPositions):
    """A trained table of position vectors added to the token embeddings (GPT-2, BERT)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.max_seq_len, config.dim))

    def add(self, x: Tensor, positions: Tensor) -> Tensor:
        return x + F.embedding(positions, self.weight)  # (B, T, dim)


class SinusoidalPositions(NoPositions):
    """The fixed sine/cosine table of Vaswani et al. (2017), added to the embeddings."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        pos = torch.arange(config.max_seq_len, dtype=torch.float32)[:, None]  # (max_seq_len, 1)
        freq = torch.exp(torch.arange(0, config.dim, 2, dtype=torch.float32) * (-math.log(10000.0) / config.dim))
        table = torch.zeros(config.max_seq_len, config.dim)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq[: config.dim // 2])
        self.register_buffer("table", table, persistent=False)

    def add(self, x: Tensor, positions: Tensor) -> Tensor:
        return x + self.table[positions].to(x.dtype)  # (B, T, dim)


def rope_frequencies(config: ModelConfig) -> Tensor:
    """Inverse frequencies of rotary embeddings, with optional linear or LLaMA-3 scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    if scaling.get("type") == "linear":
        return inv_freq / scaling["factor"]
    if scaling.get("type") == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    return inv_freq


def _llama3_scaled(inv_freq: Tensor, s: dict) -> Tensor:
    """LLaMA 3.1 frequency scaling: long wavelengths slowed by `factor`, a smooth ramp between."""
    factor, low, high, old_len = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_seq_len"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryPositions(NoPositions):
    """Rotary position embeddings (Su et al., 2021): q and k are rotated by position-dependent angles."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)

    def angles(self, positions: Tensor) -> Rope:
        freqs = positions[..., None].float() * self.inv_freq.float()  # (B, T, head_dim / 2)
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), dim=-1)[:, None], torch.cat((-sin, sin), dim=-1)[:, None]  # (B, 1, T, head_dim)


def make_positions(config: ModelConfig) -> NoPositions:
    kinds = {"learned": LearnedPositions, "sinusoidal": SinusoidalPositions, "rotary": RotaryPositions}
    return kinds[config.positions](config) if config.positions in kinds else NoPositions()


def apply_rotary(q: Tensor, k: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
    """x * cos + rotate_half(x) * sin, where rotate_half(x1, x2) = (-x2, x1). The sign lives in
    `sin` (its first half negated by `angles`), so the rotation is a roll: three ops, not six."""
    cos, sin = rope
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    half = q.shape[-1] // 2
    return torch.addcmul(q * cos, q.roll(half, -1), sin), torch.addcmul(k * cos, k.roll(half, -1), sin)


def no_rotation(q: Tensor, k: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
    return q, k


# ---------------------------------------------------------------- attention


def attention_mask(
    q_pos: Tensor,
    k_pos: Tensor,
    *,
    causal: bool,
    window: int | None,
    k_valid: Tensor | None = None,
    q_doc: Tensor | None = None,
    k_doc: Tensor | None = None,
) -> Tensor:
    """Boolean mask (B, 1, T, S), True where query t may attend key s.

    `q_pos` (B, T) and `k_pos` (B, S) are absolute positions; a key position of -1 marks an
    empty cache slot. `k_valid` (B, S) marks padding keys as False. Document ids `q_doc` (B, T)
    and `k_doc` (B, S) of packed sequences allow a query only the keys of its own document;
    positions then restart per document, and causality by position is causality within it.
    """
    q = q_pos[:, None, :, None]  # (B, 1, T, 1)
    k = k_pos[:, None, None, :]  # (B, 1, 1, S)
    allowed = k >= 0
    if causal:
        allowed = allowed & (k <= q)
    if window is not None:
        allowed = allowed & (q - k < window)
    if k_valid is not None:
        allowed = allowed & k_valid[:, None, None, :].bool()  # (B, 1, 1, S)
    if q_doc is not None and k_doc is not None:
        allowed = allowed & (q_doc[:, None, :, None] == k_doc[:, None, None, :])  # (B, 1, T, S)
    return allowed


def _sdpa_gqa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float, causal: bool) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, enable_gqa=True)


def _sdpa_repeat(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float, causal: bool) -> Tensor:
    groups = q.shape[1] // k.shape[1]  # torch < 2.5 has no enable_gqa: repeat kv heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, n_heads, S, head_dim)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)


_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")
sdpa: Callable[..., Tensor] = _sdpa_gqa if _SDPA_HAS_GQA else _sdpa_repeat


def _native_attention(q: Tensor, cache: CacheView | None, mask: Tensor | None, training: bool) -> kernels.Native | None:
    """The native kernels when they can run this attention: a decode step (one float32 CPU query
    per sequence, attending over a cache with a mask), without gradients or training."""
    if (cache is None or mask is None or training or q.shape[2] != 1 or q.dtype != torch.float32 or not q.is_cpu
            or torch.is_grad_enabled() or torch.compiler.is_compiling()):
        return None
    return kernels.native()


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, optional rotary positions and a KV cache.

    With `qk_norm`, each head's queries and keys are normed over `head_dim` before the rotation,
    which keeps attention logits bounded (Qwen3)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.causal = config.causal
        self.dropout = config.dropout
        self.q = Linear(config.dim, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k = Linear(config.dim, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v = Linear(config.dim, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o = Linear(self.n_heads * self.head_dim, config.dim, bias=config.attn_bias)
        self.q_norm = make_norm(config, self.head_dim) if config.qk_norm else nn.Identity()
        self.k_norm = make_norm(config, self.head_dim) if config.qk_norm else nn.Identity()
        self.rotate = apply_rotary if config.positions == "rotary" else no_rotation
        self.resid_drop = make_dropout(config)

    def project(self, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of `x` (B, T, dim), normed and rotated as attention uses them."""
        B, T, _ = x.shape
        q = self.q_norm(self.q(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = self.k_norm(self.k(x).view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = self.v(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        q, k = self.rotate(q, k, rope)
        return q, k, v

    def forward(self, x: Tensor, rope: Rope, mask: Tensor | None, cache=None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, rope)
        if (native := _native_attention(q, cache, mask, self.training)) is not None:
            # one decode token per sequence: store and attend in one native call
            y = native.decode_attention(q, k, v, *cache.buffers(self.layer_idx), cache.columns, mask)
        else:
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv_heads, S, head_dim)
            dropout = self.dropout if self.training else 0.0
            y = sdpa(q, k, v, mask, dropout, self.causal and mask is None)  # (B, n_heads, T, head_dim)
            y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, n_heads * head_dim)
        return self.resid_drop(self.o(y))


# ---------------------------------------------------------------- feed-forward


class GeluMLP(nn.Module):
    """Two projections with a GELU between (GPT-2 uses the tanh approximation, BERT the exact one)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up = Linear(config.dim, config.hidden_dim, bias=config.mlp_bias)
        self.down = Linear(config.hidden_dim, config.dim, bias=config.mlp_bias)
        self.approximate = "tanh" if config.mlp == "gelu_tanh" else "none"
        self.drop = make_dropout(config)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.down(gelu(self.up(x), self.approximate)))


GATE_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "swiglu": F.silu,  # LLaMA
    "geglu_tanh": partial(gelu, approximate="tanh"),  # Gemma
}


class GatedMLP(nn.Module):
    """The gated MLP (Shazeer, 2020): down(act(gate(x)) * up(x)), SwiGLU or GeGLU by `config.mlp`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.act = GATE_ACTIVATIONS[config.mlp]
        self.gate = Linear(config.dim, config.hidden_dim, bias=config.mlp_bias)
        self.up = Linear(config.dim, config.hidden_dim, bias=config.mlp_bias)
        self.down = Linear(config.hidden_dim, config.dim, bias=config.mlp_bias)
        self.drop = make_dropout(config)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.down(self.act(self.gate(x)) * self.up(x)))


class MoE(nn.Module):
    """Sparse mixture of gated-MLP experts with top-k routing (Mixtral).

    Router probabilities are a softmax over all experts; the chosen top-k are renormalised
    to sum to one. After each forward, `aux_loss` holds the Switch-Transformer load-balancing
    loss, n_experts * sum_e (fraction of routed tokens to e) * (mean router probability of e),
    which training objectives add with `router_aux_loss_coef`, and `expert_tokens` (n_experts,)
    the number of tokens routed to each expert (the training health record reads it).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.n_experts_per_token
        self.router = Linear(config.dim, config.n_experts, bias=False)
        self.experts = nn.ModuleList(GatedMLP(config) for _ in range(config.n_experts))
        self.aux_loss = torch.zeros(())
        self.expert_tokens = torch.zeros(config.n_experts, dtype=torch.long)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)  # (N, dim)
        probs = F.softmax(self.router(flat).float(), dim=-1)  # (N, n_experts)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, top_k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])  # (n_routed, dim) rows
        self.aux_loss = self._balance_loss(probs, chosen)
        self.expert_tokens = torch.bincount(chosen.flatten(), minlength=len(self.experts))  # (n_experts,)
        return out.view(B, T, D)  # (B, T, dim)

    def _balance_loss(self, probs: Tensor, chosen: Tensor) -> Tensor:
        n_experts = probs.shape[-1]
        routed = F.one_hot(chosen, n_experts).float().sum(1).mean(0)  # (n_experts,) tokens routed per token
        return n_experts * (routed * probs.mean(0)).sum()


def make_mlp(config: ModelConfig) -> nn.Module:
    if config.n_experts:
        return MoE(config)
    return GatedMLP(config) if config.mlp in GATE_ACTIVATIONS else GeluMLP(config)


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = make_norm(config)
        self.mlp = make_mlp(config)

    def forward(self, x: Tensor, rope: Rope, mask: Tensor | None, cache=None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class Blocks(nn.ModuleList):
    """The stack of blocks and the one loop over them (`run`), shared by every model.

    With `checkpointed` set (`train.activation_checkpointing`), each block keeps only its input
    for the backward pass and recomputes its activations from it when gradients are computed
    (`torch.utils.checkpoint`, non-reentrant, random state preserved so dropout repeats): the
    saved activations shrink from every intermediate of every block to one residual stream per
    block, for about one more forward pass of compute. It applies only while gradients are
    recorded and without a KV cache. Each block stays its own module call, so per-block wrappers
    (FSDP2's `fully_shard`, hooks) see the recomputation as an ordinary second forward.
    """

    checkpointed: bool = False

    def run(self, x: Tensor, rope: Rope, mask: Tensor | None, cache: CacheView | None = None) -> list[Tensor]:
        """The residual stream before and after every block: [x, block_0(x), ...]."""
        recompute = self.checkpointed and torch.is_grad_enabled() and cache is None
        states = [x]
        for block in self:
            x = checkpoint(block, x, rope, mask, use_reentrant=False) if recompute else block(x, rope, mask, cache)
            states.append(x)  # (B, T, dim)
        return states


def set_activation_checkpointing(model: nn.Module, on: bool = True) -> None:
    """Turn activation checkpointing on (or off) for every block stack in `model` (heads and wrappers included)."""
    stacks = [m for m in model.modules() if isinstance(m, Blocks)]
    if not stacks:
        raise LmforgeError(f"{type(model).__name__} has no lmforge block stack; "
                           "train.activation_checkpointing needs a model built by lmforge")
    for stack in stacks:
        stack.checkpointed = on


def init_weights(model: nn.Module, config: ModelConfig) -> None:
    """Normal(0, init_std) weights, zero biases, unit norms; residual projections scaled by 1/sqrt(2L) (GPT-2)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = config.init_std
            if name.endswith((".o", ".down")):
                std = std / math.sqrt(2 * config.n_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Embedding, LearnedPositions)):
            nn.init.normal_(module.weight, mean=0.0, std=config.init_std)
